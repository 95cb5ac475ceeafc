"""kombu_pg only: serial-key throughput next to unkeyed, and bulk publish next to single.

Serial keys: N messages are published first (unkeyed, or spread round-robin over 64 serial
keys), then 8 consumers (8 threads, each its own connection, prefetch 10, ack each) drain
them; the figure is messages drained per second.  Serial keys cost a per-key protocol in
every claim, and at most 64 messages can be in flight at once, one per key.

Bulk publish: N Celery tasks sent one ``send_task`` at a time (each a commit), then the
same N signatures through ``kombu_pg.bulk.send_many`` (1,000 messages per INSERT, all in
one transaction), after one warm-up call of each.
"""

from __future__ import annotations

import threading
import time

from celery import Celery
from kombu import Consumer, Producer, Queue
from kombu.message import Message

from .brokers import Broker, delete_entities
from .scenarios import Context, Measured, Metric, scenario

CONSUMERS = 8
KEYS = 64


@scenario(
    "kombu_pg_features",
    f"kombu_pg only: {CONSUMERS} consumers draining unkeyed vs {KEYS} serial keys; Celery bulk vs single publish",
    [Metric("unkeyed", "unkeyed drain msg/s"), Metric("keyed", f"{KEYS}-key drain msg/s"),
     Metric("single", "single publish tasks/s"), Metric("bulk", "bulk publish tasks/s")],
    applies=lambda broker: broker.is_reference,
)
def features(ctx: Context, broker: Broker) -> Measured:
    n = ctx.params.messages
    out = Measured()
    for metric, keys in (("unkeyed", None), ("keyed", KEYS)):
        name = ctx.name("serial", metric)
        try:
            _publish(broker, name, n, keys)
            drained, seconds = _drain(broker, name, n, ctx.params.stall_timeout_s)
        finally:
            delete_entities(broker, [name])
        if drained == n:
            out.values[metric] = n / seconds
        else:
            out.notes.append(f"{metric} drain stalled at {drained} of {n}")
    if "unkeyed" in out.values and "keyed" in out.values:
        out.notes.append(f"{KEYS} keys at {out.values['keyed'] / out.values['unkeyed']:.0%} of unkeyed")
    single, bulk = _celery_publish(broker, ctx.name("bulk"), ctx.params.tasks)
    out.values.update(single=single, bulk=bulk)
    out.notes.append(f"bulk {bulk / single:.1f}x single")
    return out


def _publish(broker: Broker, queue: str, n: int, keys: int | None) -> None:
    with broker.connection() as conn:
        producer = Producer(conn.default_channel)
        Queue(queue)(producer.channel).declare()
        for seq in range(n):
            headers = {"serial_key": f"k{seq % keys}"} if keys else {}
            producer.publish({"seq": seq}, routing_key=queue, headers=headers)


def _drain(broker: Broker, queue: str, n: int, stall_timeout: float) -> tuple[int, float]:
    lock = threading.Lock()
    done = threading.Event()
    received = 0

    def consume() -> None:
        nonlocal received

        def on_message(body: object, message: Message) -> None:
            nonlocal received
            message.ack()
            with lock:
                received += 1
                if received >= n:
                    done.set()

        with broker.connection() as conn:
            with Consumer(conn, [Queue(queue)], callbacks=[on_message], prefetch_count=10):
                while not done.is_set():
                    try:
                        conn.drain_events(timeout=0.2)
                    except TimeoutError:
                        pass

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(CONSUMERS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    done.wait(stall_timeout + n / 100)
    done.set()
    for thread in threads:
        thread.join(30)
    return received, time.perf_counter() - started


def _celery_publish(broker: Broker, queue: str, n: int) -> tuple[float, float]:
    from kombu_pg.bulk import send_many

    app = Celery("bench_bulk", broker=broker.url, set_as_current=False)
    app.conf.broker_transport_options = dict(broker.transport_options)
    try:
        app.send_task("bench.noop", queue=queue)  # warm up: connection, declare
        started = time.perf_counter()
        for _ in range(n):
            app.send_task("bench.noop", queue=queue)
        single = n / (time.perf_counter() - started)
        send_many([app.signature("bench.noop", queue=queue)], app=app)  # warm up
        started = time.perf_counter()
        send_many((app.signature("bench.noop", queue=queue) for _ in range(n)), app=app)
        bulk = n / (time.perf_counter() - started)
        return single, bulk
    finally:
        delete_entities(broker, [queue])
        app.close()
