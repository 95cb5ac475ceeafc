"""``python -m bench.churn``: sustained churn on the messages table, then a long-held snapshot.

Not a comparison with other brokers (that is ``python -m bench``) but a soak test of one
kombu_pg schema: does ``messages`` stay small and the claim fast when rows are inserted,
claimed and deleted for many minutes, and what does one forgotten idle-in-transaction
session do to it?

1. Calibrate (unless ``--calibrate-seconds 0``): producers publish flat out for a few
   seconds; what the consumers sustain is the capacity, and the run uses ``--load`` of it,
   or ``--rate`` when given.
2. Phase 1, ``--minutes``: Kombu producers publish at the target rate, Kombu consumers
   drain and ack; every ``--sample-seconds`` the table's statistics, size, queue depth and
   the claim latency of a dedicated probe consumer are recorded.
3. Phase 2, ``--snapshot-minutes``: churn continues while another session holds a
   REPEATABLE READ snapshot, idle in transaction.
4. Phase 3: the snapshot is released; sampling continues (faster) until dead tuples and
   claim latency are back to phase-1 levels, or ``--recovery-minutes`` pass.

The run uses a scratch database (``bench/pg.py``): on ``--pg-url`` / ``$KOMBU_PG_URL``, or on
an embedded server. See docs/bloat.md for a run and what it means.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from types import FrameType
from typing import Any

import psycopg
from psycopg import sql

import kombu_pg

from .churn_stats import (
    PHASES,
    Sample,
    by_minute,
    info_table,
    median,
    minute_table,
    percentile,
    read_table,
    summary_lines,
)
from .churn_workers import Probe, WorkerConfig, run_consumer, run_producer
from .pg import Database, create_scratch, redact
from .report import git_revision, package_versions

SCHEMA = "kombu_pg"
QUEUE = "churn"
RECOVERY_SAMPLE_SECONDS = 5.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="phase 1 (churn) length (default 10)")
    p.add_argument("--snapshot-minutes", type=float, default=3.0,
                   help="phase 2 (snapshot held) length; 0 skips phases 2 and 3 (default 3)")
    p.add_argument("--recovery-minutes", type=float, default=5.0,
                   help="longest wait for recovery after the snapshot is released (default 5)")
    p.add_argument("--recovery-min-minutes", type=float, default=1.0,
                   help="keep sampling at least this long after the release, recovered or not, "
                        "to see what the size does (default 1)")
    p.add_argument("--rate", type=float, default=None,
                   help="target msg/s; default: --load times the calibrated capacity")
    p.add_argument("--load", type=float, default=0.65, help="fraction of capacity (default 0.65)")
    p.add_argument("--calibrate-seconds", type=float, default=20.0,
                   help="capacity measurement (also reported with --rate; 0 skips it)")
    p.add_argument("--producers", type=int, default=2, help="producer processes (default 2)")
    p.add_argument("--consumers", type=int, default=2, help="consumer processes (default 2)")
    p.add_argument("--prefetch", type=int, default=100)
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--probe-interval", type=float, default=0.1, help="seconds between probe claims")
    p.add_argument("--claim-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="experiment: ALTER FUNCTION claim(...) SET NAME = VALUE in the scratch "
                        "database before the run (e.g. enable_bitmapscan=off); repeatable")
    p.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON here")
    p.add_argument("--pg-url", default=os.environ.get("KOMBU_PG_URL"),
                   help="PostgreSQL server (default $KOMBU_PG_URL; if unset, an embedded server)")
    return p.parse_args(argv)


def progress(text: str) -> None:
    print(f"[churn {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the children's reports ---------------------------------------------------------------


@dataclass
class Window:
    started: float = field(default_factory=time.monotonic)
    published: int = 0
    consumed: int = 0
    end_to_end_ms: list[float] = field(default_factory=list)
    claim_ms: list[float] = field(default_factory=list)


class Collector:
    """Reads the children's reports into the current window (a thread of the parent)."""

    def __init__(self, inbox: Any) -> None:
        self.inbox = inbox
        self.ready: set[tuple[str, int]] = set()
        self._window = Window()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.inbox.get(timeout=0.2)
            except (Empty, OSError, ValueError):  # nothing yet; or the queue closed at exit
                continue
            with self._lock:
                self._take_report(item)

    def _take_report(self, item: tuple) -> None:
        kind, *rest = item
        if kind == "ready":
            self.ready.add((rest[0], rest[1]))
        elif kind == "published":
            self._window.published += rest[1]
        elif kind == "consumed":
            latencies, claims = rest[1], rest[2]
            self._window.consumed += len(latencies)
            self._window.end_to_end_ms += [x * 1000 for x in latencies]
            self._window.claim_ms += [x * 1000 for x in claims]

    def take(self) -> Window:
        """The window so far; a new one starts now."""
        with self._lock:
            window, self._window = self._window, Window()
        return window

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- the run ---------------------------------------------------------------------------------


