"""Requeueing a job-keyed DLQ entry never overwrites a newer waiting task silently: it is
refused with the waiting task's id, unless forced; forced, the newer task is replaced and
marked REVOKED, and the result says so.  Python API, CLI and HTTP, on real rows."""

from __future__ import annotations

import json

import psycopg
import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner
from psycopg import sql

from celery_dlq import DLQ
from celery_dlq.capture import entry_from_message
from celery_dlq.cli import EXIT_OK, EXIT_REFUSED, dlq
from celery_dlq.http import DLQAdmin
from celery_dlq.store import REFUSED_JOB_KEY
from kombu_pg.jobs import Outcome, enqueue
from kombu_pg.store import BrokerStore

from .dlq_app import make_app, setup_schema
from .test_dlq_http import Server, request


class Env:
    """A client app on a migrated schema, its broker store, and a consumer id to claim with."""

    def __init__(self, url: str, schema: str, **conf) -> None:
        setup_schema(url, schema)
        self.schema = schema
        self.conn = conn = psycopg.connect(url, autocommit=True)
        self.app = make_app(url, schema, **conf)
        self.broker = BrokerStore(conn, schema)
        self.api = DLQ(self.app)
        self.consumer = self.broker.register_consumer()

    def publish(self, key: str, x: int) -> str:
        """A job-keyed task on the default queue (no worker consumes it here)."""
        job = enqueue(self.app.signature("dlq_app.ok", (x,)), key, app=self.app)
        assert job.outcome is Outcome.ENQUEUED
        return job.task_id

    def dead_letter_waiting(self) -> None:
        """Deliver the waiting message and reject it: the transport's dead-lettering."""
        [claimed] = self.broker.claim("celery", 1, self.consumer)
        assert self.broker.dead_letter(claimed.token, "rejected by consumer")

    def dead_job(self, key: str) -> tuple[int, str]:
        """(DLQ id, task id) of a job-keyed task that was published, then dead-lettered."""
        old = self.publish(key, 1)
        self.dead_letter_waiting()
        [row] = [r for r in self.api.list().rows if r["task_id"] == old]
        return row["id"], old

    def waiting(self, key: str) -> list[str]:
        """Task ids of the waiting messages holding ``key``."""
        return [json.loads(p)["headers"]["id"] for (p,) in self.conn.execute(
            sql.SQL("SELECT payload FROM {}.messages WHERE job_key = %s AND lock_token IS NULL")
            .format(sql.Identifier(self.schema)), (key,))]

    def state(self, task_id: str) -> str:
        return self.app.AsyncResult(task_id).state

    def close(self) -> None:
        self.api.close()
        self.conn.close()


@pytest.fixture
def env(pg_url, schema):
    e = Env(pg_url, schema)
    yield e
    e.close()


def cli(app, *args):
    return CliRunner().invoke(dlq, list(args), obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))


def test_python_api_refuses_then_force_replaces_and_revokes(env):
    row_id, old = env.dead_job("report:7")
    new = env.publish("report:7", 2)

    [dry] = env.api.requeue([row_id], dry_run=True)
    assert (dry.requeued, dry.refused, dry.waiting_task_id) == (False, REFUSED_JOB_KEY, new)
    [refused] = env.api.requeue([row_id])
    assert (refused.requeued, refused.refused, refused.waiting_task_id) == (False, REFUSED_JOB_KEY, new)
    assert new in refused.detail and "force" in refused.detail
    assert env.waiting("report:7") == [new]  # untouched
    assert env.api.show(row_id)["status"] == "dead" and env.state(new) == "PENDING"

    [forced] = env.api.requeue([row_id], force=True, note="old payload wins")
    assert (forced.requeued, forced.job_outcome, forced.replaced_task_id) == (True, "replaced", new)
    assert new in forced.detail
    assert env.waiting("report:7") == [old]
    assert env.state(new) == "REVOKED"  # anything waiting on it gets an answer
    assert "replaced by task " + old in str(env.app.AsyncResult(new).info)
    assert env.api.show(row_id)["status"] == "requeued"


