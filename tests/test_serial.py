"""Serial keys: at most one message per key in flight, in order, under any concurrency."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kombu import Connection, Producer
from psycopg import sql

from kombu_pg.store import BrokerStore, apply_migrations, connect

HERE = Path(__file__).resolve().parent


def test_one_message_per_key_in_flight(store):
    cid = store.register_consumer()
    for i in range(3):
        store.publish("q", f"a{i}", serial_key="a")
        store.publish("q", f"b{i}", serial_key="b")
    store.publish("q", "free")
    assert sorted(c.payload for c in store.claim("q", 10, cid)) == ["a0", "b0", "free"]
    assert store.claim("q", 10, cid) == []


def test_key_is_freed_by_ack_requeue_and_recovery(pg_url, store):
    cid = store.register_consumer()
    for i in range(3):
        store.publish("q", f"k{i}", serial_key="k")
    [first] = store.claim("q", 5, cid)
    store.ack([first.token])
    [second] = store.claim("q", 5, cid)
    assert second.payload == "k1"
    store.requeue([second.token])
    [again] = store.claim("q", 5, cid)
    assert again.payload == "k1" and again.delivery_count == 2  # requeue keeps its place
    other = connect(pg_url)
    try:
        dead = BrokerStore(other, store.schema)
        dead_id = dead.register_consumer()
        store.requeue([again.token])
        [held] = dead.claim("q", 5, dead_id)
        store.conn.execute("SELECT pg_terminate_backend(%s, 5000)", (other.info.backend_pid,))
    finally:
        other.close()
    assert store.claim("q", 5, cid) == []  # a dead holder still holds until recovered...
    assert store.recover([cid]).released == {"q": 1}
    assert [c.payload for c in store.claim("q", 5, cid)] == ["k1"]  # ...then order resumes


def test_priority_orders_within_a_key(store):
    cid = store.register_consumer()
    for i, prio in enumerate([1, 9, 5]):
        store.publish("q", f"m{i}", serial_key="k", priority=prio)
    order = []
    while claimed := store.claim("q", 5, cid):
        [c] = claimed
        order.append(c.payload)
        store.ack([c.token])
    assert order == ["m1", "m2", "m0"]


def test_keys_are_global_across_queues(store):
    cid = store.register_consumer()
    store.publish("q1", "x", serial_key="k")
    store.publish("q2", "y", serial_key="k")
    assert len(store.claim("q1", 5, cid)) == 1
    assert store.claim("q2", 5, cid) == []


def test_poison_head_blocks_its_key_until_reaped(store):
    cid = store.register_consumer()
    store.publish("q", "poison", serial_key="k")
    store.publish("q", "next", serial_key="k")
    [p] = store.claim("q", 5, cid, max_deliveries=1)
    store.requeue([p.token])
    assert store.claim("q", 5, cid, max_deliveries=1) == []  # order beats progress


BLOCKS = ("poison head", "delayed head", "head in another queue", "head in flight")
BLOCKED_DEPTH = 10_000
OTHER_KEYS = 100


def block_a_key(store: BrokerStore, block: str) -> int:
    """Queue q: key "blocked", whose head cannot be taken (``block`` says why), with
    BLOCKED_DEPTH ready messages waiting behind it, then one ready message of each of
    OTHER_KEYS other keys ("k1".."k100").  Claim with max_deliveries=1.  Returns a
    consumer id (for "head in flight", the consumer holding the head)."""
    cid = store.register_consumer()
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    store.publish("elsewhere" if block == "head in another queue" else "q", "head", serial_key="blocked",
                  visible_at=later if block == "delayed head" else None)
    if block in ("poison head", "head in flight"):
        [head] = store.claim("q", 1, cid, max_deliveries=1)
        if block == "poison head":
            store.requeue([head.token])  # delivered once: poison at max_deliveries=1
    table = sql.SQL("{}.messages").format(sql.Identifier(store.schema))
    store.conn.execute(sql.SQL(
        "INSERT INTO {} (queue, payload, serial_key) SELECT 'q', 'behind', 'blocked' FROM generate_series(1, %s)"
    ).format(table), (BLOCKED_DEPTH,))
    store.conn.execute(sql.SQL(
        "INSERT INTO {} (queue, payload, serial_key) SELECT 'q', 'k' || n, 'k' || n FROM generate_series(1, %s) n"
    ).format(table), (OTHER_KEYS,))
    store.conn.execute(sql.SQL("ANALYZE {}").format(table))
    return cid


@pytest.mark.parametrize("block", BLOCKS)
def test_a_blocked_key_does_not_starve_the_other_keys(store, block):
    cid = block_a_key(store, block)
    claimed = []
    for _ in range(OTHER_KEYS // 10):
        batch = store.claim("q", 10, cid, max_deliveries=1)
        assert len(batch) == 10, f"a claim of 10 got {len(batch)} with {OTHER_KEYS - len(claimed)} keys ready"
        claimed += batch
    assert sorted(c.payload for c in claimed) == sorted(f"k{n}" for n in range(1, OTHER_KEYS + 1))
    assert store.claim("q", 10, cid, max_deliveries=1) == []  # the blocked key still waits


@pytest.mark.slow
def test_job_key_replaces_never_put_two_messages_of_a_key_in_flight(pg_url, store):
    """Publishers replace waiting messages by job key, moving them between serial keys
    (and no key), queues and priorities, while consumers claim; a checker queries without
    pause, and each consumer after each claim, that no key has two messages in flight.
    The claim selects a key's head, then locks it: a replace committed in between used to
    be claimed under the old key's advisory lock."""
    schema = store.schema
    stop = threading.Event()
    failures: list[object] = []
    checks = threading.Condition()
    passes = 0
    twice_in_flight = sql.SQL(
        "SELECT serial_key, array_agg(payload) FROM {}.messages"
        " WHERE lock_token IS NOT NULL AND serial_key IS NOT NULL GROUP BY serial_key HAVING count(*) > 1"
    ).format(sql.Identifier(schema))

    def thread(body, *args) -> threading.Thread:
        def run() -> None:
            try:
                body(*args)
            except BaseException as exc:  # reported by the test, not lost in the thread
                failures.append(exc)
                stop.set()
        return threading.Thread(target=run)

    def publish(seed: int) -> None:
        rng = random.Random(seed)
        # Not waiting for the WAL flush: more replaces, so more of them hit a claim's window.
        with connect(pg_url, options="-c synchronous_commit=off") as conn:
            producer = BrokerStore(conn, schema)
            while not stop.is_set():
                key = rng.choice(["s0", "s1", "s2", "s3", None])
                producer.publish_job(rng.choice(["q", "q", "q", "q2"]), f'{{"headers": {{"id": "{key}"}}}}',
                                     f"j{rng.randrange(4)}", serial_key=key, priority=rng.randrange(10))

    def check() -> None:
        nonlocal passes
        with connect(pg_url) as conn:
            while not stop.is_set():
                failures.extend(conn.execute(twice_in_flight).fetchall())
                with checks:
                    passes += 1
                    checks.notify_all()

    def consume(rounds: int) -> None:
        with connect(pg_url) as conn:
            consumer = BrokerStore(conn, schema)
            cid, acks = consumer.register_consumer(), []
            for _ in range(rounds):
                acks = [c.token for c in consumer.claim("q", 4, cid, acks=acks)]
                failures.extend(conn.execute(twice_in_flight).fetchall())
                with checks:  # hold them until a whole check ran after the claim
                    start = passes
                    checks.wait_for(lambda: passes >= start + 2 or stop.is_set())
            consumer.ack(acks)

    publishers = [thread(publish, n) for n in range(3)]
    checker = thread(check)
    consumers = [thread(consume, 1500) for _ in range(4)]
    for t in publishers + [checker] + consumers:
        t.start()
    for t in consumers:
        t.join()
    stop.set()
    for t in publishers + [checker]:
        t.join()
    assert failures == []


