"""Django integration check, run in its own process (Django settings are process-wide).

Usage: python django_publish.py URL SCHEMA — one task rolled back inside
transaction.atomic, one committed.
"""

import sys

import django
from django.conf import settings
from psycopg.conninfo import conninfo_to_dict

url, schema = sys.argv[1], sys.argv[2]
info = conninfo_to_dict(url)
settings.configure(DATABASES={"default": {
    "ENGINE": "django.db.backends.postgresql", "NAME": info.get("dbname", "postgres"),
    "USER": info.get("user", "postgres"), "PASSWORD": info.get("password", ""),
    "HOST": info.get("host", ""), "PORT": info.get("port", ""),
}})
django.setup()

from celery import Celery  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from kombu_pg.transactional import publish_in  # noqa: E402

app = Celery("django_client", broker=url)
app.conf.broker_transport_options = {"schema": schema}


class Boom(Exception):
    pass


try:
    with transaction.atomic():
        publish_in(connection, app.signature("celery_app.record", args=("rolled back",)))
        raise Boom
except Boom:
    pass
with transaction.atomic():
    publish_in(connection, app.signature("celery_app.record", args=("committed",)))
