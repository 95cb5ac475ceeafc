"""Failure routing with a real ``celery worker`` (prefork pool, embedded beat running the
reaper every second): R1, R2, R3, R4, R5, A5, L2 and M2/M3 end to end."""

from __future__ import annotations

import base64
import json

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from psycopg import sql

from celery_dlq import DLQ, PRESETS
from celery_dlq.metrics import DLQCollector

from .dlq_fixtures import client, db, env, set_switch  # noqa: F401 (fixtures)
from .worker import CeleryWorker, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker(env):
    w = CeleryWorker(
        "dlq_app",
        {"KOMBU_PG_URL": env["url"], "DLQ_SCHEMA": env["schema"], "DLQ_BEAT_FILE": env["beat"],
         "DLQ_CONF": json.dumps({"dlq_reap_interval": 1.0})},
        pool="prefork", concurrency=2, args=["-B", "-Q", "celery,lastq"],
    )
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


def dlq_row(db, schema, task_id):
    row = db.execute(
        sql.SQL("SELECT id, reason, retries, failure_count, exception_type, source, status, message, queue "
                "FROM {}.dlq WHERE task_id = %s").format(sql.Identifier(schema)), (task_id,)).fetchone()
    if row is None:
        return None
    return dict(zip(("id", "reason", "retries", "failure_count", "exception_type", "source", "status",
                     "message", "queue"), row))


def runs(db, schema, task_id):
    return [r[0] for r in db.execute(
        sql.SQL("SELECT at FROM {}.runs WHERE task_id = %s ORDER BY at").format(sql.Identifier(schema)),
        (task_id,))]


def test_non_retryable_error_runs_once_and_is_dead_lettered_at_once(worker, client, db, env):
    """R1: autoretry_for=(Exception,) would retry it 3 times; a NonRetryable runs once."""
    result = client.send_task("dlq_app.permanent", (1,))
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), what="DLQ row")
    assert len(runs(db, env["schema"], result.id)) == 1
    assert row["reason"] == "non_retryable" and row["retries"] == 0 and row["failure_count"] == 1
    assert row["exception_type"].endswith("PermanentError")
    assert row["source"] == "trace"  # the pool child's task_failure
    # Classified by type: its message says "temporary", which changes nothing.


def test_configured_exception_class_is_not_retried(worker, client, db, env):
    """R1: classes listed in dlq_non_retryable_exceptions."""
    result = client.send_task("dlq_app.configured", (2,))
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), what="DLQ row")
    assert len(runs(db, env["schema"], result.id)) == 1
    assert row["reason"] == "non_retryable" and row["exception_type"].endswith("ConfiguredPermanent")


def test_retryable_error_follows_the_policy_then_reaches_the_dlq(worker, client, db, env):
    """R2: the "fast" preset: 3 runs, 1 s then 2 s apart, then the DLQ, exhausted."""
    result = client.send_task("dlq_app.flaky", (3,))
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), timeout=30, what="DLQ row")
    times = runs(db, env["schema"], result.id)
    delays = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    expected = PRESETS["fast"].delays()
    assert expected == [1, 2]
    assert len(delays) == len(expected), delays
    for measured, wanted in zip(delays, expected):
        assert wanted - 0.05 <= measured <= wanted + 1.5, (delays, expected)
    assert row["reason"] == "retries_exhausted" and row["retries"] == 2 and row["failure_count"] == 1
    assert row["exception_type"].endswith("Flaky")  # the original error, re-raised by autoretry


def test_manual_retry_exhaustion_is_recorded(worker, client, db, env):
    """R2: a bare self.retry() ends with MaxRetriesExceededError."""
    result = client.send_task("dlq_app.manual", (4,))
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), what="DLQ row")
    assert len(runs(db, env["schema"], result.id)) == 2
    assert row["reason"] == "retries_exhausted" and row["exception_type"].endswith("MaxRetriesExceededError")


def test_main_process_failures_are_captured_with_the_exact_message(worker, client, db, env):
    """R4: Reject(requeue=False) and a lost pool child report task_failure in the worker's
    main process, where task.request is empty: both are captured, with the message."""
    rejected = client.send_task("dlq_app.rejecting", (5,), priority=4)
    lost = client.send_task("dlq_app.dies", (6,))
    row = wait_until(lambda: dlq_row(db, env["schema"], rejected.id), what="rejected row")
    assert (row["reason"], row["source"]) == ("rejected", "worker")
    doc = json.loads(row["message"])
    assert doc["headers"]["id"] == rejected.id and doc["headers"]["task"] == "dlq_app.rejecting"
    assert doc["properties"]["delivery_info"]["routing_key"] == "celery" and row["queue"] == "celery"
    assert json.loads(base64.b64decode(doc["body"]))[0] == [5]
    assert doc["properties"]["priority"] == 4

    row = wait_until(lambda: dlq_row(db, env["schema"], lost.id), what="worker-lost row")
    assert row["source"] == "worker" and row["exception_type"].endswith("WorkerLostError")
    assert json.loads(row["message"])["headers"]["id"] == lost.id


