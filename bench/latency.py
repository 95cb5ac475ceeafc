"""Celery level, interactive latency: what a web request waiting on a task sees.

* **request-response**: ``delay().get()`` back to back (no pause between calls: the next
  request's publish follows the previous result within milliseconds), threads and prefork
  workers; p50/p99.  A debounced NOTIFY used to cost this pattern ~40 ms per call.
* **gap-sweep** (threads pool): single ``delay()`` calls spaced by a fixed gap since the
  previous publish (0.5 to 60 ms, then idle: 200 ms); pickup latency (publish to task
  start, see :mod:`bench.celery_level`) p50 per gap.
"""

from __future__ import annotations

import time

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from .brokers import Broker, delete_entities
from .celery_app import NOOP, ROUNDTRIP
from .celery_level import PREFORK, THREADS, _close, _has_backend, _with_backend, celery_setup
from .scenarios import Context, Measured, Metric, percentile, progress, scenario
from .worker import Worker

#: Gaps between consecutive publishes (seconds); the last one leaves the worker idle.
GAPS_S = (0.0005, 0.002, 0.005, 0.015, 0.030, 0.060, 0.200)
_READY_TIMEOUT_S = 90.0
_SAMPLE_TIMEOUT_S = 10.0


def _gap_key(gap: float) -> str:
    return f"gap_{gap * 1000:g}ms".replace(".", "_")


@scenario(
    "request-response",
    "Celery level: `delay().get()` back to back (no pause between calls), "
    f"`celery worker {THREADS.label}` and `{PREFORK.label}`",
    [Metric(f"{pool.name}_p{p}", f"{pool.name} p{p} ms", unit="ms")
     for pool in (THREADS, PREFORK) for p in (50, 99)],
    applies=_has_backend,
    row_label=_with_backend,
)
def request_response(ctx: Context, broker: Broker) -> Measured:
    out = Measured()
    for pool in (THREADS, PREFORK):
        queue, cfg, app = celery_setup(ctx, broker, pool, "rr")
        try:
            with Worker(cfg, pool, f"{queue}-worker", ctx.probe.address, ctx.log_dir) as worker:
                if not _ready(ctx, worker, out):
                    continue
                values, lost = _back_to_back(app, ctx.params.samples)
                if values:
                    for p in (50, 99):
                        out.values[f"{pool.name}_p{p}"] = percentile(values, p) * 1000
                out.notes.append(f"{pool.name}: {len(values)} calls" + (f", {lost} lost" if lost else ""))
        finally:
            _close(app)
            delete_entities(broker, [queue])
    return out


@scenario(
    "gap-sweep",
    f"Celery level: pickup p50 of a `delay()` that follows the previous one by a fixed gap, "
    f"`celery worker {THREADS.label}`",
    [Metric(_gap_key(gap), f"{'idle' if gap == GAPS_S[-1] else f'{gap * 1000:g} ms'} p50 ms", unit="ms")
     for gap in GAPS_S],
    applies=_has_backend,
)
def gap_sweep(ctx: Context, broker: Broker) -> Measured:
    out = Measured()
    queue, cfg, app = celery_setup(ctx, broker, THREADS, "gaps")
    try:
        with Worker(cfg, THREADS, f"{queue}-worker", ctx.probe.address, ctx.log_dir) as worker:
            if not _ready(ctx, worker, out):
                return out
            # At least 20 per gap: a p50 of fewer says little (a quick run stays < 10 s).
            per_gap = max(ctx.params.samples // 4, 20)
            for gap in GAPS_S:
                pickups = _spaced(ctx, app, f"{queue}-{_gap_key(gap)}", gap, per_gap)
                if pickups:
                    out.values[_gap_key(gap)] = percentile(pickups, 50) * 1000
                if len(pickups) < per_gap:
                    out.notes.append(f"{gap * 1000:g} ms: {per_gap - len(pickups)} of {per_gap} lost")
    finally:
        _close(app)
        delete_entities(broker, [queue])
    return out


def _ready(ctx: Context, worker: Worker, out: Measured) -> bool:
    if ctx.probe.ready(worker.token, _READY_TIMEOUT_S, worker.alive) is None:
        out.notes.append("worker never became ready: " + worker.log_tail(3).replace("\n", " | "))
        return False
    progress(f"  worker {worker.pool.label} ready")
    return True


def _back_to_back(app: Celery, n: int) -> tuple[list[float], int]:
    """Seconds of ``n`` sequential ``delay().get()`` calls (after one warm-up), and how
    many timed out."""
    roundtrip = app.tasks[ROUNDTRIP]
    roundtrip.delay().get(timeout=_READY_TIMEOUT_S)  # connections and queues in place
    values: list[float] = []
    lost = 0
    for _ in range(n):
        started = time.perf_counter()
        result = roundtrip.delay()
        try:
            result.get(timeout=_SAMPLE_TIMEOUT_S)
        except CeleryTimeout:
            lost += 1
            continue
        values.append(time.perf_counter() - started)
        # No forget(): it would be one more round trip between the calls.
    return values, lost


def _spaced(ctx: Context, app: Celery, phase: str, gap: float, n: int) -> list[float]:
    """Publish ``n`` no-op tasks ``gap`` seconds apart (publish start to publish start);
    their pickup latencies."""
    noop = app.tasks[NOOP]
    noop.delay(f"{phase}-warmup", 0)
    published: list[float] = []
    next_at = time.monotonic() + 0.2  # the warm-up task is done by then
    for seq in range(n):
        time.sleep(max(0.0, next_at - time.monotonic()))  # the gap is the scenario
        next_at = time.monotonic() + gap
        published.append(time.time())
        noop.delay(phase, seq)
    pickups = []
    for seq, at in enumerate(published):
        times = ctx.probe.task(phase, seq, _SAMPLE_TIMEOUT_S)
        if times is not None:
            pickups.append(times[0] - at)
    return pickups

