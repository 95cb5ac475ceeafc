"""Prometheus metrics for the DLQ, read from the database at scrape time.

Every capture path (pool children, the worker's main process, the reaper, the backstop
sweep) bumps ``dlq_counters`` in the same statement that writes the DLQ row, so the
counter is exact under prefork (no per-process registries to merge) and survives
restarts.  Size and age gauges come from one query per scrape, built fresh each time,
so a label set that is gone (an emptied reason) disappears instead of going stale.

Labels come from fixed sets: ``reason`` (five values), ``queue_kind``
(parallel/serial) and ``task`` (a task registered in the app, else ``other``); never a
task id, serial key or message text.

    from prometheus_client import REGISTRY
    from celery_dlq.metrics import DLQCollector
    REGISTRY.register(DLQCollector(app))

or ``celery_dlq.metrics.start_http_server(app, 9808)``.
"""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .ext import install
from .store import QUEUE_KINDS, REASONS

logger = logging.getLogger("celery_dlq")

OTHER_TASK = "other"


class DLQCollector:
    """A prometheus_client collector over the DLQ tables of one app."""

    def __init__(self, app, *, known_tasks=None) -> None:
        self.app = app
        self.runtime = install(app)
        self._known = set(known_tasks) if known_tasks is not None else None

    def _task_label(self, name: str | None) -> str:
        known = self._known if self._known is not None else set(self.app.tasks.keys())
        return name if name and name in known else OTHER_TASK

    @staticmethod
    def _label(value: str, allowed: tuple[str, ...]) -> str:
        return value if value in allowed else OTHER_TASK

    def collect(self):
        added = CounterMetricFamily(
            "celery_dlq_added", "Messages added to the dead-letter queue (every capture path).",
            labels=("task", "reason", "queue_kind"))
        size = GaugeMetricFamily(
            "celery_dlq_size", "Dead-letter entries waiting for an operator (status dead).",
            labels=("task", "reason", "queue_kind"))
        age = GaugeMetricFamily(
            "celery_dlq_oldest_age_seconds", "Age of the oldest dead-letter entry waiting.",
            labels=("task", "reason", "queue_kind"))
        up = GaugeMetricFamily("celery_dlq_scrape_ok", "1 if the DLQ tables could be read.")
        try:
            with self.runtime._lock:
                store = self.runtime.read_store()
                counters = store.metrics_added()
                sizes = store.metrics_size()
        except Exception as exc:
            self.runtime.reset_connection()
            logger.error("celery_dlq: metrics query failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        totals: dict[tuple, float] = {}
        for task, reason, kind, value in counters:
            key = (self._task_label(task), self._label(reason, REASONS), self._label(kind, QUEUE_KINDS))
            totals[key] = totals.get(key, 0) + value
        for key, value in sorted(totals.items()):
            added.add_metric(list(key), value)
        grouped: dict[tuple, list] = {}
        for reason, kind, task, count, oldest in sizes:
            key = (self._task_label(task), self._label(reason, REASONS), self._label(kind, QUEUE_KINDS))
            entry = grouped.setdefault(key, [0, 0.0])
            entry[0] += count
            entry[1] = max(entry[1], float(oldest))
        for key, (count, oldest) in sorted(grouped.items()):
            size.add_metric(list(key), count)
            age.add_metric(list(key), oldest)
        up.add_metric([], 1)
        yield from (added, size, age, up)

    def describe(self):
        return []


def start_http_server(app, port: int = 9808, addr: str = "127.0.0.1"):
    """Serve the DLQ metrics (only them) on ``addr:port``; returns the server and thread."""
    from prometheus_client import CollectorRegistry
    from prometheus_client import start_http_server as _start

    registry = CollectorRegistry()
    registry.register(DLQCollector(app))
    return _start(port, addr=addr, registry=registry)