def test_hard_time_limit_is_captured_in_the_main_process(worker, client, db, env):
    """R4: the hard time limit kills the child; task_failure fires in the main process."""
    result = client.send_task("dlq_app.hangs", (10,))
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), what="time-limit row")
    assert row["source"] == "worker" and row["exception_type"].endswith("TimeLimitExceeded"), row
    # Celery reports it twice (time limit, then the killed child): one capture.
    worker.wait_for_line(f"second failure report for the same delivery of {result.id}")
    assert dlq_row(db, env["schema"], result.id)["failure_count"] == 1
    assert json.loads(row["message"])["headers"]["id"] == result.id


def test_a_running_last_attempt_is_not_reaped_under_its_feet(worker, client, db, env):
    """A2 with the beat reaper running every second: a message on its last allowed
    delivery (delivery_count = max_deliveries while it runs) is locked, so it is left alone."""
    result = client.send_task("dlq_app.slow_ok", (3,), queue="staging")  # nobody consumes staging
    db.execute(sql.SQL("UPDATE {}.messages SET queue = 'lastq', delivery_count = 1 WHERE queue = 'staging'")
               .format(sql.Identifier(env["schema"])))
    db.execute("SELECT pg_notify(%s, 'lastq')", (f"{env['schema']}:queues",))
    assert result.get(timeout=30) == 3
    assert len(runs(db, env["schema"], result.id)) == 1
    assert dlq_row(db, env["schema"], result.id) is None


def test_poison_message_stops_after_max_deliveries_and_is_reaped(worker, client, db, env):
    """R3: it kills its pool child every time (reject_on_worker_lost requeues it); after
    max_deliveries=2 the broker stops delivering it and the beat reaper moves it."""
    result = client.send_task("dlq_app.poison", (7,))
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), timeout=40, what="reaped poison")
    assert row["reason"] == "max_deliveries" and row["source"] == "reaper"
    assert len(runs(db, env["schema"], result.id)) == 2
    left = db.execute(sql.SQL("SELECT count(*) FROM {}.messages WHERE payload LIKE %s")
                      .format(sql.Identifier(env["schema"])), (f"%{result.id}%",)).fetchone()[0]
    assert left == 0
    assert json.loads(row["message"])["headers"]["id"] == result.id  # the whole original message


def test_requeue_success_resolves_and_failure_updates_the_same_row(worker, client, db, env):
    """A5 + L2: the requeued message is linked to its row."""
    dlq = DLQ(client)
    set_switch(db, env, True)
    result = client.send_task("dlq_app.switchable", (8,))
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), what="DLQ row")

    set_switch(db, env, False)
    assert [r.requeued for r in dlq.requeue([row["id"]], note="fixed")] == [True]
    wait_until(lambda: dlq_row(db, env["schema"], result.id)["status"] == "resolved", what="resolved")
    assert len(runs(db, env["schema"], result.id)) == 2

    set_switch(db, env, True)
    assert [r.requeued for r in dlq.requeue([row["id"]])] == [False]  # resolved: not again by accident
    assert [r.requeued for r in dlq.requeue([row["id"]], force=True)] == [True]
    again = wait_until(lambda: (lambda r: r if r["failure_count"] == 2 else None)(
        dlq_row(db, env["schema"], result.id)), what="second failure")
    assert again["id"] == row["id"] and again["status"] == "dead"
    assert db.execute(sql.SQL("SELECT count(*) FROM {}.dlq WHERE task_id = %s")
                      .format(sql.Identifier(env["schema"])), (result.id,)).fetchone()[0] == 1
    assert dlq.show(row["id"])["notes"] == ["fixed"]


def test_failed_dlq_write_is_logged_and_swept_later(worker, client, db, env):
    """R5: the DLQ table is locked (a blip): the write fails loudly; the backstop sweep
    captures the FAILURE result afterwards."""
    with psycopg.connect(env["url"]) as blocker:
        blocker.execute(sql.SQL("LOCK TABLE {}.dlq IN ACCESS EXCLUSIVE MODE")
                        .format(sql.Identifier(env["schema"])))
        result = client.send_task("dlq_app.permanent", (9,))
        worker.wait_for_line(f"DLQ WRITE FAILED for task dlq_app.permanent[{result.id}]", timeout=30)
        blocker.rollback()
    row = wait_until(lambda: dlq_row(db, env["schema"], result.id), what="backstop capture")
    assert row["source"] == "backstop" and row["reason"] == "non_retryable"
    assert row["exception_type"].endswith("PermanentError")
    assert DLQ(client).reap()["swept"] == 0  # nothing twice


