"""The results example's Celery app: PostgreSQL as broker *and* result backend."""

import os

from celery import Celery

import kombu_pg  # noqa: F401  (registers postgresql:// with Kombu)

URL = os.environ["KOMBU_PG_URL"]
SCHEMA = os.environ.get("KOMBU_PG_SCHEMA", "kombu_pg")

app = Celery("results_app", broker=URL, backend=URL)
app.conf.broker_transport_options = {"schema": SCHEMA}
app.conf.result_backend_transport_options = {"schema": SCHEMA}
app.conf.result_extended = True        # store name, args, worker, queue... with results
app.conf.task_track_started = True     # store STARTED (and date_started)
app.conf.result_expires = 3600         # rows expire after an hour; beat runs the cleanup


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    return sum(values)


@app.task
def fail(message):
    raise ValueError(message)
