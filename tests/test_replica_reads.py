"""Read-only tools on a read replica (issue 18, item 5).

A private primary and a streaming standby (``PrimaryAndStandby``); replay on the standby
is paused once it has caught up, then the primary gets one more message and DLQ entry.
So a figure from the standby differs from the primary's, which tells where each tool read:
``kombu-pg status`` and the metrics exporter with ``--replica-url``/``replica_conninfo``,
``celery dlq list/show/stats`` and the HTTP admin's GETs with ``dlq_replica_url``.  Write
commands with a replica configured still go to the primary and succeed there.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner

from celery_dlq.cli import EXIT_NOT_FOUND, EXIT_OK, dlq
from celery_dlq.http import DLQAdmin
from celery_dlq.store import DLQStore, Entry
from kombu_pg.cli import pg
from kombu_pg.metrics import build_registry
from kombu_pg.store import BrokerStore

from .dlq_app import make_app, setup_schema
from .test_dlq_http import Server, request
from .test_dlq_store import kombu_message
from .test_metrics import samples, value
from .worker import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("pgserver", reason="the primary and standby are run from pgserver's binaries")
    from .scale_out_server import PrimaryAndStandby

    try:
        servers = PrimaryAndStandby(synchronous=False)
    except Exception as exc:  # no way to run a primary and a standby here: say why
        pytest.skip(f"cannot start a private primary and streaming standby: {exc!r}")
    yield servers
    servers.stop()


def _capture(conn: psycopg.Connection, schema: str) -> int:
    task_id = str(uuid.uuid4())
    return DLQStore(conn, schema).capture(Entry(message=kombu_message(task_id), reason="non_retryable",
                                                source="signal", task_id=task_id, task_name="proj.a",
                                                queue="celery"))[0]


@pytest.fixture
def lagging(pair):
    """Schema with 1 message + 2 DLQ rows on both servers, then 2 + 3 on the primary only."""
    schema = f"r_{uuid.uuid4().hex[:12]}"
    primary, replica = pair.primary.url("127.0.0.1"), pair.standby.url("127.0.0.1")
    setup_schema(primary, schema)
    with psycopg.connect(primary, autocommit=True) as conn:
        BrokerStore(conn, schema).publish("celery", "one")
        replicated = [_capture(conn, schema) for _ in range(2)]
        wait_until(pair.replayed, what="the standby replaying the setup")
        with psycopg.connect(replica, autocommit=True) as standby:
            standby.execute("SELECT pg_wal_replay_pause()")
        try:
            BrokerStore(conn, schema).publish("celery", "two")
            primary_only = _capture(conn, schema)
            yield {"schema": schema, "primary": primary, "replica": replica, "conn": conn,
                   "replicated": replicated, "primary_only": primary_only}
        finally:
            with psycopg.connect(replica, autocommit=True) as standby:
                standby.execute("SELECT pg_wal_replay_resume()")


def _status(*args: str) -> dict:
    result = CliRunner().invoke(pg, [*args, "status", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_kombu_pg_status_reads_the_replica(lagging):
    base = ["--url", lagging["primary"], "--schema", lagging["schema"]]
    on_replica = _status(*base, "--replica-url", lagging["replica"])
    on_primary = _status(*base)
    ready = lambda report: {q["queue"]: q["ready"] for q in report["queues"]}["celery"]  # noqa: E731
    assert (ready(on_replica), on_replica["dead_letters"]) == (1, 2)
    assert (ready(on_primary), on_primary["dead_letters"]) == (2, 3)


def test_metrics_exporter_reads_the_replica(lagging):
    def ready(**replica) -> float | None:
        registry = build_registry(conninfo=lagging["primary"], schema=lagging["schema"], events=False,
                                  min_interval=0, **replica)
        return value(samples(registry), "kombu_pg_queue_ready_messages", queue="celery")

    assert ready(replica_conninfo=lagging["replica"]) == 1
    assert ready() == 2


def _dlq(app, *args: str):
    return CliRunner().invoke(dlq, list(args), obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))


def test_dlq_reads_go_to_the_replica_and_writes_to_the_primary(lagging):
    app = make_app(lagging["primary"], lagging["schema"])
    try:
        replica = ["--replica-url", lagging["replica"]]
        listed = _dlq(app, *replica, "list", "--json")
        assert listed.exit_code == EXIT_OK, listed.output
        assert sorted(e["id"] for e in json.loads(listed.output)["rows"]) == sorted(lagging["replicated"])
        stats = _dlq(app, *replica, "stats", "--json")
        assert stats.exit_code == EXIT_OK, stats.output
        assert json.loads(stats.output)["total"] == 2
        # Only on the primary yet: not found on the replica.
        assert _dlq(app, *replica, "show", str(lagging["primary_only"])).exit_code == EXIT_NOT_FOUND

        # The HTTP admin's GETs read there too (same app, dlq_replica_url now set).
        server = Server(DLQAdmin(app))
        try:
            assert request(f"{server.base}/api/entries/{lagging['primary_only']}")[0] == 404
            assert request(f"{server.base}/api/entries/{lagging['replicated'][0]}")[0] == 200
            assert request(f"{server.base}/api/stats")[2]["total"] == 2
        finally:
            server.close()

        # A write with the replica configured goes to the primary (replay is paused, and a
        # standby refuses writes anyway): it succeeds and the row is gone there.
        deleted = _dlq(app, *replica, "delete", str(lagging["primary_only"]), "--json")
        assert deleted.exit_code == EXIT_OK, deleted.output
        gone = lagging["conn"].execute(
            psycopg.sql.SQL("SELECT count(*) FROM {}.dlq WHERE id = %s").format(psycopg.sql.Identifier(
                lagging["schema"])), (lagging["primary_only"],)).fetchone()[0]
        assert gone == 0
    finally:
        app._celery_dlq.close()
