"""Wake-ups: a publish notifies exactly the queues that have an idle consumer.

Consumers here never poll (polling and recovery intervals of an hour): a message they
get after waiting came through a NOTIFY.  Which NOTIFYs a publish sent is read with a
marker: NOTIFYs arrive in commit order, so once a marker sent after the publish returned
arrives, the publish's own NOTIFY (if any) has arrived before it.
"""

from __future__ import annotations

import queue as queue_module
import threading
import time

import psycopg
import pytest
from celery import Celery
from kombu import Connection, Consumer, Producer, Queue
from psycopg import sql

from kombu_pg.store import BrokerStore, apply_migrations

from .worker import CeleryWorker, wait_until

NO_POLLING = {"polling_interval": 3600.0, "recovery_interval": 3600.0}
#: Seconds between publishes on one route, the request → task → result pattern included.
GAPS = (0.0005, 0.002, 0.005, 0.015, 0.030, 0.060)
STOP = "stop"


def _idle_marks(pg_conn, schema: str, queue: str) -> int:
    """Sessions marked idle on ``queue`` (BrokerStore.mark_idle: a shared advisory lock)."""
    return pg_conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' AND granted"
        " AND classid::text::bigint = hashtext(%s)::bigint & 4294967295"
        " AND objid::text::bigint = hashtext(%s)::bigint & 4294967295 AND objsubid = 2",
        (f"{schema}:idle", queue)).fetchone()[0]


def _await_idle(pg_conn, schema: str, queue: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _idle_marks(pg_conn, schema, queue):
        assert time.monotonic() < deadline, "the consumer never went idle"
        time.sleep(0.005)  # polling a state in another session: there is no event to await


class Notifications:
    """A LISTEN session on the queue channel."""

    def __init__(self, pg_url: str, schema: str, pg_conn) -> None:
        self.channel = f"{schema}:queues"
        self._pg_conn = pg_conn
        self.conn = psycopg.connect(pg_url, autocommit=True)
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))

    def until_marker(self) -> list[str]:
        self._pg_conn.execute("SELECT pg_notify(%s, 'marker')", (self.channel,))
        got = []
        for notification in self.conn.notifies(timeout=30):
            if notification.payload == "marker":
                return got
            got.append(notification.payload)
        raise AssertionError(f"the marker NOTIFY never arrived; got {got}")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def consumer(pg_url, schema):
    """A Kombu consumer of queue "work" draining in a thread; its bodies arrive in a queue."""
    received: queue_module.Queue = queue_module.Queue()
    conn = Connection(pg_url, transport_options={"schema": schema, **NO_POLLING})
    ready = threading.Event()

    def run():
        def on_message(body, message):
            message.ack()
            received.put(body)

        with Consumer(conn, [Queue("work")], callbacks=[on_message]):
            ready.set()
            while True:
                conn.drain_events(timeout=3600)
                if received.queue and received.queue[-1] == STOP:
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield received
    with Connection(pg_url, transport_options={"schema": schema}) as stopper:
        Producer(stopper).publish(STOP, routing_key="work")
    thread.join(30)
    conn.release()


@pytest.mark.parametrize("gap", GAPS, ids=[f"{g * 1000:g}ms" for g in GAPS])
def test_a_publish_after_a_short_gap_wakes_the_idle_consumer_through_its_own_notify(
        pg_url, schema, pg_conn, consumer, gap):
    """The previous publish on the route was ``gap`` ago: the next one still notifies the
    idle consumer at once (a debounced one waited for a trailing NOTIFY, up to 40 ms)."""
    notifications = Notifications(pg_url, schema, pg_conn)
    try:
        with Connection(pg_url, transport_options={"schema": schema}) as producer_conn:
            producer = Producer(producer_conn)
            _await_idle(pg_conn, schema, "work")
            first = time.monotonic()
            producer.publish("first", routing_key="work")
            assert consumer.get(timeout=30) == "first"
            _await_idle(pg_conn, schema, "work")
            # Sleeping is the scenario here: the gap since the previous publish.
            time.sleep(max(0.0, first + gap - time.monotonic()))
            producer.publish("second", routing_key="work")
            assert "work" in notifications.until_marker()  # sent by the publish itself
            # No poll for an hour: only that NOTIFY can deliver it.
            assert consumer.get(timeout=30) == "second"
    finally:
        notifications.close()


def _ran(task_log, arg: str) -> bool:
    return any(row[1] == arg for row in task_log("record"))


