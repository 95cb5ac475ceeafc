"""Job keys: a second enqueue with the same key replaces (or keeps) the waiting task.

Run:  KOMBU_PG_URL=postgresql://... python examples/job_keys.py
(without KOMBU_PG_URL an embedded PostgreSQL is started).  No worker is needed: it only
shows the outcomes and what waits in the queue.
"""

from celery import Celery

import kombu_pg  # noqa: F401
from kombu_pg import priorities
from kombu_pg.embedded import database_url
from kombu_pg.jobs import enqueue
from kombu_pg.store import connect

url, server = database_url()
try:
    app = Celery("jobs_example", broker=url, backend=url)
    app.conf.broker_transport_options = {"schema": "job_keys_example"}
    app.conf.result_backend_transport_options = {"schema": "job_keys_example"}
    reindex = app.signature("search.reindex_user", args=(42,))

    first = enqueue(reindex, "reindex:42")
    print("first: ", first.outcome.value, first.task_id)
    second = enqueue(reindex, "reindex:42", priority=priorities.FAST_HIGH)
    print("second:", second.outcome.value, "- replaced", second.replaced_task_id)
    print("        the first task is now", app.AsyncResult(first.task_id).state)
    third = enqueue(reindex, "reindex:42", mode="keep")
    print("third: ", third.outcome.value, "- its task will never run")
    with connect(url) as conn:
        rows = conn.execute("SELECT job_key, priority FROM job_keys_example.messages").fetchall()
        print("waiting:", rows)
        conn.execute("DROP SCHEMA job_keys_example CASCADE")
    app.close()
finally:
    if server is not None:
        server.stop()
