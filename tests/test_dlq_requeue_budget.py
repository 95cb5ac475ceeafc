"""Issue #21 with a real ``celery worker``: a requeue restores the retry budget and clears a
stored ``expires``; a requeued task that never runs goes back to dead; entries record
max_retries, publish time and job key; the backstop says what it can recover; a hand-written
``self.retry()`` follows the retry preset."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from celery.bin.base import CLIContext

from celery_dlq import DLQ, PRESETS
from celery_dlq.cli import dlq as dlq_cli
from celery_dlq.ext import BACKSTOP_UNRECOVERED
from celery_dlq.http import DLQAdmin

from .dlq_fixtures import client, db, env, set_switch  # noqa: F401 (fixtures)
from .worker import CeleryWorker, wait_until

pytestmark = pytest.mark.slow


def start_worker(env, queue="celery", **conf) -> CeleryWorker:
    w = CeleryWorker("dlq_app", {"KOMBU_PG_URL": env["url"], "DLQ_SCHEMA": env["schema"],
                                 "DLQ_CONF": json.dumps(conf)}, pool="prefork", concurrency=2, args=["-Q", queue])
    try:
        return w.wait_ready()
    except BaseException:
        w.stop()
        raise


@pytest.fixture(scope="module")
def worker(env):
    w = start_worker(env)
    yield w
    w.stop()


def entry(db, env, task_id, *, failures=1, status=None):
    """The DLQ row of ``task_id`` once it has ``failures`` failures (and ``status``)."""
    def get():
        row = db.execute(sql.SQL(
            "SELECT id, failure_count, status, notes, retries, max_retries, published_at, job_key, unrecovered, "
            "source FROM {}.dlq WHERE task_id = %s").format(sql.Identifier(env["schema"])), (task_id,)).fetchone()
        if row is None:
            return None
        row = dict(zip(("id", "failure_count", "status", "notes", "retries", "max_retries", "published_at",
                        "job_key", "unrecovered", "source"), row))
        ok = row["failure_count"] >= failures and (status is None or row["status"] == status)
        return row if ok else None
    return wait_until(get, timeout=40, what=f"DLQ row of {task_id} ({failures} failure(s), {status})")


def run_retries(db, env, task_id):
    return [r[0] for r in db.execute(sql.SQL("SELECT retries FROM {}.runs WHERE task_id = %s ORDER BY at")
                                     .format(sql.Identifier(env["schema"])), (task_id,))]


def run_times(db, env, task_id):
    return [r[0] for r in db.execute(sql.SQL("SELECT at FROM {}.runs WHERE task_id = %s ORDER BY at")
                                     .format(sql.Identifier(env["schema"])), (task_id,))]


# -- 1. requeue restores the retry budget; expires; a requeue that never runs -------------------


def test_requeue_restores_the_retry_budget_unless_kept(worker, client, db, env):
    """The "fast" preset (2 retries) always failing: after a requeue it runs retries 0, 1, 2
    again before going back to the DLQ; with keep_retries it runs once (retries 2)."""
    result = client.send_task("dlq_app.flaky", (1,))
    row = entry(db, env, result.id)
    assert run_retries(db, env, result.id) == [0, 1, 2] and row["retries"] == 2

    assert [r.requeued for r in DLQ(client).requeue([row["id"]])] == [True]
    again = entry(db, env, result.id, failures=2, status="dead")
    assert run_retries(db, env, result.id) == [0, 1, 2, 0, 1, 2]
    assert again["id"] == row["id"] and again["retries"] == 2

    assert [r.requeued for r in DLQ(client).requeue([row["id"]], keep_retries=True)] == [True]
    entry(db, env, result.id, failures=3, status="dead")
    assert run_retries(db, env, result.id) == [0, 1, 2, 0, 1, 2, 2]


def expire_stored_message(db, env, dlq_id):
    """Give the stored message an ``expires`` that has passed (as after a long stay)."""
    schema = sql.Identifier(env["schema"])
    message = json.loads(db.execute(sql.SQL("SELECT message FROM {}.dlq WHERE id = %s").format(schema),
                                    (dlq_id,)).fetchone()[0])
    message["headers"]["expires"] = "2001-01-01T00:00:00+00:00"
    db.execute(sql.SQL("UPDATE {}.dlq SET message = %s WHERE id = %s").format(schema),
               (json.dumps(message), dlq_id))


def test_requeue_clears_a_past_expires_unless_kept(worker, client, db, env):
    """A stored ``expires`` in the past: the requeued task runs.  With keep_expires the
    worker revokes it as expired on arrival, and the row is dead again with a note instead
    of staying ``requeued`` forever."""
    set_switch(db, env, True)
    result = client.send_task("dlq_app.switchable", (2,))
    row = entry(db, env, result.id)

    expire_stored_message(db, env, row["id"])
    assert [r.requeued for r in DLQ(client).requeue([row["id"]])] == [True]
    entry(db, env, result.id, failures=2, status="dead")  # it ran (and failed again)
    assert len(run_times(db, env, result.id)) == 2

    expire_stored_message(db, env, row["id"])
    assert [r.requeued for r in DLQ(client).requeue([row["id"]], keep_expires=True)] == [True]
    dead = wait_until(lambda: (lambda r: r if any("expired on arrival" in n for n in r["notes"]) else None)(
        entry(db, env, result.id, status="dead")), what="the expired requeue's note")
    assert dead["failure_count"] == 2 and len(run_times(db, env, result.id)) == 2  # it did not run


def test_requeued_task_revoked_before_it_runs_goes_back_to_dead(worker, client, db, env):
    set_switch(db, env, True)
    result = client.send_task("dlq_app.switchable", (3,))
    row = entry(db, env, result.id)
    set_switch(db, env, False)
    replies = client.control.revoke(result.id, reply=True, timeout=10, limit=1)
    assert replies, "the worker did not answer the revoke broadcast"

    assert [r.requeued for r in DLQ(client).requeue([row["id"]], note="retry after fix")] == [True]
    dead = entry(db, env, result.id, status="dead")
    assert dead["notes"][0] == "retry after fix"
    assert any("revoked on arrival" in note for note in dead["notes"]), dead["notes"]
    assert dead["failure_count"] == 1  # not a failure: it never ran
    assert len(run_times(db, env, result.id)) == 1


# -- 2. complete entries --------------------------------------------------------------------------


def test_entry_records_max_retries_publish_time_and_job_key(worker, client, db, env):
    """A signal capture keeps the retry limit, the original publish time (kept across
    retries) and the job key, which list filters on in the API, the CLI and over HTTP."""
    key = f"report:{uuid.uuid4().hex[:8]}"
    before = datetime.now(timezone.utc)
    result = client.send_task("dlq_app.flaky", (4,), headers={"job_key": key})
    after = datetime.now(timezone.utc)
    row = entry(db, env, result.id)
    assert row["max_retries"] == PRESETS["fast"].max_retries == 2
    assert row["job_key"] == key
    assert before <= row["published_at"] <= after  # the first publish, not the last retry's

    dlq = DLQ(client)
    page = dlq.list(job_key=key)
    assert (page.total, [r["id"] for r in page.rows]) == (1, [row["id"]])
    assert page.rows[0]["job_key"] == key
    shown = dlq.show(row["id"])
    assert (shown["job_key"], shown["max_retries"], shown["unrecovered"]) == (key, 2, [])

    out = CliRunner().invoke(dlq_cli, ["list", "--job-key", key, "--json"],
                             obj=CLIContext(app=client, no_color=True, workdir=None, quiet=True))
    assert out.exit_code == 0, out.output
    assert [r["id"] for r in json.loads(out.output)["rows"]] == [row["id"]]

    status, body = http_get(DLQAdmin(client), f"job_key={key}")
    assert status.startswith("200") and [r["id"] for r in body["rows"]] == [row["id"]]


def http_get(admin, query):
    import io

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/entries", "QUERY_STRING": query,
               "HTTP_HOST": "localhost", "wsgi.input": io.BytesIO(b""), "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
    seen = {}
    body = b"".join(admin(environ, lambda status, headers: seen.update(status=status)))
    return seen["status"], json.loads(body)


# -- 3. the backstop ------------------------------------------------------------------------------


def test_failed_write_says_the_sweep_recovers_it_and_the_entry_names_what_is_missing(worker, client, db, env):
    """The CRITICAL line says the sweep will recover the failure; the swept entry keeps the
    retry limit and lists the fields the result backend could not give back (show too)."""
    with psycopg.connect(env["url"]) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {}.dlq IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(env["schema"])))
        result = client.send_task("dlq_app.permanent", (6,), priority=5, headers={"tenant": "acme"})
        worker.wait_for_line(f"DLQ WRITE FAILED for task dlq_app.permanent[{result.id}]", timeout=30)
        blocker.rollback()
    line = next(l for l in worker.lines if f"DLQ WRITE FAILED for task dlq_app.permanent[{result.id}]" in l)
    assert "will recover it from its FAILURE result" in line and "NOT" not in line
    # The sweep (here run by the client: this worker runs no beat) skips results younger
    # than dlq_backstop_grace; it finds this one once it is old enough.
    wait_until(lambda: DLQ(client).reap()["swept"], what="the backstop sweep")
    row = entry(db, env, result.id)
    assert row["source"] == "backstop" and row["max_retries"] == 3
    assert row["unrecovered"] == list(BACKSTOP_UNRECOVERED)
    out = CliRunner().invoke(dlq_cli, ["show", str(row["id"])],
                             obj=CLIContext(app=client, no_color=True, workdir=None, quiet=True))
    assert out.exit_code == 0 and f"unrecovered: {list(BACKSTOP_UNRECOVERED)}" in out.output, out.output


def test_backstop_without_result_extended_is_named_at_start_and_in_the_critical_line(env, client, db):
    """result_extended off: the sweep cannot find the failure (no task name).  The worker
    says so once at start, naming the setting, and the CRITICAL line says the failure will
    not be recovered."""
    w = start_worker(env, "unextended", result_extended=False)  # the module's worker consumes "celery"
    try:
        starts = [l for l in w.lines if "backstop sweep is enabled" in l]
        # logged with logger.warning before the worker sets up its log format (no level shown)
        assert len(starts) == 1 and "set result_extended = True" in starts[0], w.output()
        with psycopg.connect(env["url"]) as blocker:
            blocker.execute(sql.SQL("LOCK TABLE {}.dlq IN ACCESS EXCLUSIVE MODE")
                            .format(sql.Identifier(env["schema"])))
            result = client.send_task("dlq_app.permanent", (7,), queue="unextended")
            w.wait_for_line(f"DLQ WRITE FAILED for task dlq_app.permanent[{result.id}]", timeout=30)
            blocker.rollback()
    finally:
        w.stop()
    line = next(l for l in w.lines if f"DLQ WRITE FAILED for task dlq_app.permanent[{result.id}]" in l)
    assert "will NOT recover it: set result_extended = True" in line, line


# -- 7. a hand-written self.retry() follows the preset ---------------------------------------------


def test_manual_retry_follows_the_retry_preset(worker, client, db, env):
    """self.retry() without a countdown: the "fast" preset's 1 s then 2 s (not Celery's
    default_retry_delay of 180 s), then the DLQ after 3 runs."""
    result = client.send_task("dlq_app.manual_policy", (8,))
    row = entry(db, env, result.id)
    times = run_times(db, env, result.id)
    delays = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    expected = PRESETS["fast"].delays()
    assert len(delays) == len(expected), delays
    for measured, wanted in zip(delays, expected):
        assert wanted - 0.05 <= measured <= wanted + 1.5, (delays, expected)
    assert run_retries(db, env, result.id) == [0, 1, 2] and row["retries"] == 2
