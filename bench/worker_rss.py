"""Celery level: the worker's memory after draining N no-op tasks, kombu_pg vs Redis.

The run of :mod:`bench.celery_level` (N tasks published, a real ``celery worker`` started
and drained from a full queue), then, one second after the last task reported, the memory
of the worker's process tree:

* **main RSS**: the ``celery worker`` process;
* **total RSS**: it and every child (prefork pool processes); pages the children share
  with the parent (copy-on-write after fork) count once per process;
* **total PSS**: the same tree with each shared page divided among its sharers: the memory
  the worker really takes.

Read with psutil when it is installed, else from ``/proc`` (Linux).  The RSS at the
``worker_ready`` signal, before the first task, is in the notes.  The target (issue #9):
kombu_pg within 10 % of Redis, i.e. a ratio (kombu_pg ÷ Redis) of at most 1.10.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .brokers import Broker, delete_entities
from .celery_level import PREFORK, THREADS, _close, _drain, _publish, celery_setup
from .scenarios import Context, Measured, Metric, scenario
from .worker import Pool, Worker

TARGET_RATIO = 1.10
_SETTLE_S = 1.0  # after the last task: acks flushed, the pool back to idle
_MB = 1024 * 1024

_METRICS = [
    Metric("main_rss", "main RSS MB", unit="MB"),
    Metric("total_rss", "main + children RSS MB", unit="MB"),
    Metric("total_pss", "main + children PSS MB", unit="MB"),
]


def _compared(broker: Broker) -> bool:
    return broker.key in ("kombu_pg", "redis") and broker.backend is not None


def _title(pool: Pool) -> str:
    return (
        f"Celery worker memory after draining N no-op tasks, `celery worker {pool.label}` "
        "(MB, lower is better: a ratio below 1 means kombu_pg is smaller)"
    )


@scenario("rss_threads", _title(THREADS), _METRICS, applies=_compared)
def rss_threads(ctx: Context, broker: Broker) -> Measured:
    return worker_memory(ctx, broker, THREADS)


@scenario("rss_prefork", _title(PREFORK), _METRICS, applies=_compared, in_quick=False)
def rss_prefork(ctx: Context, broker: Broker) -> Measured:
    return worker_memory(ctx, broker, PREFORK)


def worker_memory(ctx: Context, broker: Broker, pool: Pool) -> Measured:
    queue, cfg, app = celery_setup(ctx, broker, pool, "rss")
    out = Measured()
    phase = f"{queue}-drain"
    try:
        _publish(app, phase, ctx.params.tasks)
        with Worker(cfg, pool, f"{queue}-worker", ctx.probe.address, ctx.log_dir) as worker:
            if ctx.probe.ready(worker.token, 90.0, worker.alive) is not None:
                ready = tree_memory(worker.pid)
                out.notes.append(
                    f"at ready: main {ready['main_rss']:.0f}, total {ready['total_rss']:.0f} MB RSS"
                )
            _drain(ctx, worker, phase, out)  # waits for ready itself, notes a stall
            if "drain" in out.values:
                time.sleep(_SETTLE_S)
                out.values.update(tree_memory(worker.pid))
                out.notes.append(f"{out.values['drain']:,.0f} tasks/s drained")
    finally:
        _close(app)
        delete_entities(broker, [queue])
    return out


def tree_memory(pid: int) -> dict[str, float]:
    """``main_rss``, ``total_rss`` and (where the OS tells) ``total_pss`` of ``pid`` and its
    descendants, in MB."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_memory(pid)
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    out = {
        "main_rss": root.memory_info().rss / _MB,
        "total_rss": sum(p.memory_info().rss for p in tree) / _MB,
    }
    try:
        out["total_pss"] = sum(p.memory_full_info().pss for p in tree) / _MB
    except (AttributeError, psutil.AccessDenied):
        pass  # no PSS on this OS
    return out


def _proc_tree_memory(pid: int) -> dict[str, float]:
    tree = [pid, *_descendants(pid)]
    out = {
        "main_rss": _kb(Path(f"/proc/{pid}/status"), "VmRSS:") / 1024,
        "total_rss": sum(_kb(Path(f"/proc/{p}/status"), "VmRSS:") for p in tree) / 1024,
    }
    try:
        out["total_pss"] = sum(_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in tree) / 1024
    except OSError:
        pass  # kernel before 4.14
    return out


def _kb(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise OSError(f"no {field} in {path}")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name, in parentheses, may hold spaces: the ppid follows the last ")".
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found
