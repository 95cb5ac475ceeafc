"""Delivery guarantees when workers die, lose their database sessions or hang.

Real ``celery worker`` subprocesses (tests/chaos_app.py) against the test server; every
wait is on a condition with a deadline (a log row, a log line, a table state).
Issue 4, requirements 1 (worker death), 2 (connection loss), 4 (hung workers) and
5 (poison messages).
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import pytest
from celery import Celery
from kombu import Connection, Consumer, Producer, Queue

from kombu_pg.store import BrokerStore

from .chaos_util import TaskLog, create_log_tables, messages, orphan_messages, terminate, wait_until
from .worker import CeleryWorker

pytestmark = [pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture
def log(pg_conn, schema) -> TaskLog:
    create_log_tables(pg_conn, schema)
    return TaskLog(pg_conn, schema)


@pytest.fixture
def client(pg_url, schema):
    app = Celery("chaos_client", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    yield app
    app.close()


@pytest.fixture
def env(pg_url, schema):
    """Worker environment with every kombu-pg recovery option at its default."""
    return {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema}


@pytest.fixture
def workers():
    """Start workers through this list; all are killed (whole group) at the end."""
    started: list[CeleryWorker] = []
    yield started
    for worker in started:
        worker.kill(signal.SIGKILL)
        worker.stop(10)


def start(workers, env, name, *, pool="threads", concurrency=2, **extra) -> CeleryWorker:
    worker = CeleryWorker("chaos_app", {**env, "CHAOS_POOL": pool, **extra}, pool=pool,
                          concurrency=concurrency, hostname=f"{name}@%h")
    workers.append(worker)
    return worker.wait_ready()


def with_app_name(url: str, name: str) -> str:
    return url + ("&" if "?" in url else "?") + f"application_name={name}"


def consumer_ids_of(pg_conn, schema, pid) -> set[int]:
    return {c["id"] for c in BrokerStore(pg_conn, schema).consumers() if c["pid"] == pid}


# -- 1. worker death -------------------------------------------------------------------


@pytest.mark.parametrize("pool,kill", [("threads", "group"), ("prefork", "main")])
def test_sigkill_redelivers_every_unacked_message_within_10s_and_no_acked_one(
        client, env, log, pg_conn, schema, workers, pool, kill):
    a = start(workers, env, "a", pool=pool)
    # Done work: acked and deleted, so it must never come back.
    for i in range(3):
        client.send_task("chaos_app.record", (f"done{i}",))
    wait_until(lambda: len(log.rows("record")) == 3 and not messages(pg_conn, schema), what="3 acked tasks")
    # Both pool slots busy: an early-ack task (acked when it started) and a late-ack one.
    client.send_task("chaos_app.block", ("early-running",))
    client.send_task("chaos_app.block_late", ("late-running",))
    wait_until(lambda: len(log.rows(phase="start")) == 2, what="both blocking tasks to start")
    # Prefetched behind them, never started: two early-ack and two late-ack messages.
    for i in range(2):
        client.send_task("chaos_app.record", (f"early-prefetched{i}",))
        client.send_task("chaos_app.record_late", (f"late-prefetched{i}",))
    a_consumers = consumer_ids_of(pg_conn, schema, a.proc.pid)
    held = wait_until(
        lambda: (rows := messages(pg_conn, schema)) and len(rows) == 5
        and all(r["locked_by"] in consumer_ids_of(pg_conn, schema, a.proc.pid) for r in rows) and rows,
        what="a to hold the running late-ack task and the 4 prefetched messages")
    assert a_consumers and all(r["delivery_count"] == 1 for r in held)

    # Another worker is up (and finds nothing it may take) before the crash.
    b = start(workers, env, "b", pool=pool)
    wait_until(lambda: consumer_ids_of(pg_conn, schema, b.proc.pid), what="b to register as a consumer")
    assert [r["locked_by"] for r in messages(pg_conn, schema)] == [r["locked_by"] for r in held]

    killed_at = time.time()
    if kill == "group":
        a.kill(signal.SIGKILL)  # main process and pool children
    else:
        os.kill(a.proc.pid, signal.SIGKILL)  # main process only: prefork children outlive it
    a.proc.wait(10)

    expected = {"late-running", "early-prefetched0", "early-prefetched1", "late-prefetched0", "late-prefetched1"}

    def redelivered_on_b():
        rows = [r for r in log.rows() if r.hostname.startswith("b@") and r.phase in ("run", "end")]
        return {r.arg for r in rows} >= expected and rows

    rows = wait_until(redelivered_on_b, timeout=10, what="every unacked message on b within 10 s")
    latency = max(r.at for r in rows) - killed_at
    wait_until(lambda: not messages(pg_conn, schema), what="b to ack everything")
    print(f"\n[{pool}/{kill}] all 5 unacked messages ran again on b {latency:.2f} s after SIGKILL")

    everything = log.rows()
    on_b = [r for r in everything if r.hostname.startswith("b@")]
    assert {r.arg for r in on_b} == expected
    assert all(r.redelivered for r in on_b)
    # Acked messages are never delivered again: each ran once, on a.
    for arg in ("done0", "done1", "done2"):
        assert [(r.hostname[:2], r.redelivered) for r in everything if r.arg == arg] == [("a@", False)]
    assert [(r.hostname[:2], r.phase) for r in everything if r.arg == "early-running"] == [("a@", "start")]
    # The late-ack task started on a, and again (redelivered) on b.
    assert [(r.hostname[:2], r.phase, r.redelivered) for r in everything if r.arg == "late-running"] == [
        ("a@", "start", False), ("b@", "start", True), ("b@", "end", True)]
    # Prefetched messages were never started on a; each ran exactly once, on b.
    for arg in sorted(expected - {"late-running"}):
        assert [r.hostname[:2] for r in everything if r.arg == arg] == ["b@"]


# -- 2. connection loss is not death ---------------------------------------------------------


def terminate_worker_sessions(pg_conn, schema, worker: CeleryWorker, app_name: str) -> list[int]:
    """End every broker session of ``worker`` (found by its application_name)."""
    wait_until(lambda: consumer_ids_of(pg_conn, schema, worker.proc.pid), what="the worker's consumer row")
    sessions = [r[0] for r in pg_conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,))]
    work_sessions = {c["backend_pid"] for c in BrokerStore(pg_conn, schema).consumers()
                     if c["pid"] == worker.proc.pid}
    assert work_sessions and work_sessions <= set(sessions), "the consumer's session carries the app name"
    terminate(pg_conn, sessions)  # (a session may close by itself once its sibling is gone)
    assert not pg_conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (sessions,)).fetchall()
    return sessions


def start_named(workers, env, pg_url, name, **kwargs) -> tuple[CeleryWorker, str]:
    app_name = f"chaos_{name}_{uuid.uuid4().hex[:8]}"
    worker = start(workers, {**env, "KOMBU_PG_URL": with_app_name(pg_url, app_name)}, name, **kwargs)
    return worker, app_name


def test_worker_reconnects_after_its_sessions_are_terminated(client, env, log, pg_conn, schema, workers, pg_url):
    w, app_name = start_named(workers, env, pg_url, "w")
    client.send_task("chaos_app.record", ("before",))
    wait_until(lambda: log.args("record") == ["before"] and not messages(pg_conn, schema), what="a task before")
    old_consumers = consumer_ids_of(pg_conn, schema, w.proc.pid)
    connected = sum("Connected to" in line for line in w.lines)
    terminate_worker_sessions(pg_conn, schema, w, app_name)
    w.wait_for_line("Connected to", count=connected + 1, timeout=30)
    for i in range(5):
        client.send_task("chaos_app.record", (f"after{i}",))
    wait_until(lambda: len(log.args("record")) == 6 and not messages(pg_conn, schema),
               what="new tasks after the reconnect")
    assert w.proc.poll() is None
    assert sorted(log.args("record")) == ["after0", "after1", "after2", "after3", "after4", "before"]
    new_consumers = consumer_ids_of(pg_conn, schema, w.proc.pid)
    assert new_consumers - old_consumers  # a new registration, on a new session
    # The dead registration is reaped by a recovery pass (the worker's own, here).
    wait_until(lambda: not consumer_ids_of(pg_conn, schema, w.proc.pid) & old_consumers, timeout=10,
               what="the old registration to be reaped")


def test_worker_restarts_its_consumer_without_errors_after_session_loss(
        client, env, log, pg_conn, schema, workers, pg_url):
    w, app_name = start_named(workers, env, pg_url, "w")
    connected = sum("Connected to" in line for line in w.lines)
    terminate_worker_sessions(pg_conn, schema, w, app_name)
    w.wait_for_line("Connected to", count=connected + 1, timeout=30)
    client.send_task("chaos_app.record", ("after",))
    wait_until(lambda: log.args("record") == ["after"], what="a task after the reconnect")
    assert not [line for line in w.lines if "Error on restarting" in line or "Traceback" in line]


def test_late_ack_of_a_task_that_ran_across_a_connection_loss_is_fenced(
        client, env, log, pg_conn, schema, workers, pg_url):
    w, app_name = start_named(workers, env, pg_url, "w", concurrency=2)
    client.send_task("chaos_app.hold_late", ("held",))
    wait_until(lambda: log.rows("hold_late", "start"), what="the late-ack task to start")
    [first] = messages(pg_conn, schema)
    connected = sum("Connected to" in line for line in w.lines)
    terminate_worker_sessions(pg_conn, schema, w, app_name)

    # The worker reconnects by itself, and its recovery pass hands the message (locked by
    # its own dead session) out again: the redelivered copy starts and holds.
    w.wait_for_line("Connected to", count=connected + 1, timeout=30)
    again = wait_until(lambda: log.rows("hold_late", "start")[1:], timeout=15, what="redelivery after reconnect")
    assert again[0].redelivered and again[0].hostname.startswith("w@")
    [second] = messages(pg_conn, schema)
    assert second["id"] == first["id"] and second["delivery_count"] == 2
    assert second["lock_token"] != first["lock_token"]

    # The first execution finishes now and acks its old delivery: a no-op, and no harm.
    log.open_gate("held:first")
    wait_until(lambda: len(log.rows("hold_late", "end")) == 1, what="the first execution to end")
    w.wait_for_line("succeeded", count=1)
    still = messages(pg_conn, schema)
    assert [(m["id"], m["lock_token"]) for m in still] == [(second["id"], second["lock_token"])]

    # The worker goes on: new tasks run, and the redelivered copy acks for real.
    for i in range(3):
        client.send_task("chaos_app.record", (f"after{i}",))
    wait_until(lambda: len(log.args("record")) == 3 or "Unrecoverable error" in w.output(), what="new tasks")
    assert "Unrecoverable error" not in w.output() and w.proc.poll() is None
    log.open_gate("held:redelivered")
    wait_until(lambda: not messages(pg_conn, schema), what="the redelivered copy's ack")
    assert [r.redelivered for r in log.rows("hold_late", "end")] == [False, True]


@pytest.fixture
def kombu_conns(pg_url, schema):
    opened: list[Connection] = []

    def make(app_name: str, **options) -> Connection:
        conn = Connection(with_app_name(pg_url, app_name),
                          transport_options={"schema": schema, "polling_interval": 0.2, **options})
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        try:
            conn.release()
        except Exception:
            pass


def receive_one(conn: Connection, queue: Queue, timeout: float = 10.0):
    got = []
    with Consumer(conn, [queue], callbacks=[lambda body, message: got.append(message)], prefetch_count=1):
        deadline = time.monotonic() + timeout
        while not got:
            assert time.monotonic() < deadline, "no message"
            try:
                conn.drain_events(timeout=0.2)
            except socket.timeout:
                pass
    return got[0]


def flush(conn: Connection) -> None:
    """Let the connection send its buffered acks (drain_events flushes them first)."""
    try:
        conn.drain_events(timeout=0.05)
    except socket.timeout:
        pass


def test_kombu_late_ack_from_a_terminated_consumer_does_not_delete_the_redelivery(
        kombu_conns, pg_conn, schema):
    queue = Queue("fenced")
    a = kombu_conns("chaos_a", recovery_interval=0.2)
    Producer(a.default_channel).publish({"n": 1}, routing_key="fenced", declare=[queue])
    at_a = receive_one(a, queue)
    assert not at_a.delivery_info["redelivered"]
    sessions = [r[0] for r in pg_conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'chaos_a'")]
    assert terminate(pg_conn, sessions) == len(sessions) >= 1

    b = kombu_conns("chaos_b", recovery_interval=0.2)
    at_b = receive_one(b, queue)  # b's first recovery pass frees it
    assert at_b.payload == {"n": 1} and at_b.delivery_info["redelivered"]
    assert at_b.delivery_tag != at_a.delivery_tag

    # a acks late: through its own (dead) connection it cannot reach the database...
    at_a.ack()
    with pytest.raises(a.connection_errors):
        a.drain_events(timeout=0.2)
    # ...and when an old token does reach it, it matches nothing (fencing).
    BrokerStore(pg_conn, schema).ack([at_a.delivery_tag])
    [row] = messages(pg_conn, schema)
    assert str(row["lock_token"]) == at_b.delivery_tag and row["delivery_count"] == 2
    at_b.ack()
    flush(b)
    assert messages(pg_conn, schema) == []


def test_kombu_connection_recovers_with_ensure_connection_after_its_sessions_end(kombu_conns, pg_conn, schema):
    queue = Queue("again")
    c = kombu_conns("chaos_c", recovery_interval=0.2)
    Producer(c.default_channel).publish("one", routing_key="again", declare=[queue])
    sessions = [r[0] for r in pg_conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'chaos_c'")]
    terminate(pg_conn, sessions)
    with pytest.raises(c.connection_errors):
        Producer(c.default_channel).publish("lost?", routing_key="again")
    c.ensure_connection(max_retries=3)
    assert c.connected
    Producer(c.default_channel).publish("two", routing_key="again")
    bodies = []
    for _ in range(2):
        message = receive_one(c, queue)
        bodies.append(message.payload)
        message.ack()
    assert sorted(bodies) == ["one", "two"]


# -- 4. hung workers --------------------------------------------------------------------------


def test_visibility_timeout_reclaims_a_live_but_stuck_workers_message(
        client, env, log, pg_conn, schema, workers):
    vt = 3.0
    stuck_env = {**env, "VISIBILITY_TIMEOUT": str(vt), "PREFETCH_MULTIPLIER": "1"}
    log.open_gate("stuck:redelivered")  # only the first delivery hangs
    a = start(workers, stuck_env, "a", concurrency=1)
    client.send_task("chaos_app.hold_late", ("stuck",))
    wait_until(lambda: log.rows("hold_late", "start"), what="a to start the task")
    [held] = messages(pg_conn, schema)
    b = start(workers, stuck_env, "b", concurrency=1)

    rows = wait_until(lambda: len(log.rows("hold_late", "end")) == 1 and log.rows("hold_late"), timeout=20,
                      what="b to run the reclaimed copy")
    assert [(r.hostname[:2], r.phase, r.redelivered) for r in rows] == [
        ("a@", "start", False), ("b@", "start", True), ("b@", "end", True)]
    # Reclaimed because of the timeout, not before it, and from a worker that is alive.
    assert rows[1].at - held["locked_at"].timestamp() >= vt
    assert a.proc.poll() is None
    wait_until(lambda: not messages(pg_conn, schema), what="b's ack")

    # The stuck execution finally ends and acks its old delivery: nothing to delete, no harm.
    log.open_gate("stuck:first")
    wait_until(lambda: len(log.rows("hold_late", "end")) == 2, what="a's execution to end")
    a.wait_for_line("succeeded")
    client.send_task("chaos_app.record", ("after",))
    wait_until(lambda: log.args("record") == ["after"] and not messages(pg_conn, schema), what="a task after")
    assert len(log.rows("hold_late", "start")) == 2
    assert a.proc.poll() is None and b.proc.poll() is None


def test_kombu_visibility_timeout_redelivers_and_the_stuck_consumers_ack_is_fenced(kombu_conns, pg_conn, schema):
    queue = Queue("stuck")
    a = kombu_conns("chaos_va", recovery_interval=0.1, visibility_timeout=1.0)
    b = kombu_conns("chaos_vb", recovery_interval=0.1, visibility_timeout=1.0)
    Producer(a.default_channel).publish("work", routing_key="stuck", declare=[queue])
    at_a = receive_one(a, queue)
    at_b = receive_one(b, queue)  # a stays connected and alive, but does not ack in time
    assert at_b.delivery_info["redelivered"] and at_b.delivery_tag != at_a.delivery_tag
    [row] = messages(pg_conn, schema)
    assert row["delivery_count"] == 2 and str(row["lock_token"]) == at_b.delivery_tag

    at_a.ack()
    flush(a)  # a's ack reaches the database on a's live session...
    [row] = messages(pg_conn, schema)  # ...and deletes nothing: b's delivery is intact
    assert str(row["lock_token"]) == at_b.delivery_tag
    at_b.ack()
    flush(b)
    assert messages(pg_conn, schema) == []


def received_lines(worker: CeleryWorker, task_id: str) -> int:
    return sum(f"[{task_id}] received" in line for line in worker.lines)


def test_long_eta_task_held_by_a_live_worker_is_never_duplicated(client, env, log, pg_conn, schema, workers):
    from datetime import datetime, timedelta, timezone

    a = start(workers, env, "a", concurrency=1)
    eta = client.send_task("chaos_app.record", ("in an hour",), eta=datetime.now(timezone.utc) + timedelta(hours=1))
    [held] = wait_until(lambda: [m for m in messages(pg_conn, schema) if m["lock_token"]],
                        what="a to hold the ETA task")
    assert held["task_id"] == eta.id and held["locked_by"] in consumer_ids_of(pg_conn, schema, a.proc.pid)
    b = start(workers, env, "b", concurrency=1)

    # Several recovery passes, each one observed: a probe message is left locked by a
    # consumer that does not exist, and only a recovery pass can free it for a worker.
    for i in range(3):
        client.send_task("chaos_app.record", (f"probe{i}",), queue="chaos_scratch")
        wait_until(lambda: messages(pg_conn, schema, "queue = 'chaos_scratch'"), what="the probe")
        assert orphan_messages(pg_conn, schema, "chaos_scratch", "celery")
        wait_until(lambda: f"probe{i}" in log.args("record") and len(messages(pg_conn, schema)) == 1,
                   timeout=15, what=f"recovery pass {i + 1} to free the probe")

    [still] = messages(pg_conn, schema)
    assert (still["id"], still["lock_token"], still["locked_by"], still["delivery_count"]) == (
        held["id"], held["lock_token"], held["locked_by"], 1)
    assert (received_lines(a, eta.id), received_lines(b, eta.id)) == (1, 0)
    assert "in an hour" not in log.args("record")


# -- 5. poison messages -----------------------------------------------------------------------


def test_a_message_that_kills_its_worker_stops_after_max_deliveries_and_is_kept(
        client, env, log, pg_conn, schema, workers):
    poison_env = {**env, "MAX_DELIVERIES": "3", "RECOVERY_INTERVAL": "0.5"}
    poison = client.send_task("chaos_app.die", ("poison",))
    for attempt in range(1, 4):
        worker = CeleryWorker("chaos_app", poison_env, pool="threads", concurrency=1, hostname=f"w{attempt}@%h")
        workers.append(worker)
        assert worker.proc.wait(60) == -signal.SIGKILL, worker.output()
        assert len(log.rows("die", "start")) == attempt
        [row] = messages(pg_conn, schema)
        assert row["delivery_count"] == attempt

    survivor = start(workers, poison_env, "survivor", concurrency=1)
    # Its recovery pass unlocks the poison message (its last consumer is dead) but nothing
    # claims it any more; other work goes on.
    wait_until(lambda: messages(pg_conn, schema)[0]["lock_token"] is None, timeout=10, what="poison unlocked")
    client.send_task("chaos_app.record", ("after",))
    wait_until(lambda: log.args("record") == ["after"], what="a normal task after the poison")
    # More recovery passes (observed with a probe) neither deliver nor delete it.
    client.send_task("chaos_app.record", ("probe",), queue="chaos_scratch")
    wait_until(lambda: messages(pg_conn, schema, "queue = 'chaos_scratch'"), what="the probe")
    orphan_messages(pg_conn, schema, "chaos_scratch", "celery")
    wait_until(lambda: "probe" in log.args("record") and len(messages(pg_conn, schema)) == 1,
               timeout=10, what="a recovery pass to free the probe")

    [row] = messages(pg_conn, schema)
    assert (row["task_id"], row["delivery_count"], row["lock_token"], row["locked_by"]) == (poison.id, 3, None, None)
    assert len(log.rows("die", "start")) == 3
    assert survivor.proc.poll() is None
    stats = {s["queue"]: s for s in BrokerStore(pg_conn, schema).queue_stats(max_deliveries=3)}
    assert (stats["celery"]["poison"], stats["celery"]["ready"]) == (1, 0)


def test_publish_retry_survives_a_reconnect_during_its_declare(kombu_conns, pg_conn, schema):
    """What a server restart does to a retried Celery publish, made deterministic.

    Kombu's Producer._publish takes its channel, then declares (retried on its own), then
    publishes on the channel it took.  If the declare has to reconnect, that channel is
    closed by then: the transport must answer with a recoverable connection error, so the
    outer retry publishes again on the new channel.
    """
    queue = Queue("retried")
    p = kombu_conns("chaos_p")
    producer = Producer(p)
    declare = producer.maybe_declare

    def declare_after_losing_the_session(entity, *args, **kwargs):
        # The session dies between the publish taking its channel and the declare.
        terminate(pg_conn, [r[0] for r in pg_conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'chaos_p'")])
        producer.maybe_declare = declare  # once
        return declare(entity, *args, **kwargs)

    producer.maybe_declare = declare_after_losing_the_session
    producer.publish("once", routing_key="retried", declare=[queue], retry=True,
                     retry_policy={"max_retries": 3, "interval_start": 0})
    assert [m["queue"] for m in messages(pg_conn, schema)] == ["retried"]


# -- 6. graceful shutdown (the prefork pool and early acks; threads are in test_celery.py) ----


def test_warm_shutdown_of_a_prefork_worker_hands_back_prefetched_messages_at_once(
        client, env, log, pg_conn, schema, workers):
    a = start(workers, env, "a", pool="prefork", concurrency=2)
    client.send_task("chaos_app.block", ("running0",))
    client.send_task("chaos_app.block_late", ("running1",))
    wait_until(lambda: len(log.rows(phase="start")) == 2, what="both children busy")
    for i in range(2):
        client.send_task("chaos_app.record", (f"early{i}",))
        client.send_task("chaos_app.record_late", (f"late{i}",))
    wait_until(lambda: len([m for m in messages(pg_conn, schema) if m["lock_token"]]) == 5,
               what="a to hold the late-ack running task and 4 prefetched messages")
    a.proc.send_signal(signal.SIGTERM)
    a.wait_for_line("worker: Warm shutdown")
    log.open_gate("running0")
    log.open_gate("running1")
    assert a.proc.wait(30) == 0
    # No other consumer exists, so no recovery pass ran: the worker handed them back itself.
    rows = messages(pg_conn, schema)
    assert len(rows) == 4 and all(r["lock_token"] is None and r["delivery_count"] == 1 for r in rows)
    assert BrokerStore(pg_conn, schema).consumers() == []
    assert sorted(log.args(phase="end")) == ["running0", "running1"]

    start(workers, env, "b", concurrency=2)
    wait_until(lambda: not messages(pg_conn, schema) and len(log.rows(phase="run")) == 4, what="b to run them")
    runs = log.rows(phase="run")
    assert sorted(r.arg for r in runs) == ["early0", "early1", "late0", "late1"]
    assert all(r.hostname.startswith("b@") and r.redelivered for r in runs)
