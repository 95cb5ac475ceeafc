"""Every way a delivery ends without an ack unlocks its message, whatever its job key.

A message with a job key that is in flight while another with the key waits (publish
outcome ``queued_behind_in_flight``) cannot become waiting again: the waiting one is the
newer request for the job, so the unlocked one is superseded (deleted, logged, counted).
Each unlock path is driven through its public API: Kombu's requeue, channel close,
connection close, an abandoned claim of the event loop, recovery after a killed consumer
process, the visibility timeout, and a real ``celery worker`` warm shutdown.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from kombu import Connection, Consumer, Producer, Queue
from prometheus_client import REGISTRY
from psycopg import sql

from kombu_pg.store import BrokerStore, connect
from kombu_pg.store.broker import OutgoingMessage

from .worker import CeleryWorker, wait_until


def message_rows(pg_conn, schema) -> list[tuple]:
    """(task id, queue, locked) of every message, oldest first."""
    return [tuple(r) for r in pg_conn.execute(sql.SQL(
        "SELECT payload::json->'headers'->>'id', queue, lock_token IS NOT NULL FROM {}.messages ORDER BY id"
    ).format(sql.Identifier(schema)))]


def keyed(task_id: str, job_key: str = "k", **headers) -> dict:
    return {"headers": {"id": task_id, "job_key": job_key, **headers}}


def superseded_count(kind: str = "parallel") -> float:
    return REGISTRY.get_sample_value("kombu_pg_messages_superseded_total", {"kind": kind}) or 0.0


def notified(listener: psycopg.Connection, timeout: float = 10) -> set[str]:
    """The payloads of the notifications ``listener`` gets within ``timeout`` of the first."""
    select.select([listener.fileno()], [], [], timeout)
    return {n.payload for n in listener.notifies(timeout=0)}


@pytest.fixture
def conn(pg_url, schema):
    with Connection(pg_url, transport_options={"schema": schema, "polling_interval": 0.5}) as c:
        c.connect()
        yield c


def publish(conn: Connection, body: str, queue: str, **kwargs) -> str | None:
    """Publish on ``conn``'s default channel; the job-key outcome, if it had a key."""
    channel = conn.default_channel
    channel.last_job_publish = None
    Producer(channel).publish(body, routing_key=queue, declare=[Queue(queue)], **kwargs)
    return channel.last_job_publish and channel.last_job_publish.outcome


def consume(conn: Connection, queues: list[str], count: int, timeout: float = 20) -> list:
    """Deliver ``count`` messages of ``queues`` on ``conn`` and keep them unacked."""
    got: list = []
    deadline = time.monotonic() + timeout
    with Consumer(conn, [Queue(q) for q in queues], callbacks=[lambda body, message: got.append(message)]):
        while len(got) < count:
            assert time.monotonic() < deadline, f"got {len(got)} of {count}"
            try:
                conn.drain_events(timeout=deadline - time.monotonic())
            except socket.timeout:
                pass
    return got


# -- Kombu: requeue, channel close, connection close, event loop -------------------------


def test_reject_with_requeue_supersedes_a_delivery_whose_job_key_has_a_waiting_message(
        conn, pg_conn, schema, caplog):
    simple = conn.SimpleQueue("jobs")
    publish(conn, "a", "jobs", **keyed("task-a"))
    first = simple.get(timeout=10)
    assert publish(conn, "b", "jobs", **keyed("task-b")) == "queued_behind_in_flight"
    before = superseded_count()
    with caplog.at_level(logging.WARNING, logger="kombu_pg.store.broker"):
        first.requeue()
    assert message_rows(pg_conn, schema) == [("task-b", "jobs", False)]
    assert "task task-a (job key 'k', queue 'jobs')" in caplog.text and "task task-b" in caplog.text
    assert superseded_count() == before + 1
    second = simple.get(timeout=10)
    assert second.payload == "b" and second.headers["id"] == "task-b"
    second.ack()
    simple.close()


def test_without_a_waiting_message_a_keyed_requeue_unlocks_in_place(conn, pg_conn, schema):
    simple = conn.SimpleQueue("jobs")
    publish(conn, "a", "jobs", **keyed("task-a"))
    simple.get(timeout=10).requeue()
    again = simple.get(timeout=10)
    assert again.headers["id"] == "task-a" and again.delivery_info["redelivered"]
    # Waiting again, the message is the key's waiting one: a publish replaces it.
    again.requeue()
    assert publish(conn, "b", "jobs", **keyed("task-b")) == "replaced"
    simple.close()