def test_cli_reports_the_refusal_and_the_forced_outcome(env):
    row_id, old = env.dead_job("report:8")
    new = env.publish("report:8", 2)

    dry = cli(env.app, "requeue", str(row_id), "--dry-run")
    assert dry.exit_code == EXIT_REFUSED and new in dry.output
    refused = cli(env.app, "requeue", str(row_id))
    assert refused.exit_code == EXIT_REFUSED, refused.output
    assert f"{row_id}: refused: task {new} with the same job key 'report:8' is waiting" in refused.output
    assert env.waiting("report:8") == [new]

    forced = cli(env.app, "requeue", str(row_id), "--force", "--json")
    assert forced.exit_code == EXIT_OK, forced.output
    [result] = json.loads(forced.output)
    assert (result["requeued"], result["job_outcome"], result["replaced_task_id"]) == (True, "replaced", new)
    assert env.waiting("report:8") == [old] and env.state(new) == "REVOKED"


def test_http_answers_409_with_the_reason_then_force_replaces(env):
    row_id, old = env.dead_job("report:9")
    new = env.publish("report:9", 2)
    server = Server(DLQAdmin(env.app))
    try:
        url = f"{server.base}/api/entries/{row_id}/requeue"
        status, _, err = request(url, "POST", {})
        assert status == 409 and err["error"] == "conflict", err
        assert err["result"]["refused"] == REFUSED_JOB_KEY and err["result"]["waiting_task_id"] == new
        assert new in err["message"]
        status, _, bulk = request(f"{server.base}/api/requeue", "POST", {"ids": [row_id]})
        assert status == 200 and bulk["requeued"] == 0 and bulk["results"][0]["refused"] == REFUSED_JOB_KEY
        assert env.waiting("report:9") == [new]

        status, _, result = request(url, "POST", {"force": True})
        assert status == 200, result
        assert (result["job_outcome"], result["replaced_task_id"]) == ("replaced", new)
    finally:
        server.close()
    assert env.waiting("report:9") == [old] and env.state(new) == "REVOKED"


def test_no_waiting_task_enqueues_and_an_in_flight_one_is_queued_behind(env):
    row_id, old = env.dead_job("sync:1")
    [result] = env.api.requeue([row_id])
    assert (result.requeued, result.job_outcome, result.replaced_task_id) == (True, "enqueued", None)
    assert env.waiting("sync:1") == [old]
    env.broker.ack([c.token for c in env.broker.claim("celery", 1, env.consumer)])  # it ran

    row_id, old = env.dead_job("sync:2")
    new = env.publish("sync:2", 2)
    [running] = env.broker.claim("celery", 1, env.consumer)  # the newer task is in flight
    assert json.loads(running.payload)["headers"]["id"] == new
    [result] = env.api.requeue([row_id])
    assert (result.requeued, result.job_outcome) == (True, "queued_behind_in_flight")
    assert env.waiting("sync:2") == [old] and env.state(new) == "PENDING"


def test_forced_requeue_over_its_own_waiting_copy_revokes_nothing(env):
    row_id, old = env.dead_job("sync:3")
    assert env.api.requeue([row_id])[0].requeued
    [again] = env.api.requeue([row_id], force=True)
    assert (again.requeued, again.job_outcome, again.replaced_task_id) == (True, "replaced", None)
    assert env.waiting("sync:3") == [old] and env.state(old) == "PENDING"


def test_send_task_path_on_kombu_pg_never_overwrites_either(pg_url, schema):
    """The DLQ in another schema than the broker: requeue goes through send_task, whose
    publish carries the job key; it is refused the same way, unless forced."""
    dlq_schema = f"{schema}_dlq"
    e = Env(pg_url, schema, dlq_schema=dlq_schema)
    try:
        assert not e.api.settings.atomic
        old = e.publish("mail:1", 1)
        [claimed] = e.broker.claim("celery", 1, e.consumer)
        # The capture a worker's signal makes, into the DLQ's own schema.
        entry = entry_from_message(json.loads(claimed.payload), reason="non_retryable", source="worker",
                                   exc=ValueError("boom"), traceback=None, worker="w1")
        row_id = e.api.runtime.store().capture(entry)[0]
        e.broker.ack([claimed.token])
        new = e.publish("mail:1", 2)

        [refused] = e.api.requeue([row_id])
        assert (refused.requeued, refused.refused) == (False, REFUSED_JOB_KEY)
        assert e.waiting("mail:1") == [new] and e.api.show(row_id)["status"] == "dead"

        [forced] = e.api.requeue([row_id], force=True)
        assert (forced.requeued, forced.job_outcome, forced.replaced_task_id) == (True, "replaced", new)
        assert e.waiting("mail:1") == [old] and e.state(new) == "REVOKED"
    finally:
        e.conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(dlq_schema)))
        e.close()
