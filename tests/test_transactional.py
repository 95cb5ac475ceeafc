"""Publishing inside the application's own transaction (psycopg, SQLAlchemy, Django)."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import psycopg
import pytest
from celery import Celery
from psycopg import sql

from kombu_pg.store import apply_migrations
from kombu_pg.store.wakeups import Listener
from kombu_pg.transactional import WrongDatabase, psycopg_connection, publish_in

from .worker import TESTS_DIR, CeleryWorker, wait_until


@pytest.fixture
def client(pg_url, schema, pg_conn):
    apply_migrations(pg_conn, schema)
    app = Celery("client", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    yield app
    app.close()


@pytest.fixture
def orders(pg_conn, schema):
    """The application's own table, in another schema than the queue's."""
    app_schema = f"app_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(sql.SQL("CREATE SCHEMA {s}; CREATE TABLE {s}.orders (id int, task_id text)").format(
        s=sql.Identifier(app_schema)))
    yield sql.SQL("{}.orders").format(sql.Identifier(app_schema))
    pg_conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(app_schema)))


def queued(pg_conn, schema) -> int:
    return pg_conn.execute(sql.SQL("SELECT count(*) FROM {}.messages").format(sql.Identifier(schema))).fetchone()[0]


def test_commit_publishes_rollback_never_existed(client, pg_url, pg_conn, schema, orders):
    sig = client.signature("celery_app.record", args=("x",))
    with psycopg.connect(pg_url) as conn:
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(orders))
        result = publish_in(conn, sig)
        conn.execute(sql.SQL("UPDATE {} SET task_id = %s").format(orders), (result.id,))
        # Nothing is visible before commit, and the library left the transaction open.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert queued(pg_conn, schema) == 0
        conn.rollback()
    assert queued(pg_conn, schema) == 0
    with psycopg.connect(pg_url) as conn:
        result = publish_in(conn, sig)
        conn.execute(sql.SQL("INSERT INTO {} VALUES (2, %s)").format(orders), (result.id,))
        conn.commit()
    payload = pg_conn.execute(sql.SQL("SELECT payload FROM {}.messages").format(sql.Identifier(schema))).fetchone()[0]
    assert result.id in payload
    assert pg_conn.execute(sql.SQL("SELECT task_id FROM {}").format(orders)).fetchone()[0] == result.id


def test_savepoint_rollback_discards_only_its_task(client, pg_url, pg_conn, schema):
    sig = client.signature("celery_app.record")
    with psycopg.connect(pg_url) as conn:
        kept = publish_in(conn, sig, args=("kept",))
        with pytest.raises(ZeroDivisionError):
            with conn.transaction():  # a savepoint
                publish_in(conn, sig, args=("discarded",))
                raise ZeroDivisionError
        conn.commit()
    rows = pg_conn.execute(sql.SQL("SELECT payload FROM {}.messages").format(sql.Identifier(schema))).fetchall()
    assert len(rows) == 1 and kept.id in rows[0][0]


def test_notify_is_sent_on_commit_only(client, pg_url, schema):
    listener = Listener(pg_url, f"{schema}:queues")
    try:
        with psycopg.connect(pg_url) as conn:
            publish_in(conn, client.signature("celery_app.record", args=(1,)))
            assert listener.wait(0.3) == set()
            conn.commit()
        assert listener.wait(5) == {"celery"}
    finally:
        listener.close()


def test_concurrent_transactions_deliver_exactly_the_committed(client, pg_url, pg_conn, schema):
    committed = []

    def work(n):
        with psycopg.connect(pg_url) as conn:
            result = publish_in(conn, client.signature("celery_app.record", args=(n,)))
            if n % 2:
                conn.rollback()
            else:
                conn.commit()
                committed.append(result.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    payloads = [r[0] for r in pg_conn.execute(sql.SQL("SELECT payload FROM {}.messages").format(
        sql.Identifier(schema)))]
    assert sorted(tid for tid in committed if any(tid in p for p in payloads)) == sorted(committed)
    assert len(payloads) == 5


PRODUCER = """
import os, sys, psycopg, kombu_pg
from celery import Celery
from kombu_pg.transactional import publish_in
url, schema, commit = sys.argv[1], sys.argv[2], sys.argv[3] == "commit"
app = Celery("p", broker=url)
app.conf.broker_transport_options = {"schema": schema}
conn = psycopg.connect(url)
publish_in(conn, app.signature("celery_app.record", args=(sys.argv[3],)))
if commit:
    conn.commit()
os._exit(0)  # dies without closing anything
"""


@pytest.mark.parametrize("commit", [True, False])
def test_producer_crash_loses_nothing_committed_and_delivers_nothing_uncommitted(
        client, pg_url, pg_conn, schema, commit):
    subprocess.run([sys.executable, "-c", PRODUCER, pg_url, schema, "commit" if commit else "crash"],
                   check=True, timeout=60)
    # The crashed session's open transaction is rolled back when the server notices it.
    wait_until(lambda: not pg_conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%' AND datname = current_database()"
        " AND query LIKE '%%messages%%'").fetchone()[0], what="the crashed session to end")
    assert queued(pg_conn, schema) == (1 if commit else 0)


@pytest.mark.slow
def test_a_worker_runs_the_committed_task(client, pg_url, schema, task_log, worker_env):
    with CeleryWorker("celery_app", worker_env) as worker:
        worker.wait_ready()
        with psycopg.connect(pg_url) as conn:
            publish_in(conn, client.signature("celery_app.record", args=("rolled back",)))
            conn.rollback()
            publish_in(conn, client.signature("celery_app.record", args=("committed",)), countdown=0.1)
            conn.commit()
        wait_until(lambda: task_log("record"), what="the committed task")
        client.send_task("celery_app.record", ("marker",))
        wait_until(lambda: len(task_log("record")) == 2, what="a later task")
    assert [r[1] for r in task_log("record")] == ["committed", "marker"]


def test_wrong_database_is_a_clear_error(client, pg_url, pg_conn):
    other = f"kombu_pg_other_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        info = psycopg.conninfo.conninfo_to_dict(pg_url)
        info["dbname"] = other
        with psycopg.connect(psycopg.conninfo.make_conninfo(**info)) as conn:
            with pytest.raises(WrongDatabase, match=other):
                publish_in(conn, client.signature("celery_app.record"))
    finally:
        pg_conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(other)))


def test_missing_schema_is_a_clear_error(pg_url):
    app = Celery("c", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": "never_migrated"}
    with psycopg.connect(pg_url) as conn:
        with pytest.raises(WrongDatabase, match="pg migrate"):
            publish_in(conn, app.signature("celery_app.record"))


def test_sqlalchemy_session(client, pg_url, pg_conn, schema):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    info = psycopg.conninfo.conninfo_to_dict(pg_url)
    engine = sqlalchemy.create_engine("postgresql+psycopg://", connect_args=info)
    try:
        with Session(engine) as session:
            publish_in(session, client.signature("celery_app.record", args=("sa",)))
            session.rollback()
            publish_in(session, client.signature("celery_app.record", args=("sa",)))
            assert queued(pg_conn, schema) == 0
            session.commit()
        assert queued(pg_conn, schema) == 1
    finally:
        engine.dispose()


def test_django_atomic(client, pg_url, pg_conn, schema):
    pytest.importorskip("django")
    script = TESTS_DIR / "django_publish.py"
    result = subprocess.run([sys.executable, str(script), pg_url, schema], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert queued(pg_conn, schema) == 1


def test_rejects_what_is_not_a_psycopg3_connection():
    with pytest.raises(TypeError, match="psycopg 3"):
        psycopg_connection(object())
