"""Periodic tasks kept in PostgreSQL: run several beats, each tick is published once.

    export KOMBU_PG_URL=postgresql://user@localhost/db
    celery -A beat_app worker -l info                     # in examples/
    celery -A beat_app beat -l info                       # run two or three of these
    celery -A beat_app pg schedule list
    celery -A beat_app pg schedule add greet beat_app.hello --every 3 --args '["runtime"]'
    celery -A beat_app pg schedule disable greet
    celery -A beat_app pg schedule run report
"""

import os

from celery import Celery
from celery.schedules import crontab

import kombu_pg  # noqa: F401  (registers postgresql:// with Kombu)

app = Celery("beat_app", broker=os.environ["KOMBU_PG_URL"])
app.conf.broker_transport_options = {"schema": os.environ.get("BEAT_DEMO_SCHEMA", "beat_demo")}
app.conf.beat_scheduler = "kombu_pg.beat:Scheduler"
app.conf.timezone = "Europe/Berlin"  # crontab entries follow this zone, DST included
app.conf.beat_schedule = {
    # Synced into <schema>.beat_entries when a beat starts.
    "heartbeat": {"task": "beat_app.hello", "schedule": 10.0, "args": ("heartbeat",)},
    "report": {
        "task": "beat_app.hello", "schedule": crontab(minute="*/5"), "args": ("report",),
        # Any apply_async option: queue, priority, expires, headers (serial_key, job_key).
        "options": {"expires": 240, "headers": {"serial_key": "report"}},
        # Ticks missed while no beat ran: "once" (default), "skip" or "catchup".
        "missed": "catchup",
    },
}


@app.task
def hello(name):
    print(f"tick: {name}")
