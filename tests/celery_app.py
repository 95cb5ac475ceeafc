"""The Celery app the end-to-end tests run in a real worker subprocess.

Configured from the environment (KOMBU_PG_URL, KOMBU_PG_SCHEMA; optionally NATIVE_DELAY,
RECOVERY_INTERVAL, POLLING_INTERVAL, PREFETCH_MULTIPLIER, TASK_QUEUE); tasks write what they
did to ``<schema>.task_log`` so tests can check it with SQL.
"""

import os

import psycopg
from celery import Celery
from psycopg import sql

import kombu_pg  # noqa: F401

URL = os.environ["KOMBU_PG_URL"]
SCHEMA = os.environ["KOMBU_PG_SCHEMA"]

app = Celery("celery_app", broker=URL)
app.conf.broker_transport_options = {
    "schema": SCHEMA,
    # A test that must tell a NOTIFY wake-up from a poll makes both intervals long.
    "recovery_interval": float(os.environ.get("RECOVERY_INTERVAL", "0.5")),
    "native_delayed_delivery": os.environ.get("NATIVE_DELAY") == "1",
    **({"polling_interval": float(os.environ["POLLING_INTERVAL"])} if "POLLING_INTERVAL" in os.environ else {}),
}
app.conf.worker_prefetch_multiplier = int(os.environ.get("PREFETCH_MULTIPLIER", "4"))
app.conf.task_default_queue = os.environ.get("TASK_QUEUE", "celery")
app.conf.worker_cancel_long_running_tasks_on_connection_loss = False


def log(task: str, arg, attempt: int = 0, redelivered: bool = False) -> None:
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {}.task_log (task, arg, attempt, redelivered) VALUES (%s, %s, %s, %s)")
            .format(sql.Identifier(SCHEMA)),
            (task, str(arg), attempt, redelivered),
        )


class Flaky(Exception):
    pass


@app.task
def record(arg):
    log("record", arg)
    return arg


@app.task(bind=True, max_retries=2)
def retrying(self, arg):
    log("retrying", arg, self.request.retries)
    if self.request.retries < 2:
        raise self.retry(countdown=0.2)


@app.task(bind=True, autoretry_for=(Flaky,), max_retries=3, default_retry_delay=0.1)
def autoretrying(self, arg):
    log("autoretrying", arg, self.request.retries)
    raise Flaky(arg)


@app.task(bind=True, acks_late=True)
def slow(self, arg, seconds=1.0):
    log("slow-start", arg, redelivered=bool(self.request.delivery_info.get("redelivered")))
    import time

    time.sleep(seconds)  # the workload itself, not a synchronisation
    log("slow-end", arg)
