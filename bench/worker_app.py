"""Entry point for the ``celery worker`` subprocess: ``celery -A bench.worker_app worker``.

Builds the app from ``$BENCH_CELERY`` and announces, via the probe, the moment the
worker's consumer loop starts; drain throughput is measured from that moment.
"""

from __future__ import annotations

import os
import time

from celery.signals import worker_ready

from . import probe
from .celery_app import CONFIG_ENV, TOKEN_ENV, AppConfig, make_app

app = make_app(AppConfig.from_json(os.environ[CONFIG_ENV]))


@worker_ready.connect
def _announce_ready(**_: object) -> None:
    # Sent by Celery right before the consumer's event loop starts fetching messages.
    probe.send(os.environ[TOKEN_ENV], "ready", time.time())
