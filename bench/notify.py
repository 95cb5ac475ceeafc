"""kombu_pg only: what NOTIFY costs concurrent producers, with the shipped wake-ups.

A NOTIFY takes a cluster-wide lock at commit, held through the commit's WAL flush, so
commits that notify cannot overlap.  kombu_pg's publishes therefore notify a queue only
when a consumer of it is idle (``BrokerStore.mark_idle``).  Here 4 producer processes
(:mod:`bench.fleet`) publish N single persistent messages in all, through the default
exchange, which is Celery's task path, to one queue that a consumer process drains
meanwhile (prefetch 100, ack each), so the NOTIFYs have a listener to wake.  Three arms,
differing only in whether the producers' publishes notify:

* **shipped**: the default, a NOTIFY when the consumer is idle;
* **no NOTIFY**: never (a transport variant whose publishes pass ``notify=False``).  Its
  consumer polls every 20 ms instead (``polling_interval``), so that, as in the other
  arms, it drains while the producers publish: an idle consumer would leave them the
  CPUs and flatter the arm (on 2 vCPUs by ~1.5x);
* **NOTIFY each**: one NOTIFY per message (``notify=True``): what waking only idle
  consumers saves.

Throughput = N / (release of the producers until the last publish returned).  The arms run
interleaved for ROUNDS rounds, each on a fresh queue with fresh processes; the table shows
each arm's median.  A LISTEN session in the bench process counts the NOTIFYs each round
sent for its queue (warm-ups included), as a check that the arms differ as intended.  The
target (issue #17): shipped within 10 % of no NOTIFY.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from kombu_pg.store import BrokerStore
from kombu_pg.transport import Channel, Transport

from .brokers import Broker, delete_entities
from .fill import schema_of
from .fleet import Fleet, Member, consume, produce
from .kombu_level import PREFETCH
from .scenarios import Context, Measured, Metric, scenario

if TYPE_CHECKING:
    from typing_extensions import Self

PRODUCERS = 4
ROUNDS = 3
TARGET = 0.9  # shipped ÷ no NOTIFY


class _Channel(Channel):
    notify: bool | None = None

    def _should_notify(self, row: Any) -> bool | None:
        return self.notify


class _NoNotifyChannel(_Channel):
    notify = False


class _NotifyEachChannel(_Channel):
    notify = True


class _NoNotify(Transport):
    Channel = _NoNotifyChannel


class _NotifyEach(Transport):
    Channel = _NotifyEachChannel


#: (metric key, header, transport class, transport options of the arm)
ARMS: tuple[tuple[str, str, type | None, dict[str, Any]], ...] = (
    ("shipped", "NOTIFY when the consumer is idle (shipped) msg/s", None, {}),
    ("none", "no NOTIFY msg/s", _NoNotify, {"polling_interval": 0.02}),
    ("each", "NOTIFY each message msg/s", _NotifyEach, {}),
)


@scenario(
    "notify",
    f"kombu_pg only: {PRODUCERS} producer processes publish N single messages to one queue "
    "a consumer drains; NOTIFY when it is idle vs none vs one per message "
    f"(median of {ROUNDS} interleaved rounds)",
    [Metric(key, header) for key, header, _, _ in ARMS],
    applies=lambda broker: broker.is_reference,
)
def notify_cost(ctx: Context, broker: Broker) -> Measured:
    rates: dict[str, list[float]] = {key: [] for key, _, _, _ in ARMS}
    sent: dict[str, list[int]] = {key: [] for key, _, _, _ in ARMS}
    out = Measured()
    # Interleaved (shipped, none, each, shipped, ...), so drifting load on a shared machine
    # falls on every arm alike; the median drops one disturbed round.
    for round_ in range(ROUNDS):
        for key, _, transport, options in ARMS:
            arm = replace(broker, transport=transport,
                          transport_options={**broker.transport_options, **options})
            name = ctx.name("notify", key, str(round_))
            try:
                rate, notifies = _publish_concurrently(ctx, arm, name)
            finally:
                delete_entities(broker, [name])
            sent[key].append(notifies)
            if rate:
                rates[key].append(rate)
            else:
                out.notes.append(f"{key}: producers stalled in round {round_ + 1}")
    for key, values in rates.items():
        if values:
            out.values[key] = statistics.median(values)
            out.notes.append(
                f"{key}: " + " / ".join(f"{v:,.0f}" for v in values)
                + f" msg/s, {' / '.join(f'{n:,}' for n in sent[key])} NOTIFYs"
            )
    if out.values.get("shipped") and out.values.get("none"):
        ratio = out.values["shipped"] / out.values["none"]
        verdict = "met" if ratio >= TARGET else "NOT met"
        out.notes.append(f"shipped ÷ no NOTIFY: {ratio:.2f} (target ≥ {TARGET:g}: {verdict})")
    if out.values.get("each") and out.values.get("none"):
        out.notes.append(f"each ÷ no NOTIFY: {out.values['each'] / out.values['none']:.2f}")
    return out


def _publish_concurrently(ctx: Context, broker: Broker, queue: str,
                          count: int = PRODUCERS) -> tuple[float | None, int]:
    """(msg/s of ``count`` producers together or None if they stalled, NOTIFYs for ``queue``)."""
    share = ctx.params.messages // count
    pad = "x" * ctx.params.payload_bytes
    consumer: list[Member] = [(consume, (broker, queue, PREFETCH, None))]
    producers: list[Member] = [(produce, (broker, queue, share, pad))] * count
    with NotifyCounter(broker, queue) as counter, Fleet(consumer) as draining:
        draining.go()
        with Fleet(producers) as publishing:
            started = publishing.go()
            published = publishing.wait(share * count, ctx.params.stall_timeout_s)
            results = publishing.finish()
        draining.finish()
    if published < share * count:
        return None, counter.count
    return share * count / (max(r["finished"] for r in results) - started), counter.count


class NotifyCounter:
    """A LISTEN session on kombu_pg's wake-up channel, counting the NOTIFYs naming one
    queue, read by a thread so that none waits in a socket buffer."""

    def __init__(self, broker: Broker, queue: str) -> None:
        self.count = 0
        self._queue = queue
        self._conn = psycopg.connect(broker.url, autocommit=True)
        channel = BrokerStore(self._conn, schema_of(broker)).channel
        self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="bench-notify-counter", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._conn.close()

    def _read(self) -> None:
        while not self._stop.is_set():
            for notify in self._conn.notifies(timeout=0.2):
                if notify.payload == self._queue:
                    self.count += 1