class Churn:
    def __init__(self, args: argparse.Namespace, db: Database) -> None:
        self.args = args
        self.db = db
        self.cfg = WorkerConfig(db.url, SCHEMA, QUEUE, args.producers, args.payload_bytes, args.prefetch)
        self.ctx = mp.get_context("spawn")  # a forked child would share our sessions
        self.rate = self.ctx.Value("d", 0.0)  # per producer; 0: paused
        self.stop_event = self.ctx.Event()
        self.inbox = self.ctx.Queue()
        self.children: list[mp.process.BaseProcess] = []
        self.collector = Collector(self.inbox)
        self.probe = Probe(db.url, SCHEMA, QUEUE, args.probe_interval)
        self.monitor: psycopg.Connection | None = None
        self.samples: list[Sample] = []
        self.t0 = 0.0  # monotonic start of phase 1
        self.phase_starts: dict[str, float] = {}
        self.capacity: float | None = None
        self.target = 0.0
        self.events: dict[str, Any] = {}

    # -- setup and teardown

    def start(self) -> None:
        for i in range(self.args.consumers):
            self._spawn(run_consumer, self.cfg, i, self.stop_event, self.inbox)
        self._wait_ready("consumer", self.args.consumers)  # they also created the schema
        self._set_claim_settings()
        for i in range(self.args.producers):
            self._spawn(run_producer, self.cfg, i, self.rate, self.stop_event, self.inbox)
        self._wait_ready("producer", self.args.producers)
        self.monitor = psycopg.connect(self.db.url, autocommit=True, application_name="bench_churn_monitor")
        if self.monitor.execute("SHOW autovacuum").fetchone()[0] != "on":
            # The table's storage parameters cannot turn it on: dead tuples will only grow.
            self.events["autovacuum_off"] = True
            progress("WARNING: autovacuum is off on this server; dead tuples cannot stay bounded")
        self._monitor_like_claim()
        self.probe.start()

    def _set_claim_settings(self) -> None:
        """Experiment hook: planner settings pinned on the claim function.  ALTER FUNCTION
        changes its pg_proc row, so every session recompiles it (no stale cached plan)."""
        with psycopg.connect(self.db.url, autocommit=True) as conn:
            for item in self.args.claim_setting:
                name, _, value = item.partition("=")
                conn.execute(sql.SQL(
                    "ALTER FUNCTION {}.claim(text, integer, integer, integer, integer) SET {} = {}"
                ).format(sql.Identifier(SCHEMA), sql.Identifier(name.strip()), sql.Literal(value.strip())))
                progress(f"claim function: SET {name.strip()} = {value.strip()}")

    def _monitor_like_claim(self) -> None:
        """The sampler's EXPLAIN of the claim scan plans under the claim function's settings."""
        assert self.monitor is not None
        for item in self.args.claim_setting:
            name, _, value = item.partition("=")
            self.monitor.execute(sql.SQL("SET {} = {}").format(
                sql.Identifier(name.strip()), sql.Literal(value.strip())))

    def _spawn(self, target, *args) -> None:
        process = self.ctx.Process(target=target, args=args, daemon=True)
        process.start()
        self.children.append(process)

    def _wait_ready(self, kind: str, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for k, _ in self.collector.ready if k == kind) < n:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in self.children):
                raise RuntimeError(f"{kind}s did not start (see their tracebacks above)")
            time.sleep(0.1)

    def close(self) -> None:
        self.stop_event.set()
        self.probe.stop()
        for process in self.children:
            process.join(timeout=15)
        for process in self.children:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        self.collector.stop()

    def _check_children(self) -> None:
        dead = [p for p in self.children if not p.is_alive()]
        if dead:
            raise RuntimeError(f"{len(dead)} worker process(es) died (exit codes "
                               f"{[p.exitcode for p in dead]}); see tracebacks above")

    # -- calibration

    def calibrate(self) -> None:
        """Capacity: what producers and consumers together sustain flat out.

        The first half of the window is warm-up; the second half is measured.  The
        backlog it may leave is drained (producers paused) before phase 1."""
        if self.args.rate and not self.args.calibrate_seconds:
            self.target = self.args.rate
            return
        half = self.args.calibrate_seconds / 2
        progress(f"calibrating for {self.args.calibrate_seconds:g} s (publishing flat out)")
        self.rate.value = float("inf")
        time.sleep(half)
        self.collector.take()
        time.sleep(half)
        window = self.collector.take()
        self.rate.value = 0.0
        seconds = time.monotonic() - window.started
        published, consumed = window.published / seconds, window.consumed / seconds
        self.capacity = min(published, consumed)
        self.target = self.args.rate or self.args.load * self.capacity
        progress(f"capacity ~{self.capacity:,.0f} msg/s (publish {published:,.0f}, consume "
                 f"{consumed:,.0f}); target {self.target:,.0f} msg/s")
        self._drain_backlog()

    def _drain_backlog(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, in_flight = self._depth()
            if ready + in_flight < 100:
                return
            time.sleep(1)
        progress("backlog not drained after calibration; starting anyway")

    def _depth(self) -> tuple[int, int]:
        assert self.monitor is not None
        s = read_table(self.monitor, SCHEMA, QUEUE, 0, "churn", 0)
        return s.ready, s.in_flight

    # -- phases

    def run(self) -> None:
        self.start()
        self.calibrate()
        self.rate.value = self.target / self.args.producers
        self.collector.take()
        self.probe.drain()
        self.t0 = time.monotonic()
        assert self.monitor is not None
        self.events["autovacuum_count_phase1_start"] = read_table(
            self.monitor, SCHEMA, QUEUE, 0, "churn", 0).autovacuum_count
        self._phase("churn", self.args.minutes * 60, self.args.sample_seconds)
        if self.args.snapshot_minutes > 0:
            with self._old_snapshot():
                self._phase("snapshot", self.args.snapshot_minutes * 60, self.args.sample_seconds)
            self._recovery()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _phase(self, phase: str, seconds: float, every: float, until=None) -> None:
        """Sample every ``every`` s for ``seconds`` (or until ``until()`` says done)."""
        start = self.phase_starts[phase] = self._now()
        progress(f"{PHASES[phase]} for up to {seconds / 60:g} min")
        while self._now() - start < seconds - 1e-3:
            time.sleep(max(0.0, min(every, start + seconds - self._now())))
            sample = self._sample(phase)
            self._check_children()
            if until is not None and until(sample):
                return

    def _sample(self, phase: str) -> Sample:
        assert self.monitor is not None
        window = self.collector.take()
        probes = self.probe.drain()
        seconds = time.monotonic() - window.started
        sample = read_table(self.monitor, SCHEMA, QUEUE, self._now(), phase, seconds)
        probed = sum(1 for p in probes if p.claimed)
        sample.published_per_s = round(window.published / seconds, 1)
        sample.consumed_per_s = round((window.consumed + probed) / seconds, 1)
        sample.probe_ms = [p.seconds * 1000 for p in probes]
        sample.consumer_claim_ms = window.claim_ms
        sample.end_to_end_ms = window.end_to_end_ms
        self.samples.append(sample)
        progress(f"t={sample.t:6.0f}s {phase:8} pub {sample.published_per_s:6,.0f}/s "
                 f"cons {sample.consumed_per_s:6,.0f}/s ready {sample.ready:6,} "
                 f"dead {sample.n_dead_tup:8,} live {sample.n_live_tup:7,} "
                 f"{sample.total_bytes / 2**20:6.1f} MB av {sample.autovacuum_count} "
                 f"probe p50/p99 {_fmt(percentile(sample.probe_ms, 50))}/"
                 f"{_fmt(percentile(sample.probe_ms, 99))} ms scan {sample.scan_node} "
                 f"{sample.scan_buffers} buf {sample.scan_ms} ms load {sample.load1}")
        return sample

    def _old_snapshot(self):
        return HeldSnapshot(self.db.url, SCHEMA, self.events, self._now)

    def _recovery(self) -> None:
        """Sample until dead tuples and claim latency are back at phase-1 levels."""
        baseline = self.baseline()
        self.events["recovery_thresholds"] = baseline
        state: dict[str, float] = {}

        def recovered(sample: Sample) -> bool:
            since = sample.t - self.events["snapshot_released_at"]
            # Back to normal means a vacuum has removed what the snapshot pinned: below
            # the phase-1 peak alone is not enough (vacuum during the snapshot already
            # removed everything older than it).
            vacuumed = sample.autovacuum_count > self.events["autovacuum_count_at_release"]
            if vacuumed and "vacuum" not in state:
                state["vacuum"] = since
            if "dead" not in state and vacuumed and sample.n_dead_tup <= baseline["dead_max"]:
                state["dead"] = since
            p50, p99 = percentile(sample.probe_ms, 50), percentile(sample.probe_ms, 99)
            latency_ok = (p50 is not None and p50 <= baseline["probe_p50_limit"]
                          and p99 is not None and p99 <= baseline["probe_p99_limit"])
            if "latency" not in state and latency_ok:
                state["latency"] = since
            settled = since >= self.args.recovery_min_minutes * 60 - 1e-3
            return "dead" in state and "latency" in state and latency_ok and settled

        self._phase("recovery", self.args.recovery_minutes * 60, RECOVERY_SAMPLE_SECONDS, recovered)
        self.events["dead_recovered_after_s"] = state.get("dead")
        self.events["latency_recovered_after_s"] = state.get("latency")
        self.events["first_autovacuum_seen_after_s"] = state.get("vacuum")
        self.events["vacuum_after_release"] = self._vacuum_after_release()

    def baseline(self) -> dict[str, float]:
        """Phase-1 levels to recover to: the highest dead-tuple count after the first
        minute (the sawtooth's peak between autovacuums), and the last minute's probe
        latency with headroom (one 5-second window's p99 is close to its max)."""
        churn = [s for s in self.samples if s.phase == "churn"]
        settled = [s for s in churn if s.t > 60] or churn
        last = [x for s in churn if s.t > churn[-1].t - 60 for x in s.probe_ms]
        p50, p99 = percentile(last, 50) or 0.0, percentile(last, 99) or 0.0
        return {
            "dead_max": max(s.n_dead_tup for s in settled),
            "probe_p50": p50, "probe_p99": p99,
            "probe_p50_limit": 1.5 * p50 + 0.5, "probe_p99_limit": 2 * p99 + 1.0,
        }

    def _vacuum_after_release(self) -> dict[str, Any]:
        """Did autovacuum run on the table after the release, and when (server clock)?"""
        assert self.monitor is not None
        row = self.monitor.execute(
            "SELECT autovacuum_count, vacuum_count, "
            "extract(epoch FROM last_autovacuum - %(released)s::timestamptz) "
            "FROM pg_stat_user_tables WHERE schemaname = %(schema)s AND relname = 'messages'",
            {"released": self.events["snapshot_released_server"], "schema": SCHEMA},
        ).fetchone()
        count, manual, after = row
        return {
            "autovacuums_since_release": count - self.events["autovacuum_count_at_release"],
            "manual_vacuums_since_release": manual - self.events["vacuum_count_at_release"],
            "last_autovacuum_after_release_s": None if after is None or after < 0 else round(float(after), 1),
        }

    # -- report

    def info(self) -> dict[str, Any]:
        assert self.monitor is not None
        settings = dict(self.monitor.execute(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
            (["autovacuum", "autovacuum_naptime", "autovacuum_max_workers", "autovacuum_vacuum_cost_delay",
              "autovacuum_vacuum_cost_limit", "autovacuum_vacuum_threshold",
              "autovacuum_vacuum_scale_factor", "vacuum_cost_limit"],)).fetchall())
        reloptions = self.monitor.execute(
            "SELECT reloptions FROM pg_class WHERE oid = to_regclass(%s)",
            (f'"{SCHEMA}".messages',)).fetchone()[0]
        databases = self.monitor.execute(
            "SELECT count(*) FROM pg_database WHERE datallowconn").fetchone()[0]
        a = self.args
        return {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(),
            "load average at start": getattr(self, "load_at_start", ""),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "postgresql": f"{self.db.server} on {self.db.origin}",
            "autovacuum (server)": ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
            "databases autovacuum visits": databases,
            "messages reloptions": ", ".join(reloptions or []),
            "packages": ", ".join(f"{k} {v}" for k, v in package_versions().items()),
            "kombu-pg revision": git_revision(),
            "kombu_pg imported from": str(Path(kombu_pg.__file__).parent),
            "workers": f"{a.producers} Kombu producers, {a.consumers} Kombu consumers "
                       f"(prefetch {a.prefetch}, ack each), 1 probe consumer "
                       f"(claim ≤1 + ack every {a.probe_interval:g} s)",
            "message": f"~{a.payload_bytes + 30} byte JSON body, delivery_mode=2",
            "claim function settings (experiment)": ", ".join(a.claim_setting) or "none (as shipped)",
            "capacity (calibrated)": "–" if self.capacity is None else f"{self.capacity:,.0f} msg/s",
            "target rate": f"{self.target:,.0f} msg/s"
                           + ("" if self.capacity is None else f" ({self.target / self.capacity:.0%} of capacity)"),
            "command": "python -m bench.churn " + " ".join(sys.argv[1:]),
        }

    def summary(self) -> dict[str, Any]:
        minutes = {(m.phase, m.minute): m.row() for m in by_minute(self.samples, self.phase_starts)}
        churn = [r for (phase, _), r in minutes.items() if phase == "churn"]
        snap = [r for (phase, _), r in minutes.items() if phase == "snapshot"]
        churn_s = [s for s in self.samples if s.phase == "churn"]
        out: dict[str, Any] = {}
        if self.events.get("autovacuum_off"):
            out["WARNING"] = "autovacuum is off on this server (SHOW autovacuum): nothing reclaims dead tuples"
        out |= {
            "phase 1 minutes": len(churn),
            "rate achieved (phase 1)": f"published {median([r['published_per_s'] for r in churn]) or 0:,.0f}"
                                       f" msg/s, consumed {median([r['consumed_per_s'] for r in churn]) or 0:,.0f}"
                                       f" msg/s (median of minutes)",
            "max dead tuples (phase 1)": f"{max(s.n_dead_tup for s in churn_s):,}",
            "max live tuples (phase 1)": f"{max(s.n_live_tup for s in churn_s):,}",
            "max size (phase 1)": f"{max(s.total_bytes for s in churn_s) / 2**20:.1f} MB "
                                  f"(end of phase 1: {churn_s[-1].total_bytes / 2**20:.1f} MB)",
            "autovacuums (phase 1)": churn_s[-1].autovacuum_count - self._av_before_phase1(),
            "HOT updates": f"{churn_s[-1].n_tup_hot_upd:,} of {churn_s[-1].n_tup_upd:,} updates",
        }
        if churn:
            first, last = churn[0], churn[-1]
            out["probe claim p50 / p99, first vs last minute"] = (
                f"{_fmt(first['probe_p50'])} / {_fmt(first['probe_p99'])} ms → "
                f"{_fmt(last['probe_p50'])} / {_fmt(last['probe_p99'])} ms")
            out["consumer claim p50 / p99, first vs last minute"] = (
                f"{_fmt(first['claim_p50'])} / {_fmt(first['claim_p99'])} ms → "
                f"{_fmt(last['claim_p50'])} / {_fmt(last['claim_p99'])} ms")
            out["end-to-end p50 / p99, first vs last minute"] = (
                f"{_fmt(first['e2e_p50'])} / {_fmt(first['e2e_p99'])} ms → "
                f"{_fmt(last['e2e_p50'])} / {_fmt(last['e2e_p99'])} ms")
        if snap:
            out.update(self._snapshot_summary(snap))
        return out

    def _av_before_phase1(self) -> int:
        return self.events.get("autovacuum_count_phase1_start", 0)

    def _snapshot_summary(self, snap: list[dict[str, Any]]) -> dict[str, Any]:
        e = self.events
        snap_s = [s for s in self.samples if s.phase == "snapshot"]
        out = {
            "phase 2: dead tuples": f"{e['dead_at_snapshot']:,} → {max(s.n_dead_tup for s in snap_s):,} "
                                    f"in {len(snap)} min",
            "phase 2: size": f"{e['total_bytes_at_snapshot'] / 2**20:.1f} → "
                             f"{max(s.total_bytes for s in snap_s) / 2**20:.1f} MB",
            "phase 2: autovacuums that ran anyway": snap_s[-1].autovacuum_count - e["autovacuum_count_at_snapshot"],
            "phase 2: probe claim p50 / p99, first vs last minute": (
                f"{_fmt(snap[0]['probe_p50'])} / {_fmt(snap[0]['probe_p99'])} ms → "
                f"{_fmt(snap[-1]['probe_p50'])} / {_fmt(snap[-1]['probe_p99'])} ms"),
            "phase 2: end-to-end p50 / p99, last minute": (
                f"{_fmt(snap[-1]['e2e_p50'])} / {_fmt(snap[-1]['e2e_p99'])} ms"),
        }
        if "recovery_thresholds" in e:
            b = e["recovery_thresholds"]
            vac = e.get("vacuum_after_release", {})
            out["recovery: thresholds"] = (
                f"an autovacuum finished after the release and dead ≤ {b['dead_max']:,} "
                f"(phase 1 peak after minute 1); probe p50 ≤ "
                f"{_fmt(b['probe_p50_limit'])} ms and p99 ≤ {_fmt(b['probe_p99_limit'])} ms "
                f"per {RECOVERY_SAMPLE_SECONDS:g} s window")
            out["recovery: claim latency back after"] = _secs(e.get("latency_recovered_after_s"))
            out["recovery: dead tuples back after"] = _secs(e.get("dead_recovered_after_s"))
            out["recovery: reclaimed by"] = _reclaimer(vac, e.get("dead_recovered_after_s"))
        return out


def _reclaimer(vac: dict[str, Any], dead_recovered_after: float | None) -> str:
    if vac.get("autovacuums_since_release"):
        after = vac.get("last_autovacuum_after_release_s")
        return (f"autovacuum ({vac['autovacuums_since_release']} run(s) after the release; "
                f"the last finished {after} s after it)")
    if vac.get("manual_vacuums_since_release"):
        return "a manual VACUUM (no autovacuum ran after the release)"
    # Claims may still be fast again (index entries get marked dead once the horizon
    # moves), but the dead row versions stay until a vacuum.
    return "nothing: no vacuum ran within the recovery window, the dead tuples are still there"


def _secs(value: float | None) -> str:
    return "not within the recovery window" if value is None else f"{value:.0f} s after the release"


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


class HeldSnapshot:
    """A session that takes a REPEATABLE READ snapshot and then sits idle in transaction,
    like an application that forgot to commit: its snapshot's xmin is the oldest, so no
    row version deleted after it started can be removed by anyone."""

    def __init__(self, url: str, schema: str, events: dict[str, Any], now) -> None:
        self.url, self.schema, self.events, self.now = url, schema, events, now
        self.conn: psycopg.Connection | None = None

    def _stats(self) -> tuple[int, int, int]:
        assert self.conn is not None
        return self.conn.execute(
            "SELECT n_dead_tup, autovacuum_count, pg_total_relation_size(relid) "
            "FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'messages'",
            (self.schema,)).fetchone()

    def __enter__(self) -> HeldSnapshot:  # noqa: PYI034  not subclassed
        self.conn = psycopg.connect(self.url, autocommit=True, application_name="bench_churn_idle")
        dead, autovacuums, size = self._stats()
        self.events.update(dead_at_snapshot=dead, autovacuum_count_at_snapshot=autovacuums,
                           total_bytes_at_snapshot=size)
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        self.conn.execute(sql.SQL("SELECT 1 FROM {}.queues LIMIT 1").format(
            sql.Identifier(self.schema)))
        self.events["snapshot_taken_at"] = round(self.now(), 1)
        progress("snapshot taken; session idle in transaction")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.conn is not None
        self.conn.execute("ROLLBACK")
        self.events["snapshot_released_at"] = round(self.now(), 1)
        self.events["snapshot_released_server"] = self.conn.execute("SELECT now()").fetchone()[0]
        self.events["autovacuum_count_at_release"] = self._stats()[1]
        self.events["vacuum_count_at_release"] = self.conn.execute(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'messages'",
            (self.schema,)).fetchone()[0]
        self.conn.close()
        progress("snapshot released")


# -- entry point -----------------------------------------------------------------------------


_LEGEND = (
    "Dead/live tuples: `pg_stat_user_tables` (sampled every {every:g} s; max over the minute, "
    "and the last sample). Probe claim: one claim of ≤ 1 message + its ack, timed from a "
    "dedicated session. Consumer claim: the Kombu consumers' claim statements (batches up to "
    "prefetch/2). End-to-end: publish call to consumer callback."
)


def markdown(churn: Churn) -> str:
    minutes = by_minute(churn.samples, churn.phase_starts)
    recovery = [s for s in churn.samples if s.phase == "recovery"]
    parts = ["## kombu-pg sustained churn", "", info_table(churn.info()), "",
             "### Per minute", "", minute_table(minutes), "",
             _LEGEND.format(every=churn.args.sample_seconds), "",
             "### Summary", "", summary_lines(churn.summary())]
    if recovery:
        parts += ["", "### Recovery, every 5 s after the release", "", _recovery_table(churn, recovery)]
    return "\n".join(parts) + "\n"


def _recovery_table(churn: Churn, samples: list[Sample]) -> str:
    released = churn.events["snapshot_released_at"]
    lines = [("| s after release | dead | live | size MB | autovacuums | vacuum running "
              "| probe p50 / p99 ms | claim scan buffers |"), "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for s in samples:
        lines.append(
            f"| {s.t - released:.0f} | {s.n_dead_tup:,} | {s.n_live_tup:,} | {s.total_bytes / 2**20:.1f} "
            f"| {s.autovacuum_count} | {'yes' if s.vacuum_running else ''} "
            f"| {_fmt(percentile(s.probe_ms, 50))} / {_fmt(percentile(s.probe_ms, 99))} "
            f"| {s.scan_buffers} |")
    return "\n".join(lines)


def to_json(churn: Churn) -> str:
    events = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in churn.events.items()}
    return json.dumps({
        "run": churn.info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(churn.args).items()},
        "summary": churn.summary(),
        "events": events,
        "phase_starts_s": churn.phase_starts,
        "minutes": [m.row() for m in by_minute(churn.samples, churn.phase_starts)],
        "samples": [s.summary() for s in churn.samples],
    }, indent=2, default=str)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # run the finally blocks: children stopped, database dropped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    db = create_scratch(args.pg_url, "churn" + secrets.token_hex(4))
    progress(f"scratch database {db.name} on {redact(db.admin_url) if db.embedded is None else db.origin}")
    churn = Churn(args, db)
    churn.load_at_start = load
    status = 0
    try:
        try:
            churn.run()
        except Exception as exc:  # noqa: BLE001  still report what was measured up to here
            progress(f"run failed: {type(exc).__name__}: {exc}")
            status = 1
        finally:
            churn.close()
        if any(s.phase == "churn" for s in churn.samples):
            print(markdown(churn))
            if args.json:
                args.json.write_text(to_json(churn))
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        if churn.monitor is not None:
            churn.monitor.close()
        db.drop()
    return status


if __name__ == "__main__":
    sys.exit(main())