def test_closing_a_channel_hands_back_a_job_keyed_delivery_whose_twin_waits(pg_url, schema, pg_conn, caplog):
    with Connection(pg_url, transport_options={"schema": schema}) as c:
        publish(c, "a", "jobs", **keyed("task-a"))
        publish(c, "x", "plain", headers={"id": "task-x"})
        held = consume(c, ["jobs", "plain"], 2)
        assert {m.headers["id"] for m in held} == {"task-a", "task-x"}
        assert publish(c, "b", "jobs", **keyed("task-b")) == "queued_behind_in_flight"
        with caplog.at_level(logging.WARNING):
            c.default_channel.close()  # restore_unacked: one statement for both
    assert "could not hand back" not in caplog.text
    assert message_rows(pg_conn, schema) == [("task-x", "plain", False), ("task-b", "jobs", False)]


def test_closing_the_connection_unregisters_and_frees_a_job_keyed_claim(pg_url, schema, pg_conn):
    with Connection(pg_url, transport_options={"schema": schema}) as c:
        publish(c, "a", "jobs", **keyed("task-a"))
        # Claimed but never handed to a consumer (as the claimer thread's claim is): only
        # unregistering the consumer at close frees it.
        [claimed] = c.default_channel.fetch("jobs", 1)
        assert claimed["headers"]["id"] == "task-a"
        assert publish(c, "b", "jobs", **keyed("task-b")) == "queued_behind_in_flight"
    assert message_rows(pg_conn, schema) == [("task-b", "jobs", False)]
    assert BrokerStore(pg_conn, schema).consumers() == []


def test_a_claim_abandoned_by_the_event_loop_with_a_waiting_twin_is_handed_back(pg_url, schema, pg_conn):
    from kombu.asynchronous import Hub

    with Connection(pg_url, transport_options={"schema": schema}) as c:
        publish(c, "a", "jobs", **keyed("task-a"))
        with Consumer(c, [Queue("jobs")], callbacks=[lambda body, message: None], prefetch_count=8):
            c.transport.register_with_event_loop(c.connection, Hub())
            c.transport._fetch_pending()  # the claim starts; the loop never runs to deliver it
            claim = c.transport._claim
            assert [m["headers"]["id"] for m in claim.future.result(timeout=10)] == ["task-a"]
            assert publish(c, "b", "jobs", **keyed("task-b")) == "queued_behind_in_flight"
            c.transport.unregister_from_event_loop()  # hands the claim back
            assert message_rows(pg_conn, schema) == [("task-b", "jobs", False)]


# -- recovery ----------------------------------------------------------------------------

HOLDER = """
import sys, threading
from kombu import Connection, Consumer, Queue
import kombu_pg
url, schema = sys.argv[1:3]
held = []
with Connection(url, transport_options={"schema": schema}) as c:
    with Consumer(c, [Queue("jobs"), Queue("plain")], callbacks=[lambda body, m: held.append(m)]):
        while len(held) < 2:
            c.drain_events(timeout=30)
        print("holding", flush=True)
        threading.Event().wait()
"""


def test_recovery_after_a_killed_consumer_redelivers_other_queues_and_supersedes_the_keyed_one(
        pg_url, schema, pg_conn, conn):
    publish(conn, "a", "jobs", **keyed("task-a"))
    publish(conn, "x", "plain", headers={"id": "task-x"})
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, pg_url, schema], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert publish(conn, "b", "jobs", **keyed("task-b")) == "queued_behind_in_flight"
    finally:
        holder.kill()
        holder.wait(10)
    # A recovery pass of this consumer (its first drain runs one) frees both.
    [x] = consume(conn, ["plain"], 1)
    assert x.headers["id"] == "task-x" and x.delivery_info["redelivered"]
    assert message_rows(pg_conn, schema) == [("task-x", "plain", True), ("task-b", "jobs", False)]


def test_the_visibility_timeout_releases_past_a_job_keyed_message_with_a_waiting_twin(pg_url, schema, pg_conn):
    with Connection(pg_url, transport_options={"schema": schema}) as stuck:
        publish(stuck, "a", "jobs", **keyed("task-a"))
        publish(stuck, "x", "plain", headers={"id": "task-x"})
        consume(stuck, ["jobs", "plain"], 2)  # held, never acked: a hung but connected worker
        assert publish(stuck, "b", "jobs", **keyed("task-b")) == "queued_behind_in_flight"
        options = {"schema": schema, "visibility_timeout": 0.001}
        with Connection(pg_url, transport_options=options) as other:
            [x] = consume(other, ["plain"], 1)
            assert x.headers["id"] == "task-x" and x.delivery_info["redelivered"]
        assert ("task-a", "jobs", True) not in message_rows(pg_conn, schema)
        assert ("task-b", "jobs", False) in message_rows(pg_conn, schema)


