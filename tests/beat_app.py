"""The Celery app the beat tests run in real ``celery beat`` and ``celery worker`` processes.

Configured from the environment (KOMBU_PG_URL, KOMBU_PG_SCHEMA, BEAT_ENTRIES: which of the
entries below to schedule); the ``tick`` task records each run in ``<schema>.task_log``.
"""

import os

from celery import Celery
from celery.schedules import crontab

import kombu_pg  # noqa: F401
from celery_app import log

app = Celery("beat_app", broker=os.environ["KOMBU_PG_URL"])
app.conf.broker_transport_options = {"schema": os.environ["KOMBU_PG_SCHEMA"], "recovery_interval": 0.5}
app.conf.beat_scheduler = "kombu_pg.beat:Scheduler"
app.conf.beat_max_loop_interval = 1
app.conf.timezone = "UTC"

# catchup: a beat slowed down by a loaded machine still publishes every due time, so the
# tests can check the due times run without a gap.
ENTRIES = {
    "every-1s": {"task": "beat_app.tick", "schedule": 1.0, "args": ("every-1s",), "missed": "catchup"},
    "every-5s": {"task": "beat_app.tick", "schedule": 5.0, "args": ("every-5s",), "missed": "catchup"},
    "cron-minute": {"task": "beat_app.tick", "schedule": crontab(), "args": ("cron-minute",),
                    "missed": "catchup"},
}
app.conf.beat_schedule = {name: ENTRIES[name] for name in os.environ.get("BEAT_ENTRIES", "").split(",")
                          if name}


@app.task(name="beat_app.tick")
def tick(name):
    log("tick", name)