@pytest.mark.parametrize("pool,concurrency", [("threads", 4), ("prefork", 2)])
def test_a_celery_worker_is_woken_by_each_publish_after_any_gap(pg_url, schema, pg_conn, task_log, pool,
                                                                 concurrency):
    """The same through Celery's event loop: the worker marks itself idle between tasks,
    and each publish wakes it through its own NOTIFY (the worker never polls here)."""
    env = {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema, "POLLING_INTERVAL": "3600",
           "RECOVERY_INTERVAL": "3600"}
    client = Celery("client", broker=pg_url, set_as_current=False)
    client.conf.broker_transport_options = {"schema": schema}
    notifications = Notifications(pg_url, schema, pg_conn)
    try:
        with CeleryWorker("celery_app", env, pool=pool, concurrency=concurrency) as worker:
            worker.wait_ready()
            for n, gap in enumerate(GAPS):
                _await_idle(pg_conn, schema, "celery")
                first = time.monotonic()
                client.send_task("celery_app.record", (f"first-{n}",))
                wait_until(lambda: _ran(task_log, f"first-{n}"), what="first task")
                _await_idle(pg_conn, schema, "celery")
                notifications.until_marker()  # forget the NOTIFYs so far
                time.sleep(max(0.0, first + gap - time.monotonic()))  # the gap is the scenario
                client.send_task("celery_app.record", (f"second-{n}",))
                assert "celery" in notifications.until_marker()
                wait_until(lambda: _ran(task_log, f"second-{n}"), what="second task")
    finally:
        notifications.close()
        client.close()


def test_publishes_to_a_busy_or_absent_consumer_do_not_notify(pg_url, schema, pg_conn):
    """What the debounce was for: a stream of publishes nobody waits for sends no NOTIFY,
    and once a consumer waits, the next publish does."""
    notifications = Notifications(pg_url, schema, pg_conn)
    try:
        with psycopg.connect(pg_url, autocommit=True) as work, psycopg.connect(pg_url, autocommit=True) as idle:
            apply_migrations(work, schema)
            producer, sleeper = BrokerStore(work, schema), BrokerStore(idle, schema)
            for n in range(5):
                producer.publish("q", f"m{n}")
            assert notifications.until_marker() == []  # nobody idle: no NOTIFY at all
            sleeper.mark_idle(["q"])
            producer.publish("q", "wake")
            producer.publish("other", "x")  # another queue: still nobody idle there
            assert notifications.until_marker() == ["q"]
            sleeper.mark_busy(["q"])
            producer.publish("q", "busy")
            producer.publish("q", "delayed-style forced", notify=True)
            assert notifications.until_marker() == ["q"]  # only the forced one
    finally:
        notifications.close()


def test_a_consumer_going_idle_waits_for_a_publish_that_looked_before_it(pg_url, schema, pg_conn):
    """The ordering mark_idle relies on: a publish that found nobody idle holds its lock
    until it commits, and marking idle waits for it, so the claim after the mark sees it."""
    with psycopg.connect(pg_url, autocommit=True) as work, psycopg.connect(pg_url, autocommit=True) as idle:
        apply_migrations(work, schema)
        producer, sleeper = BrokerStore(work, schema), BrokerStore(idle, schema)
        marked = threading.Event()
        with work.transaction():  # a publish still in flight: looked, not committed
            producer.publish("q", "in flight")
            thread = threading.Thread(target=lambda: (sleeper.mark_idle(["q"]), marked.set()), daemon=True)
            thread.start()
            # The mark waits for this transaction: it is queued on the publishing lock.
            deadline = time.monotonic() + 30
            while not pg_conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND mode = 'ExclusiveLock' AND pid = %s", (idle.info.backend_pid,)).fetchone()[0]:
                assert time.monotonic() < deadline, "mark_idle did not wait for the publish in flight"
                time.sleep(0.005)
            assert not marked.is_set()
        assert marked.wait(30)
        thread.join(30)
        assert producer.size("q") == 1  # what the claim after the mark finds


def test_notify_debounce_is_accepted_and_said_to_be_ignored(pg_url, schema, caplog):
    with caplog.at_level("WARNING", logger="kombu_pg.transport"):
        with Connection(pg_url, transport_options={"schema": schema, "notify_debounce": 0.02}) as conn:
            conn.connect()
    assert "notify_debounce option is deprecated and ignored" in caplog.text


def test_a_notify_that_arrives_while_a_claim_runs_is_not_dropped_when_it_returns(pg_url, schema):
    """Event loop: the claim in flight may not see a message committed after its snapshot;
    that message's NOTIFY (the consumer is idle) must make the queue pending again, not be
    cleared when the claim comes back short."""
    import select

    from kombu.asynchronous import Hub

    options = {"schema": schema, **NO_POLLING}
    with Connection(pg_url, transport_options=options) as c, \
            Connection(pg_url, transport_options={"schema": schema}) as producer_conn:
        transport = c.transport
        with Consumer(c, [Queue("race")], callbacks=[lambda body, message: message.ack()], prefetch_count=8):
            transport.register_with_event_loop(c.connection, Hub())
            try:
                # Claim until the queue is drained and this consumer idle on it.
                while "race" not in transport._idle or "race" in transport._pending:
                    transport._fetch_pending()
                    transport._claim.future.result(timeout=30)
                    transport._finish_claim()
                transport._pending.add("race")  # a safety poll, say: a claim starts
                transport._fetch_pending()
                assert transport._claim.future.result(timeout=30) == []  # it found nothing
                Producer(producer_conn).publish("late", routing_key="race")
                # Its NOTIFY arrives while the claim has not been finished by the loop.
                assert select.select([transport.listener().fileno()], [], [], 30)[0]
                transport._on_notify()
                transport._finish_claim()
                assert "race" in transport._pending  # the next tick claims "late"
            finally:
                transport.unregister_from_event_loop()
