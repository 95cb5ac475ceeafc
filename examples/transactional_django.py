"""Publish a Celery task inside Django's transaction.atomic().

Run:  KOMBU_PG_URL=postgresql://... python examples/transactional_django.py
(without KOMBU_PG_URL an embedded PostgreSQL is started).  Needs `pip install django`
(Django 4.2+ with psycopg 3).  A minimal single-file Django configuration.
"""

from __future__ import annotations

import django
from django.conf import settings
from psycopg.conninfo import conninfo_to_dict

from kombu_pg.embedded import database_url
from kombu_pg.store import apply_migrations, connect

url, server = database_url()
info = conninfo_to_dict(url)
settings.configure(DATABASES={"default": {
    "ENGINE": "django.db.backends.postgresql", "NAME": info.get("dbname", "postgres"),
    "USER": info.get("user", "postgres"), "PASSWORD": info.get("password", ""),
    "HOST": info.get("host", ""), "PORT": info.get("port", ""),
}})
django.setup()

from celery import Celery  # noqa: E402
from django.db import connection, transaction  # noqa: E402

import kombu_pg  # noqa: E402,F401
from kombu_pg.transactional import publish_in  # noqa: E402

app = Celery("shop", broker=url)
notify_customer = app.signature("shop.notify_customer")


def place_order(order_id: int, fail: bool) -> None:
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO example_orders (id) VALUES (%s)", [order_id])
        publish_in(connection, notify_customer.clone(args=(order_id,)))
        if fail:
            raise ValueError("out of stock")


try:
    with connect(url) as conn:
        apply_migrations(conn, "kombu_pg")
        conn.execute("CREATE TABLE IF NOT EXISTS example_orders (id int PRIMARY KEY)")
    place_order(1, fail=False)
    try:
        place_order(2, fail=True)
    except ValueError as exc:
        print("order 2 rolled back:", exc)
    with connect(url) as conn:
        print("orders:", [r[0] for r in conn.execute("SELECT id FROM example_orders ORDER BY id")])
        waiting = conn.execute("SELECT count(*) FROM kombu_pg.messages WHERE payload LIKE '%%notify_customer%%'")
        print("tasks waiting for a worker:", waiting.fetchone()[0])
        conn.execute("DELETE FROM kombu_pg.messages WHERE payload LIKE '%%notify_customer%%'")
        conn.execute("DROP TABLE example_orders")
finally:
    connection.close()
    if server is not None:
        server.stop()
