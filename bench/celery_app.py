"""The Celery app both sides use: the bench process publishes with it, the worker runs it.

One factory builds it from an :class:`AppConfig`, which the bench process hands to the
worker subprocess as JSON in ``$BENCH_CELERY`` (see :mod:`bench.worker_app`), so the two
can never disagree about queue, transport options or backend.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery

from . import probe

CONFIG_ENV = "BENCH_CELERY"
#: Environment variable naming the worker in its ready datagram (see bench.worker_app).
TOKEN_ENV = "BENCH_WORKER_TOKEN"
NOOP = "bench.noop"
ROUNDTRIP = "bench.roundtrip"


@dataclass(frozen=True)
class AppConfig:
    broker_url: str
    backend_url: str
    queue: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    prefetch_multiplier: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AppConfig:
        return cls(**json.loads(text))


def make_app(cfg: AppConfig) -> Celery:
    import kombu_pg  # noqa: F401  registers postgresql:// with Kombu, here and in the worker

    app = Celery("bench", broker=cfg.broker_url, backend=cfg.backend_url, set_as_current=False)
    app.conf.update(
        # A queue (and direct exchange) of the run's own, so a shared Redis or RabbitMQ
        # never mixes our tasks with anyone else's and cleanup knows what to delete.
        task_default_queue=cfg.queue,
        broker_transport_options=dict(cfg.transport_options),
        worker_prefetch_multiplier=cfg.prefetch_multiplier,
        broker_connection_retry_on_startup=True,
        # Results outlive the run only on Redis; let them expire instead of piling up.
        result_expires=600,
    )
    _register_tasks(app)
    return app


def _register_tasks(app: Celery) -> None:
    # The drain and pickup task stores no result: those rows measure the broker alone.
    @app.task(name=NOOP, ignore_result=True, shared=False)
    def noop(phase: str, seq: int) -> None:
        started = time.time()
        probe.send(phase, "task", seq, started, time.time())

    # The round-trip task stores its (empty) result, so delay().get() goes through the backend.
    @app.task(name=ROUNDTRIP, shared=False)
    def roundtrip() -> None:
        return None