def test_a_failing_recovery_part_does_not_stop_the_others(store, pg_url):
    """An expired message locked by a long transaction elsewhere, with lock_timeout set:
    deleting expired messages fails, and the dead consumer's messages are freed all the same."""
    store.publish("q", '{"headers": {}, "properties": {}}', ttl=0)
    dead = BrokerStore(connect(pg_url), store.schema)
    dead_id = dead.register_consumer()
    store.publish("other", '{"headers": {}, "properties": {}}')
    dead.claim("other", 1, dead_id)
    dead_pid = dead.conn.info.backend_pid
    dead.conn.close()
    wait_until(lambda: not store.conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                              (dead_pid,)).fetchone(), what="the dead session to end")
    with psycopg.connect(pg_url) as blocker:  # not autocommit: holds the row lock
        blocker.execute(sql.SQL("SELECT 1 FROM {}.messages WHERE queue = 'q' FOR UPDATE")
                        .format(sql.Identifier(store.schema)))
        store.conn.execute("SET lock_timeout = '50ms'")
        report = store.recover([])
    assert report.failed == ["expire_messages"] and report.expired_messages == 0
    assert report.released == {"other": 1} and report.dead_consumers == [dead_id]
    assert store.recover([]).expired_messages == 1  # the next pass does it


# -- the unlock function ----------------------------------------------------------------


def payload(task_id: str) -> str:
    return '{"headers": {"id": "%s"}, "properties": {}}' % task_id


def test_of_several_deliveries_with_one_key_unlocked_together_the_newest_stays(store, pg_conn):
    cid = store.register_consumer()
    store.publish_job("q", payload("a"), "k")
    [a] = store.claim("q", 1, cid)
    store.publish_job("q", payload("b"), "k")
    [b] = store.claim("q", 1, cid)  # no serial key: two with the key in flight
    store.publish("q", payload("plain"))
    [plain] = store.claim("q", 1, cid)
    assert store.requeue([a.token, b.token, plain.token]) == ["q"]
    assert message_rows(pg_conn, store.schema) == [("b", "q", False), ("plain", "q", False)]


def test_a_publish_committing_while_the_unlock_runs_makes_it_supersede(store, pg_url, pg_conn):
    cid = store.register_consumer()
    store.publish_job("q", payload("a"), "k")
    [a] = store.claim("q", 1, cid)
    with psycopg.connect(pg_url) as publisher:  # a transaction: its insert is not committed yet
        BrokerStore(publisher, store.schema).publish_job("q", payload("b"), "k")
        result: list = []
        unlock = threading.Thread(target=lambda: result.append(store.requeue([a.token])))
        unlock.start()
        # The unlock waits for the publisher's insert, which holds the key's index entry.
        wait_until(lambda: pg_conn.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                           (store.conn.info.backend_pid,)).fetchone()[0],
                   what="the unlock to wait for the publisher")
    unlock.join(10)
    assert result == [[]]
    assert message_rows(pg_conn, store.schema) == [("b", "q", False)]


def test_superseding_a_serial_keyed_message_wakes_the_queue_of_the_waiting_one(store, pg_url):
    cid = store.register_consumer()
    store.publish_job("q1", payload("a"), "k", serial_key="k")
    [a] = store.claim("q1", 1, cid)
    store.publish_job("q2", payload("b"), "k", serial_key="k")  # a job key spans queues
    assert store.claim("q2", 1, cid) == []  # the serial key is held by a
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(store.channel)))
        assert store.requeue([a.token]) == []
        assert "q2" in notified(listener)
    assert [m.payload for m in store.claim("q2", 1, cid)] == [payload("b")]


def test_a_superseded_dlq_requeue_puts_its_entry_back_to_dead(store, pg_conn):
    """A requeued dead letter superseded at an unlock never runs: its entry is dead again,
    with a note, instead of 'requeued' for ever."""
    from celery_dlq.store import DLQStore, Entry

    dlq = DLQStore(pg_conn, store.schema)
    [row_id, _] = dlq.capture(Entry(message=payload("a"), reason="non_retryable", source="signal",
                                    task_id="a", task_name="t", queue="q", exchange="", routing_key="q"))
    dlq.mark_requeued(row_id)
    cid = store.register_consumer()
    store.publish_job("q", '{"headers": {"id": "a", "dlq_id": %d}, "properties": {}}' % row_id, "k")
    [a] = store.claim("q", 1, cid)
    store.publish_job("q", payload("b"), "k")
    assert store.requeue([a.token]) == []  # superseded by b
    status, notes = pg_conn.execute(sql.SQL("SELECT status, notes FROM {}.dlq WHERE id = %s").format(
        sql.Identifier(store.schema)), (row_id,)).fetchone()
    assert status == "dead" and "superseded by task b" in notes[-1], (status, notes)


def test_a_payload_that_is_not_json_does_not_stop_superseding(store, pg_conn):
    cid = store.register_consumer()
    store.publish_job("q", "not json", "k")
    [a] = store.claim("q", 1, cid)
    store.publish_job("q", payload("b"), "k")
    assert store.recover([], visibility_timeout=0).superseded[0].task_id is None
    assert message_rows(pg_conn, store.schema) == [("b", "q", False)]