def test_serial_task_derives_the_key_and_acks_late(pg_url, schema):
    from celery import Celery

    from kombu_pg.serial import SerialTask

    app = Celery("serial", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}

    @app.task(base=SerialTask, serial_key=lambda user_id, amount: f"user:{user_id}")
    def charge(user_id, amount):
        return amount

    assert charge.acks_late
    charge.delay(42, 10)
    charge.apply_async((42, 5), headers={"serial_key": "explicit"})
    rows = connect(pg_url).execute(
        sql.SQL("SELECT serial_key FROM {}.messages ORDER BY id").format(sql.Identifier(schema))).fetchall()
    assert rows == [("user:42",), ("explicit",)]
    app.close()


def _deliveries(pg_conn, schema):
    return pg_conn.execute(sql.SQL(
        "SELECT key, seq, prio, consumer, start_at, end_at, action FROM {}.serial_log ORDER BY start_at"
    ).format(sql.Identifier(schema))).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("keys", [1, 4, 64, 1000])
def test_race_no_overlap_and_order_under_concurrency(pg_url, pg_conn, schema, keys):
    """8 consumers in 2 processes, random requeue/reject, higher priorities published
    while they run, and one process SIGKILLed mid-run."""
    apply_migrations(pg_conn, schema)
    table = sql.Identifier(schema)
    pg_conn.execute(sql.SQL(
        "CREATE TABLE {}.serial_log (id bigserial PRIMARY KEY, key text, seq int, prio int, consumer text,"
        " start_at timestamptz, end_at timestamptz, action text);"
        "CREATE TABLE {}.published (key text, seq int, prio int, at timestamptz)").format(table, table))
    total = max(400, 2 * keys)
    rng = random.Random(keys)
    plan = [(f"k{rng.randrange(keys)}", seq, rng.choice([0, 0, 3])) for seq in range(total)]
    published = sql.SQL("INSERT INTO {}.published VALUES (%s, %s, %s, clock_timestamp())").format(table)

    def publish(items):
        with Connection(pg_url, transport_options={"schema": schema}) as conn:
            producer = Producer(conn.default_channel)
            for key, seq, prio in items:
                producer.publish({"key": key, "seq": seq, "prio": prio}, routing_key="serial",
                                 priority=prio, headers={"serial_key": key})
                pg_conn.execute(published, (key, seq, prio))

    first, later = plan[: total // 2], [(k, s, 9) for k, s, _ in plan[total // 2:]]  # later: higher priority
    publish(first)
    procs = [subprocess.Popen([sys.executable, str(HERE / "serial_consumer.py"), pg_url, schema, "serial",
                               "4", str(n)], stdout=subprocess.PIPE, text=True) for n in range(3)]
    killed_at = None
    try:
        for proc in procs[:2]:
            assert proc.stdout.readline().strip() == "consuming"
        late_producer = threading.Thread(target=publish, args=(later,))
        late_producer.start()
        finished = sql.SQL("SELECT count(DISTINCT seq) FROM {}.serial_log WHERE action IN ('ack', 'reject')"
                           ).format(table)
        deadline = time.monotonic() + 120
        while pg_conn.execute(finished).fetchone()[0] < total // 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        killed_at = pg_conn.execute("SELECT clock_timestamp()").fetchone()[0]
        late_producer.join()
        while pg_conn.execute(finished).fetchone()[0] < total:
            assert time.monotonic() < deadline, "not every message was finished"
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)

    deliveries = _deliveries(pg_conn, schema)
    by_key = defaultdict(list)
    for key, seq, prio, consumer, start, end, action in deliveries:
        if end is None:  # the killed consumer's deliveries ended when it died
            assert consumer.startswith("0-"), "a live consumer left a delivery unfinished"
            end = killed_at
        by_key[key].append((start, end, seq, prio, action))

    publish_time = {seq: at for _, seq, _, at in pg_conn.execute(
        sql.SQL("SELECT * FROM {}.published").format(table))}
    final_start = {}
    for key, items in by_key.items():
        for start, end, seq, prio, action in items:
            if action in ("ack", "reject"):
                final_start[seq] = start
    assert len(final_start) == total  # nothing lost
    prio_of = {seq: prio for _, seq, prio, _ in pg_conn.execute(sql.SQL("SELECT * FROM {}.published").format(table))}
    for key, items in by_key.items():
        items.sort()
        for (s1, e1, *_), (s2, *_rest) in zip(items, items[1:]):
            assert e1 <= s2, f"key {key}: two deliveries overlap"
        # Order: when a delivery started, no better message of the key that was already
        # published before the key was last released was still waiting.
        for (_, prev_end, *_), (start, _, seq, prio, _) in zip(items, items[1:]):
            for other, other_start in final_start.items():
                if other == seq or publish_time[other] >= prev_end or other_start < start:
                    continue
                if plan[other][0] != key:
                    continue
                better = (prio_of[other], -other) > (prio, -seq)
                assert not better, f"key {key}: {seq} ran while better {other} waited"
    no_leftovers = sql.SQL("SELECT count(*) FROM {}.messages").format(table)
    assert pg_conn.execute(no_leftovers).fetchone()[0] == 0
