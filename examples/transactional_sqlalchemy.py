"""Publish a Celery task in the same SQLAlchemy transaction as the data it needs.

Run:  KOMBU_PG_URL=postgresql://... python examples/transactional_sqlalchemy.py
(without KOMBU_PG_URL an embedded PostgreSQL is started).  Needs `pip install sqlalchemy`.
"""

from __future__ import annotations

import os

from celery import Celery
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import Column, Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Session

import kombu_pg  # noqa: F401
from kombu_pg.embedded import database_url
from kombu_pg.store import apply_migrations, connect
from kombu_pg.transactional import publish_in


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"
    id = Column(Integer, primary_key=True)
    receipt_task = Column(String)


def main() -> None:
    url, server = database_url()
    try:
        app = Celery("shop", broker=url)
        with connect(url) as conn:
            apply_migrations(conn, "kombu_pg")  # what `celery -A shop pg migrate` does
        engine = create_engine("postgresql+psycopg://", connect_args=conninfo_to_dict(url))
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        send_receipt = app.signature("shop.send_receipt")

        with Session(engine) as session, session.begin():
            task_id = publish_in(session, send_receipt.clone(args=(1,))).id
            session.add(Order(id=1, receipt_task=task_id))
        print("order 1 committed with its task", task_id)

        try:
            with Session(engine) as session, session.begin():
                session.add(Order(id=2))
                publish_in(session, send_receipt.clone(args=(2,)))
                raise RuntimeError("payment declined")
        except RuntimeError as exc:
            print("order 2 rolled back:", exc)

        with Session(engine) as session:
            print("orders:", session.scalars(select(Order.id)).all())
        with connect(url) as conn:
            tasks = conn.execute("SELECT count(*) FROM kombu_pg.messages WHERE payload LIKE '%%send_receipt%%'")
            print("tasks waiting for a worker:", tasks.fetchone()[0])
            conn.execute("DELETE FROM kombu_pg.messages WHERE payload LIKE '%%send_receipt%%'")
        Base.metadata.drop_all(engine)
        engine.dispose()
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
