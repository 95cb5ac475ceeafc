"""Celery level: a no-op task published with ``delay()`` and run by a real ``celery worker``.

Per broker and worker pool:

1. **publish**: with no worker running, N single ``delay()`` calls (after one warm-up call
   that opens the connection and declares the queue); tasks/s until the last call returns.
2. **drain**: start ``celery worker``; from its ``worker_ready`` signal (sent right before
   its consumer loop starts fetching) to the end of the last of the N tasks, as reported
   by each task over UDP (see :mod:`bench.probe`); tasks/s = N / that interval.
3. **pickup** (threads pool only): on the now idle worker, one ``delay()`` at a time;
   latency from just before ``delay()`` to the task body starting (``time.time()`` on both
   sides, same machine); p50/p95.
4. **round trip** (threads pool only): ``delay().get()`` of a task whose result is stored
   in the broker's usual result backend; p50/p95.  ``forget()`` runs after the clock stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import kombu.pools
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from .brokers import Broker, delete_entities
from .celery_app import NOOP, ROUNDTRIP, AppConfig, make_app
from .scenarios import (
    Context,
    Measured,
    Metric,
    latency_ms,
    progress,
    sample_sequentially,
    scenario,
)
from .worker import Pool, Worker

THREADS = Pool("threads", 4)
PREFORK = Pool("prefork", 2)
PREFETCH_MULTIPLIER = 4

_READY_TIMEOUT_S = 90.0  # worker start-up on a loaded 2-vCPU machine can take a while
_SAMPLE_TIMEOUT_S = 10.0  # one latency sample; beyond this it counts as lost

_THROUGHPUT = [Metric("publish", "publish tasks/s"), Metric("drain", "worker drain tasks/s")]
_LATENCY = [
    Metric("pickup_p50", "pickup p50 ms", unit="ms"),
    Metric("pickup_p95", "pickup p95 ms", unit="ms"),
    Metric("roundtrip_p50", "`delay().get()` p50 ms", unit="ms"),
    Metric("roundtrip_p95", "`delay().get()` p95 ms", unit="ms"),
]


def _has_backend(broker: Broker) -> bool:
    return broker.backend is not None


def _title(pool: Pool) -> str:
    return (
        f"Celery level: no-op task, `celery worker {pool.label}`, "
        f"prefetch multiplier {PREFETCH_MULTIPLIER}"
    )


def _with_backend(broker: Broker) -> str:
    return f"{broker.label} / {broker.backend_label}"


@scenario(
    "celery_threads",
    _title(THREADS),
    _THROUGHPUT + _LATENCY,
    applies=_has_backend,
    row_label=_with_backend,
)
def celery_threads(ctx: Context, broker: Broker) -> Measured:
    return run_celery(ctx, broker, THREADS, with_latency=True)


@scenario(
    "celery_prefork",
    _title(PREFORK),
    _THROUGHPUT,
    applies=_has_backend,
    in_quick=False,
)
def celery_prefork(ctx: Context, broker: Broker) -> Measured:
    return run_celery(ctx, broker, PREFORK, with_latency=False)


def celery_setup(ctx: Context, broker: Broker, pool: Pool, kind: str) -> tuple[str, AppConfig, Celery]:
    """The run's own queue for this scenario, and the app config and app bound to it."""
    assert broker.backend is not None
    queue = ctx.name(kind, broker.key, pool.name)
    cfg = AppConfig(
        broker.url, broker.backend, queue, dict(broker.transport_options), PREFETCH_MULTIPLIER
    )
    return queue, cfg, make_app(cfg)


def run_celery(ctx: Context, broker: Broker, pool: Pool, *, with_latency: bool) -> Measured:
    queue, cfg, app = celery_setup(ctx, broker, pool, "celery")
    out = Measured()
    try:
        out.values["publish"] = _publish(app, f"{queue}-drain", ctx.params.tasks)
        with Worker(cfg, pool, f"{queue}-worker", ctx.probe.address, ctx.log_dir) as worker:
            _drain(ctx, worker, f"{queue}-drain", out)
            if with_latency and "drain" in out.values:
                _latencies(ctx, app, f"{queue}-pickup", out)
    finally:
        _close(app)
        delete_entities(broker, [queue])
    return out


def _close(app: Celery) -> None:
    """Close the app's broker and backend connections now: ``Celery.close()`` only drops
    its pool, leaving sessions (and the rpc reply consumer) idle through later scenarios."""
    close_backend = getattr(app.backend, "close", None)  # not every backend has one
    if callable(close_backend):
        close_backend()
    app.close()
    # Broker pools are process-wide in Kombu, keyed by URL, so the next scenario's app
    # would inherit these connections; nothing else in the bench process uses them.
    kombu.pools.reset()


def _publish(app: Celery, phase: str, n: int) -> float:
    noop = app.tasks[NOOP]
    noop.delay(f"{phase}-warmup", 0)  # connects and declares; its task is not counted
    started = time.perf_counter()
    for seq in range(n):
        noop.delay(phase, seq)
    return n / (time.perf_counter() - started)


def _drain(ctx: Context, worker: Worker, phase: str, out: Measured) -> None:
    ready = ctx.probe.ready(worker.token, _READY_TIMEOUT_S, worker.alive)
    if ready is None:
        out.notes.append("worker never became ready: " + worker.log_tail(3).replace("\n", " | "))
        return
    progress(
        f"  worker {worker.pool.label} ready after {time.time() - worker.started:.1f} s; draining"
    )
    n = ctx.params.tasks
    count = ctx.probe.wait_count(phase, n, ctx.params.stall_timeout_s, worker.alive)
    if count < n:
        dropped = ctx.probe.dropped()
        lost = f" ({dropped} reports dropped: raise net.core.rmem_max)" if dropped else ""
        out.notes.append(f"drain stalled: {count} of {n} tasks reported{lost}")
        progress(f"  drain stalled; worker log ends:\n{worker.log_tail()}")
        return
    last_end = max(end for _, end in ctx.probe.tasks(phase).values())
    out.values["drain"] = n / (last_end - ready)


def _latencies(ctx: Context, app: Celery, phase: str, out: Measured) -> None:
    for prefix, one in (
        ("pickup", _pickup_sample(ctx, app, phase)),
        ("roundtrip", _roundtrip_sample(app)),
    ):
        samples = sample_sequentially(ctx.params, one)
        out.values.update(latency_ms(samples, prefix))
        out.notes.append(samples.describe(prefix))


def _pickup_sample(ctx: Context, app: Celery, phase: str) -> Callable[[int], float | None]:
    noop = app.tasks[NOOP]

    def one(seq: int) -> float | None:
        published = time.time()
        noop.delay(phase, seq)
        times = ctx.probe.task(phase, seq, _SAMPLE_TIMEOUT_S)
        return None if times is None else times[0] - published

    return one


def _roundtrip_sample(app: Celery) -> Callable[[int], float | None]:
    roundtrip = app.tasks[ROUNDTRIP]

    def one(_: int) -> float | None:
        started = time.perf_counter()
        result = roundtrip.delay()
        try:
            result.get(timeout=_SAMPLE_TIMEOUT_S)
        except CeleryTimeout:
            return None
        elapsed = time.perf_counter() - started
        result.forget()
        return elapsed

    return one