# -- no transaction on the shared work connection ------------------------------------------


def _bind_and_unregister(store, n: int, own: int) -> None:
    store.bind("ex", f"bound{n % 4}", "rk", None)
    store.unregister_consumer(store.register_consumer())


def _publish_a_batch_with_a_job_key(store, n: int, own: int) -> None:
    # A job key cuts the batch into runs: several statements in one transaction.
    store.publish_many([OutgoingMessage("side", payload(f"s{n}")),
                        OutgoingMessage("side", payload(f"j{n}"), job_key=f"job{n % 3}"),
                        OutgoingMessage("side", payload(f"t{n}"))])


def _recover(store, n: int, own: int) -> None:
    # The claimer's consumer is this session's own: never tested for liveness.
    store.recover([own])


@pytest.mark.parametrize("interfere", [_bind_and_unregister, _publish_a_batch_with_a_job_key, _recover])
def test_a_claim_on_the_shared_connection_is_committed_when_it_returns(store, pg_conn, interfere):
    """The claimer thread claims (and acks) on the connection other threads bind,
    unregister, publish batches and recover on: a transaction opened by any of them would
    take in the claims made meanwhile, uncommitted when they return (and undone if it
    rolled back)."""
    cid = store.register_consumer()
    for n in range(40):
        store.publish("work", payload(str(n)))
    claims, uncommitted = [], []
    lock_of = sql.SQL("SELECT lock_token FROM {}.messages WHERE id = %s").format(sql.Identifier(store.schema))

    def claimer() -> None:
        acks: list[str] = []
        while claimed := store.claim("work", 1, cid, acks=acks):
            [message] = claimed
            claims.append(message.id)
            # pg_conn is another session: it sees the claim only once it is committed.
            if str(pg_conn.execute(lock_of, (message.id,)).fetchone()[0]) != message.token:
                uncommitted.append(message.id)
            acks = [message.token]
        store.ack(acks)

    thread = threading.Thread(target=claimer)
    thread.start()
    n = 0
    while n == 0 or thread.is_alive():
        interfere(store, n, cid)
        n += 1
    thread.join()
    assert len(claims) == 40
    assert uncommitted == []
    assert store.size("work") == 0


# -- a real celery worker's warm shutdown -------------------------------------------------


@pytest.mark.slow
def test_warm_shutdown_hands_back_a_held_eta_task_whose_job_key_has_a_waiting_twin(pg_url, schema, pg_conn):
    """The recommended setup (serial key = job key) with a countdown task, which the worker
    holds in memory until it is due: a second enqueue waits behind it."""
    from celery import Celery

    from kombu_pg.jobs import Outcome, enqueue

    from .chaos_util import create_log_tables

    create_log_tables(pg_conn, schema)
    client = Celery("client", broker=pg_url, set_as_current=False)
    client.conf.broker_transport_options = {"schema": schema}
    worker = CeleryWorker("chaos_app", {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema}).wait_ready()
    try:
        sig = client.signature("chaos_app.record")
        options = {"headers": {"serial_key": "digest:7"}, "countdown": 3600}
        first = enqueue(sig.clone(args=("first",)), "digest:7", **options)
        wait_until(lambda: message_rows(pg_conn, schema) == [(first.task_id, "celery", True)],
                   what="the worker to hold the countdown task")
        second = enqueue(sig.clone(args=("second",)), "digest:7", **options)
        assert second.outcome is Outcome.QUEUED_BEHIND_IN_FLIGHT
        assert worker.stop() == 0
    finally:
        worker.kill(signal.SIGKILL)
        client.close()
    assert "could not hand back" not in worker.output()
    assert f"task {first.task_id} (job key 'digest:7'" in worker.output()
    assert message_rows(pg_conn, schema) == [(second.task_id, "celery", False)]


# -- review: other statements that end a delivery ------------------------------------------


def test_quarantining_a_serial_keyed_row_wakes_its_queue_for_the_keys_next_message(store, pg_url, pg_conn):
    """Like an ack, moving an undecodable row away frees its serial key; without a NOTIFY
    the key's next message waited for the consumer's next poll."""
    cid = store.register_consumer()
    pg_conn.execute(sql.SQL("INSERT INTO {}.messages (queue, payload, serial_key) VALUES ('bad', 'not json', 's')")
                    .format(sql.Identifier(store.schema)))
    store.publish("bad", payload("after"), serial_key="s")
    [junk] = store.claim("bad", 5, cid)  # the key's head; its next message waits for it
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(store.channel)))
        store.quarantine(junk.token, "not JSON")
        assert notified(listener) == {"bad"}
    assert [m.payload for m in store.claim("bad", 5, cid)] == [payload("after")]
