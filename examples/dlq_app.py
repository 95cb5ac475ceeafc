"""An app with the dead-letter queue on: kombu-pg broker, DLQ in the same database."""

import os

from celery import Celery

import celery_dlq
import kombu_pg  # noqa: F401  (registers postgresql:// with Kombu)
from celery_dlq import NonRetryable, retry_policy

url = os.environ["KOMBU_PG_URL"]
schema = os.environ.get("DLQ_DEMO_SCHEMA", "dlq_demo")
app = Celery("dlq_app", broker=url, backend=url)
app.conf.update(
    # poison messages stop after 3 deliveries; the DLQ table lives in the same schema
    broker_transport_options={"schema": schema, "max_deliveries": 3},
    result_backend_transport_options={"schema": schema},
    result_extended=True,  # lets the backstop sweep rebuild a failure it must recover
    dlq_reap_interval=30.0,  # beat runs celery_dlq.reap every 30 s (with `celery beat` or -B)
)
celery_dlq.install(app)  # the one line


class CardDeclined(NonRetryable):
    """Retrying will not help: straight to the DLQ, no retry burned."""


class GatewayTimeout(Exception):
    """Transient: retried by Celery per the "fast" preset, DLQ when exhausted."""


@app.task(autoretry_for=(Exception,), **retry_policy("fast"))
def charge(order_id, amount):
    if amount > 1000:
        raise CardDeclined(f"order {order_id}: card declined")
    if amount < 0:
        raise GatewayTimeout(f"order {order_id}: gateway timed out")
    return f"charged {amount} for order {order_id}"


@app.task
def add(x, y):
    return x + y
