"""What ``python -m bench.churn`` measures every few seconds, and its Markdown/JSON report.

Table statistics come from ``pg_stat_user_tables``, which lags: each backend flushes its
counters about once a second (PostgreSQL 15 has no ``pg_stat_force_next_flush`` for other
sessions), so a sample is accurate to roughly a second of churn — small next to the
10-second sampling interval.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

PHASES = {
    "churn": "phase 1: churn",
    "snapshot": "phase 2: snapshot held",
    "recovery": "phase 3: after release",
}


@dataclass
class Sample:
    """One sampling window, ending at ``t`` seconds after phase 1 started."""

    t: float
    phase: str
    window_s: float
    n_live_tup: int
    n_dead_tup: int
    autovacuum_count: int
    last_autovacuum: str | None
    vacuum_running: bool
    total_bytes: int
    heap_bytes: int
    index_bytes: int
    ready: int
    in_flight: int
    # cumulative since the run's table was created
    n_tup_upd: int
    n_tup_hot_upd: int
    # the oldest snapshot in this database: what holds vacuum back
    oldest_xmin_age: int | None
    oldest_idle_xact_s: float | None
    # what one claim's candidate scan costs now (EXPLAIN ANALYZE of its SELECT)
    scan_node: str | None = None
    scan_buffers: int | None = None
    scan_ms: float | None = None
    load1: float | None = None  # the machine's 1-minute load average (it is shared)
    published_per_s: float = 0.0
    consumed_per_s: float = 0.0
    probe_ms: list[float] = field(default_factory=list, repr=False)
    consumer_claim_ms: list[float] = field(default_factory=list, repr=False)
    end_to_end_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The sample without its raw latency lists (those go into the JSON's percentiles)."""
        out = {k: v for k, v in asdict(self).items() if not k.endswith("_ms")}
        for name in ("probe_ms", "consumer_claim_ms", "end_to_end_ms"):
            values = getattr(self, name)
            out[name.replace("_ms", "")] = latency_summary(values)
        return out


# Rows of the queue, split by state: the queue depth the run keeps steady.
_DEPTH = """
SELECT count(*) FILTER (WHERE lock_token IS NULL), count(*) FILTER (WHERE lock_token IS NOT NULL)
FROM {schema}.messages WHERE queue = %(queue)s
"""

_TABLE = """
SELECT s.n_live_tup, s.n_dead_tup, s.autovacuum_count, s.last_autovacuum,
       s.n_tup_upd, s.n_tup_hot_upd,
       pg_total_relation_size(s.relid), pg_relation_size(s.relid), pg_indexes_size(s.relid),
       EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v WHERE v.relid = s.relid)
FROM pg_stat_user_tables s
WHERE s.schemaname = %(schema)s AND s.relname = 'messages'
"""

# What an operator would look at: the age (in transactions) of the oldest snapshot any
# session of this database holds, and the longest idle-in-transaction session.
_SNAPSHOTS = """
SELECT max(age(backend_xmin)),
       max(extract(epoch FROM now() - xact_start)) FILTER (WHERE state LIKE 'idle in transaction%%')
FROM pg_stat_activity WHERE datname = current_database()
"""


# The unkeyed half of the claim function's candidate scan (migration 0004), as a plain
# SELECT: EXPLAIN ANALYZE of it shows how many pages a claim reads to find 50 ready rows
# (dead index entries and row versions it must step over included).  No FOR UPDATE: the
# probe must not take messages away from the consumers.
_CLAIM_SCAN = """
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
SELECT m.id FROM {schema}.messages m
WHERE m.queue = {queue} AND m.lock_token IS NULL AND m.visible_at IS NULL AND m.serial_key IS NULL
  AND (m.expires_at IS NULL OR m.expires_at > now()) AND m.delivery_count < 10
ORDER BY m.priority DESC, m.id
LIMIT 50
"""


def explain_claim(conn: psycopg.Connection, schema: str, queue: str) -> tuple[str, int, float]:
    """(scan node under the Limit, shared buffers touched, execution ms)."""
    # EXPLAIN takes no bound parameters: the queue name goes in as a quoted literal.
    query = sql.SQL(_CLAIM_SCAN).format(schema=sql.Identifier(schema), queue=sql.Literal(queue))
    plan = conn.execute(query).fetchone()[0][0]
    top = plan["Plan"]
    node = top
    while node.get("Plans") and node["Node Type"] in ("Limit", "Sort", "Result"):
        node = node["Plans"][0]
    name = node["Node Type"] + (f" on {node['Index Name']}" if "Index Name" in node else "")
    buffers = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
    return name, buffers, round(plan["Execution Time"], 3)


