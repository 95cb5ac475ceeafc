"""The Celery app the result-backend end-to-end tests run in a real worker subprocess.

kombu-pg is both the broker and the result backend.  Configured from the environment:
KOMBU_PG_URL (server), KOMBU_PG_SCHEMA (schema for broker and results).
"""

import os

from celery import Celery

import kombu_pg  # noqa: F401  (registers postgresql:// for the broker)

URL = os.environ["KOMBU_PG_URL"]
SCHEMA = os.environ["KOMBU_PG_SCHEMA"]

app = Celery("backend_app", broker=URL, backend=URL)
app.conf.broker_transport_options = {"schema": SCHEMA}
app.conf.result_backend_transport_options = {"schema": SCHEMA}
app.conf.result_extended = True
app.conf.task_track_started = True
app.conf.worker_prefetch_multiplier = 4


class TaskFailed(Exception):
    """Raised on purpose; the client must get this type back."""


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def xsum(values):
    return sum(_flatten(values))


def _flatten(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


@app.task
def double(x):
    return 2 * x


@app.task
def fail(*args):
    raise TaskFailed(*args)


@app.task
def blob(size):
    return b"\xab" * size


@app.task
def identity(value):
    return value


@app.task(bind=True)
def add_to_own_chord(self, value):
    """A chord header task that adds one more task to its chord."""
    self.add_to_chord(add.si(value, value))
    return value


@app.task
def fan_out(n):
    """Sends n children with kombu_pg.bulk.send_many (they must be recorded as children)."""
    from kombu_pg.bulk import send_many

    return [r.id for r in send_many(add.s(i, i) for i in range(n))]
