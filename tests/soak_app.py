"""The Celery app of the chaos soak (``tests/test_soak.py``), run by real ``celery worker``s.

It is :mod:`chaos_app`'s app and task log (same environment variables), plus:

- the soak's queues (``soak_support.QUEUES``; each worker picks its queues with ``-Q``);
- the dead-letter queue (``celery_dlq.install``);
- ``soak.work``: a late-ack task that logs ``start`` and ``end`` rows around its work, so
  the soak can tell completed runs from interrupted ones and check serial-key overlap.
"""

from __future__ import annotations

import time

import celery_dlq
from celery_dlq.store import DLQ_ID_HEADER
from chaos_app import app, log
from soak_support import QUEUES

app.conf.task_queues = QUEUES
celery_dlq.install(app)


class Failed(celery_dlq.NonRetryable):
    """A ``fail`` message's error: straight to the DLQ, never retried."""


@app.task(bind=True, acks_late=True, name="soak.work")
def work(self, arg: str, seconds: float = 0.0, fail: bool = False) -> None:
    """``fail``: raise, unless requeued from the DLQ (then its DLQ row must become resolved)."""
    log(self, "start", arg)
    time.sleep(seconds)  # the task's workload: long enough for faults to hit running tasks
    log(self, "end", arg)
    if fail and (self.request.headers or {}).get(DLQ_ID_HEADER) is None:
        raise Failed(arg)