def read_table(conn: psycopg.Connection, schema: str, queue: str, t: float, phase: str,
               window_s: float) -> Sample:
    """One sample of the table, its queue and the database's snapshots (autocommit
    connection: each statement sees fresh statistics, not a cached snapshot of them)."""
    (live, dead, av_count, last_av, upd, hot, total, heap, index, running) = conn.execute(
        _TABLE, {"schema": schema}).fetchone()
    ready, in_flight = conn.execute(
        sql.SQL(_DEPTH).format(schema=sql.Identifier(schema)), {"queue": queue}).fetchone()
    xmin_age, idle_s = conn.execute(_SNAPSHOTS).fetchone()
    node, buffers, scan_ms = explain_claim(conn, schema, queue)
    return Sample(
        t=round(t, 1), phase=phase, window_s=round(window_s, 2), n_live_tup=live, n_dead_tup=dead,
        autovacuum_count=av_count, last_autovacuum=_iso(last_av), vacuum_running=running,
        total_bytes=total, heap_bytes=heap, index_bytes=index, ready=ready, in_flight=in_flight,
        n_tup_upd=upd, n_tup_hot_upd=hot, oldest_xmin_age=xmin_age,
        oldest_idle_xact_s=None if idle_s is None else round(float(idle_s), 1),
        scan_node=node, scan_buffers=buffers, scan_ms=scan_ms, load1=round(os.getloadavg()[0], 2),
    )


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: p99 of 100 values is the 99th)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_summary(values: list[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "p50": _round(percentile(values, 50)),
            "p99": _round(percentile(values, 99)), "max": _round(max(values, default=None))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# -- per-minute table -------------------------------------------------------------------


@dataclass
class Minute:
    """Samples grouped by minute of their phase."""

    phase: str
    minute: int  # 1-based within the phase
    samples: list[Sample]

    def row(self) -> dict[str, Any]:
        s = self.samples
        probe = [x for sample in s for x in sample.probe_ms]
        claims = [x for sample in s for x in sample.consumer_claim_ms]
        e2e = [x for sample in s for x in sample.end_to_end_ms]
        seconds = sum(x.window_s for x in s) or 1.0
        return {
            "phase": self.phase,
            "minute": self.minute,
            "published_per_s": sum(x.published_per_s * x.window_s for x in s) / seconds,
            "consumed_per_s": sum(x.consumed_per_s * x.window_s for x in s) / seconds,
            "ready_max": max(x.ready for x in s),
            "live_max": max(x.n_live_tup for x in s),
            "dead_max": max(x.n_dead_tup for x in s),
            "dead_last": s[-1].n_dead_tup,
            "total_mb_max": max(x.total_bytes for x in s) / 2**20,
            "autovacuums": s[-1].autovacuum_count,
            "probe_p50": percentile(probe, 50),
            "probe_p99": percentile(probe, 99),
            "claim_p50": percentile(claims, 50),
            "claim_p99": percentile(claims, 99),
            "e2e_p50": percentile(e2e, 50),
            "e2e_p99": percentile(e2e, 99),
            "xmin_age": max((x.oldest_xmin_age or 0) for x in s),
            "scan_buffers_max": max((x.scan_buffers or 0) for x in s),
            "load1_max": max((x.load1 or 0) for x in s),
        }


def by_minute(samples: list[Sample], phase_starts: dict[str, float]) -> list[Minute]:
    minutes: dict[tuple[str, int], Minute] = {}
    for sample in samples:
        # By the window's middle: the last window of a phase may end a little after its
        # last full minute, and still belongs to it.
        middle = sample.t - sample.window_s / 2 - phase_starts[sample.phase]
        index = int(max(0.0, middle) // 60) + 1
        minutes.setdefault((sample.phase, index), Minute(sample.phase, index, [])).samples.append(sample)
    return list(minutes.values())


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def minute_table(minutes: list[Minute]) -> str:
    lines = [
        ("| phase | min | pub/s | cons/s | ready max | live max | dead max | dead at end "
         "| size MB max | autovacuums | probe claim p50 / p99 ms | consumer claim p50 / p99 ms "
         "| end-to-end p50 / p99 ms | oldest xmin age | claim scan buffers max | load max |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for minute in minutes:
        r = minute.row()
        lines.append(
            f"| {minute.phase} | {r['minute']} | {r['published_per_s']:,.0f} | {r['consumed_per_s']:,.0f} "
            f"| {r['ready_max']:,} | {r['live_max']:,} | {r['dead_max']:,} | {r['dead_last']:,} "
            f"| {r['total_mb_max']:.1f} | {r['autovacuums']} "
            f"| {_ms(r['probe_p50'])} / {_ms(r['probe_p99'])} "
            f"| {_ms(r['claim_p50'])} / {_ms(r['claim_p99'])} "
            f"| {_ms(r['e2e_p50'])} / {_ms(r['e2e_p99'])} | {r['xmin_age']:,} "
            f"| {r['scan_buffers_max']:,} | {r['load1_max']:.1f} |"
        )
    return "\n".join(lines)


def info_table(info: dict[str, Any]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in info.items())])


def summary_lines(summary: dict[str, Any]) -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in summary.items())


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
