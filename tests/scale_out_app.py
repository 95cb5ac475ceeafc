"""The Celery app test_scale_out runs on each "host" (a network namespace).

Configured from the environment:

- ``KOMBU_PG_URL`` / ``KOMBU_PG_SCHEMA``: the broker, reached over the host's veth;
- ``SCALE_OUT_TRANSPORT_OPTIONS``: JSON, merged into ``broker_transport_options``
  (recovery interval, keepalive ``connect_kwargs``); its ``connect_kwargs`` also apply
  to the task log's connection;
- ``SCALE_OUT_HOLD_ON``: a worker-name prefix (``a@``); tasks running on a worker with
  that name never finish there, standing for work in progress when its host is cut off.

Tasks record each start and end in ``<schema>.task_log`` (made by the test), on the same
server, so the test sees which host ran what and when.
"""

from __future__ import annotations

import json
import os
import threading
import time

import psycopg
from celery import Celery
from psycopg import sql
from psycopg.conninfo import make_conninfo

import kombu_pg  # noqa: F401  (registers the postgresql:// scheme)

URL = os.environ["KOMBU_PG_URL"]
SCHEMA = os.environ["KOMBU_PG_SCHEMA"]
OPTIONS: dict = json.loads(os.environ.get("SCALE_OUT_TRANSPORT_OPTIONS") or "{}")
HOLD_ON = os.environ.get("SCALE_OUT_HOLD_ON", "")
#: Longer than any test: a held task is still "in progress" when the test kills its worker.
HOLD_SECONDS = 600.0

app = Celery("scale_out_app", broker=URL)
app.conf.broker_transport_options = {"schema": SCHEMA, **OPTIONS}
app.conf.worker_prefetch_multiplier = 4
# A cut-off host must keep running its tasks: only the broker decides on redelivery.
app.conf.worker_cancel_long_running_tasks_on_connection_loss = False
app.conf.broker_connection_retry_on_startup = True

_log_conn: psycopg.Connection | None = None


def _log_connection() -> psycopg.Connection:
    global _log_conn
    if _log_conn is None or _log_conn.closed or _log_conn.broken:
        # The broker's keepalive settings too: a cut-off host's log session ends with it.
        conninfo = make_conninfo(URL, **OPTIONS.get("connect_kwargs", {}))
        _log_conn = psycopg.connect(conninfo, autocommit=True, application_name="scale_out_log")
    return _log_conn


def _log(task, phase: str, arg: str) -> None:
    request = task.request
    _log_connection().execute(
        sql.SQL("INSERT INTO {}.task_log (task_id, task, arg, phase, hostname, redelivered, at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)").format(sql.Identifier(SCHEMA)),
        (request.id, task.name.rsplit(".", 1)[-1], arg, phase, request.hostname,
         bool((request.delivery_info or {}).get("redelivered")), time.time()),
    )


def _work(task, arg: str) -> None:
    _log(task, "start", arg)
    if HOLD_ON and (task.request.hostname or "").startswith(HOLD_ON):
        # The workload of a task caught on the host that will be cut off: it outlasts the
        # test (which kills this worker), so its message is never acked from here.
        threading.Event().wait(HOLD_SECONDS)
        return
    _log(task, "end", arg)


@app.task(bind=True)
def hold(self, arg: str) -> None:
    """Early ack (Celery's default): acked when it starts, so never redelivered."""
    _work(self, arg)


@app.task(bind=True, acks_late=True)
def hold_late(self, arg: str) -> None:
    """Late ack: acked when it returns, so redelivered if its worker's host is lost."""
    _work(self, arg)


@app.task(bind=True, acks_late=True)
def quick(self, arg: str) -> None:
    """Finishes wherever it runs."""
    _log(self, "start", arg)
    _log(self, "end", arg)
