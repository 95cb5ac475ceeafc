"""The demo's Celery app: an unchanged Celery app whose broker is PostgreSQL."""

import os
import time

from celery import Celery

import kombu_pg  # noqa: F401  (registers postgresql:// with Kombu)

app = Celery("demo_app", broker=os.environ["KOMBU_PG_URL"])
app.conf.task_acks_late = True


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, max_retries=3)
def unreliable(self, attempts_needed):
    if self.request.retries + 1 < attempts_needed:
        raise self.retry(countdown=0.2)
    return f"succeeded on attempt {self.request.retries + 1}"


@app.task
def stamp(label):
    return f"{label} ran at {time.strftime('%H:%M:%S')}"
