"""kombu_pg only: does a claim cost the same with 1k, 100k and 1M messages waiting?

The queue lives in a kombu_pg schema of its own, dropped afterwards, so the million rows
and their dead versions never weigh on another scenario (nor autovacuum on its clock).
It is filled to each depth in turn (one real publish, then copies of its row: see
:mod:`bench.fill`), then ``VACUUM ANALYZE`` runs, as autovacuum would after such an insert,
so every depth starts from the same table state.  Then, round after round, through
``BrokerStore`` on one connection (the SQL a Kombu consumer runs, without Kombu's Python
around it): one claim of a batch of 100 (the default ``claim_batch_max``) carrying the acks
of the previous batch, as the transport's ``fetch`` does (one statement, one commit,
committed as ``durable_acks`` says), then 100 copies put back untimed, so the depth stays
put.  Each depth gets the same rounds, after a few unrecorded warm-up rounds.
The target (issue #9): the latency at every depth within 2x of every other.
"""

from __future__ import annotations

import time
from dataclasses import replace

import psycopg
from psycopg import sql

from kombu_pg.config import Options
from kombu_pg.store import BrokerStore

from .brokers import Broker
from .fill import Template, fill
from .scenarios import Context, Measured, Metric, percentile, progress, scenario

DEPTHS = (1_000, 100_000, 1_000_000)
BATCH = 100
TARGET_RATIO = 2.0
_WARMUP_ROUNDS = 10
#: Rounds per depth = this x --samples (1,000 by default, so p99 is the 10th worst).
_ROUNDS_PER_SAMPLE = 5


def _label(depth: int) -> str:
    return f"{depth // 1_000_000}M" if depth >= 1_000_000 else f"{depth // 1_000}k"


_METRICS = [
    Metric(f"d{_label(d)}_{p}", f"{_label(d)} waiting: claim {p} ms", unit="ms")
    for d in DEPTHS
    for p in ("p50", "p99")
]


@scenario(
    "depth",
    f"kombu_pg only: claim {BATCH} (carrying the previous {BATCH} acks) with "
    f"{', '.join(map(_label, DEPTHS))} messages waiting",
    _METRICS,
    applies=lambda broker: broker.is_reference,
    in_quick=False,  # a million-row insert and VACUUM are not a smoke test
)
def claim_at_depth(ctx: Context, broker: Broker) -> Measured:
    name = schema = ctx.name("depth")
    own = replace(broker, transport_options={**broker.transport_options, "schema": schema})
    rounds = _ROUNDS_PER_SAMPLE * ctx.params.samples
    durable = Options.from_mapping(broker.transport_options).durable_acks
    out = Measured()
    try:
        fill(own, name, 1, "x" * ctx.params.payload_bytes)  # migrates the new schema
        with psycopg.connect(broker.url, autocommit=True) as conn:
            store = BrokerStore(conn, schema)
            template = Template(conn, schema, name)
            consumer = store.register_consumer()
            waiting = 1
            for depth in DEPTHS:
                started = time.perf_counter()
                template.insert(depth - waiting)
                waiting = depth
                conn.execute(
                    sql.SQL("VACUUM ANALYZE {}.messages").format(sql.Identifier(schema))
                )
                filled_s = time.perf_counter() - started
                progress(f"  {_label(depth)} waiting (filled and vacuumed in {filled_s:.1f} s)")
                claims = _rounds(store, template, name, consumer, durable, rounds, ctx)
                for p in (50, 99):
                    out.values[f"d{_label(depth)}_p{p}"] = percentile(claims, p) * 1000
                if len(claims) < rounds:
                    out.notes.append(f"{_label(depth)}: {len(claims)} rounds (time budget)")
    finally:
        with psycopg.connect(broker.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    out.notes.append(f"{rounds} rounds per depth, durable_acks={durable}")
    _judge(out)
    return out


def _rounds(
    store: BrokerStore,
    template: Template,
    queue: str,
    consumer: int,
    durable: bool,
    rounds: int,
    ctx: Context,
) -> list[float]:
    """Seconds of each recorded claim (with the previous batch's acks)."""
    claims: list[float] = []
    acks: list[str] = []
    deadline = time.monotonic() + ctx.params.sample_budget_s
    for i in range(_WARMUP_ROUNDS + rounds):
        started = time.perf_counter()
        claimed = store.claim(queue, BATCH, consumer, acks=acks, durable=durable)
        elapsed = time.perf_counter() - started
        if len(claimed) != BATCH:
            raise RuntimeError(f"claimed {len(claimed)} messages, expected {BATCH}")
        acks = [c.token for c in claimed if c.token is not None]
        template.insert(BATCH)  # back to the same depth; not timed
        if i >= _WARMUP_ROUNDS:
            claims.append(elapsed)
            if time.monotonic() > deadline:
                break
    store.ack(acks, durable=durable)
    return claims


def _judge(out: Measured) -> None:
    """1M ÷ 1k, and the verdict on the spread: "flat" means no depth more than 2x another,
    whichever way (a shallow queue slower than a deep one is not flat either)."""
    low, high = _label(DEPTHS[0]), _label(DEPTHS[-1])
    for p in ("p50", "p99"):
        values = [out.values.get(f"d{_label(d)}_{p}") for d in DEPTHS]
        if not all(values):
            continue
        spread = max(values) / min(values)
        verdict = "met" if spread <= TARGET_RATIO else "NOT met"
        out.notes.append(
            f"{p}: {high} ÷ {low} {values[-1] / values[0]:.2f}×, slowest ÷ fastest depth "
            f"{spread:.2f}× (target ≤ {TARGET_RATIO:g}×: {verdict})"
        )
