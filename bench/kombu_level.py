"""Kombu level: one producer publishes N messages, then one consumer drains them.

Publish: ``Producer.publish`` of a small JSON body, ``delivery_mode=2`` (persistent), one
call per message, on a durable queue; the clock stops when the last call returns.  Whether
a returned publish is stored durably depends on the broker (kombu_pg: committed; RabbitMQ:
only with ``confirm_publish``; Redis: in memory, fsync per its own config).

Drain: a second connection, ``basic_qos(prefetch_count=100)``, a ``Consumer`` whose
callback acks each message, and a ``Connection.drain_events`` loop until N arrived; the
clock runs from ``consume()`` until the consumer is cancelled (buffered acks flushed).
"""

from __future__ import annotations

import time

from kombu import Consumer, Exchange, Queue
from kombu.message import Message

from .brokers import Broker, delete_entities
from .scenarios import Context, Measured, Metric, scenario

PREFETCH = 100


@scenario(
    "kombu",
    "Kombu level: one producer publishes N, one consumer drains N (ack each, prefetch 100)",
    [Metric("publish", "publish msg/s"), Metric("drain", "drain msg/s")],
)
def publish_then_drain(ctx: Context, broker: Broker) -> Measured:
    name = ctx.name("kombu", broker.key)
    exchange = Exchange(name, "direct", durable=True)
    queue = Queue(name, exchange, routing_key=name, durable=True)
    n = ctx.params.messages
    try:
        published_s = _publish(broker, queue, n, "x" * ctx.params.payload_bytes)
        drained, drained_s = _drain(broker, queue, n, ctx.params.stall_timeout_s)
    finally:
        delete_entities(broker, [name])
    out = Measured({"publish": n / published_s})
    if drained == n:
        out.values["drain"] = n / drained_s
    else:
        out.notes.append(f"drain stalled: {drained} of {n} messages arrived")
    return out


def _publish(broker: Broker, queue: Queue, n: int, pad: str) -> float:
    """Seconds to publish ``n`` messages, connection and queue set up beforehand."""
    with broker.connection() as conn:
        producer = conn.Producer(serializer="json")
        queue(producer.channel).declare()
        started = time.perf_counter()
        for seq in range(n):
            producer.publish(
                {"seq": seq, "pad": pad},
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                delivery_mode=2,
            )
        return time.perf_counter() - started


def _drain(broker: Broker, queue: Queue, n: int, stall_timeout: float) -> tuple[int, float]:
    """Consume until ``n`` messages were acked or none came for ``stall_timeout`` seconds;
    returns (count, seconds from the start of consuming until the consumer is cancelled)."""
    received = 0
    last_ack = 0.0

    def on_message(body: object, message: Message) -> None:
        nonlocal received, last_ack
        message.ack()
        received += 1
        last_ack = time.perf_counter()

    with broker.connection() as conn:
        channel = conn.channel()
        # Positional: py-amqp and the virtual transports name the global flag differently.
        channel.basic_qos(0, PREFETCH, False)
        # The clock starts before consume(), where a transport may claim its first batch,
        # and stops after the cancel, where a transport that batches acks (kombu_pg)
        # flushes the last ones: until then they are not recorded by the broker.
        started = last_ack = time.perf_counter()
        with Consumer(channel, [queue], callbacks=[on_message], accept=["json"]):
            while received < n:
                try:
                    conn.drain_events(timeout=1.0)
                except TimeoutError:
                    if time.perf_counter() - last_ack > stall_timeout:
                        break
        return received, time.perf_counter() - started