def test_metrics_count_every_capture_across_pool_children(worker, client, db, env):
    """M2 + M3: captures made in prefork children, the main process and the reaper are all
    counted (database-derived, read at scrape time)."""
    registry = CollectorRegistry()
    registry.register(DLQCollector(client))
    text = generate_latest(registry).decode()
    captured = db.execute(sql.SQL("SELECT coalesce(sum(failure_count), 0) FROM {}.dlq")
                          .format(sql.Identifier(env["schema"]))).fetchone()[0]
    added = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("celery_dlq_added_total{"))
    assert captured > 0 and added == captured
    for reason in ("non_retryable", "retries_exhausted", "max_deliveries", "rejected"):
        assert f'reason="{reason}"' in text


# -- a requeued entry that fails again, by every path, updates its row (issue #16 item 9) -------


def row_after(db, env, task_id, failures):
    """The DLQ row of ``task_id`` once it has recorded ``failures`` failures."""
    return wait_until(lambda: (lambda r: r if r and r["failure_count"] >= failures else None)(
        dlq_row(db, env["schema"], task_id)), timeout=40, what=f"failure {failures} of {task_id}")


def test_requeued_message_rejected_by_the_broker_again_updates_its_row(worker, client, db, env):
    """An unknown task name: the worker's consumer rejects it (no task_failure signal), the
    transport dead-letters it (reject_to_dlq).  Requeued, it is rejected again: the same row
    goes back to dead with failure_count 2, instead of staying 'requeued' forever."""
    result = client.send_task("dlq_app.not_registered", (11,))
    row = row_after(db, env, result.id, 1)
    assert (row["reason"], row["source"], row["status"]) == ("rejected", "broker", "dead")
    assert [r.requeued for r in DLQ(client).requeue([row["id"]])] == [True]
    again = row_after(db, env, result.id, 2)
    assert (again["id"], again["status"], again["reason"], again["source"]) == (row["id"], "dead", "rejected",
                                                                                  "broker")


def test_requeued_poison_message_reaped_again_updates_its_row(worker, client, db, env):
    """The reaper (beat, in the worker): a requeued poison message that kills its pool child
    max_deliveries times more is reaped onto the same row."""
    result = client.send_task("dlq_app.poison", (12,))
    row = row_after(db, env, result.id, 1)
    assert row["reason"] == "max_deliveries"
    assert [r.requeued for r in DLQ(client).requeue([row["id"]])] == [True]
    again = row_after(db, env, result.id, 2)
    assert (again["id"], again["status"], again["reason"], again["source"]) == (row["id"], "dead",
                                                                                  "max_deliveries", "reaper"), \
        worker.output()  # e.g. "NOT RECORDED" (dlq_app.record): the server refused a connection
    assert len(runs(db, env["schema"], result.id)) == 4, worker.output()  # 2 deliveries, requeued, 2 more


def test_requeued_task_whose_failure_capture_fails_is_swept_onto_its_row(worker, client, db, env):
    """The backstop: the requeued run fails, its DLQ write fails (a trigger refuses the
    capture's update of this row), the FAILURE result is there: the sweep records the new
    failure on the same row instead of skipping it because a row exists."""
    result = client.send_task("dlq_app.permanent", (13,))
    row = row_after(db, env, result.id, 1)
    schema = sql.Identifier(env["schema"])
    db.execute(sql.SQL("""
        CREATE FUNCTION {schema}.refuse_capture() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'DLQ write refused (test)'; END $$;
        CREATE TRIGGER refuse_capture BEFORE UPDATE ON {schema}.dlq FOR EACH ROW
        WHEN (NEW.task_id = {task_id} AND NEW.failure_count > OLD.failure_count AND NEW.source <> 'backstop')
        EXECUTE FUNCTION {schema}.refuse_capture();""").format(schema=schema, task_id=sql.Literal(result.id)))
    try:
        assert [r.requeued for r in DLQ(client).requeue([row["id"]])] == [True]
        worker.wait_for_line(f"DLQ WRITE FAILED for task dlq_app.permanent[{result.id}]", timeout=30)
        again = row_after(db, env, result.id, 2)
    finally:
        db.execute(sql.SQL("DROP TRIGGER refuse_capture ON {}.dlq").format(schema))
    assert (again["id"], again["status"], again["source"]) == (row["id"], "dead", "backstop")
    assert again["exception_type"].endswith("PermanentError"), worker.output()
    assert DLQ(client).reap()["swept"] == 0  # recorded once
    assert row_after(db, env, result.id, 2)["failure_count"] == 2
