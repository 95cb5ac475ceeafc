"""A Celery app that never imports kombu_pg: the installed distribution registers
postgresql:// (docs/ecosystem.md).

    export KOMBU_PG_URL=postgresql://postgres@127.0.0.1:5432/test
    celery -A url_only_app worker -l info          # in examples/
    celery -A url_only_app flower                  # Broker tab lists the queues
    python url_only_app.py                         # sends add(2, 3), prints 5
"""

import os

from celery import Celery

app = Celery("url_only_app")
app.conf.broker_url = os.environ["KOMBU_PG_URL"]
app.conf.result_backend = os.environ["KOMBU_PG_URL"]


@app.task
def add(x, y):
    return x + y


if __name__ == "__main__":
    print(add.delay(2, 3).get(timeout=30))
