"""Kombu level: the scaling curve, N messages drained by 1, 2, 4 and 8 consumer processes.

For each consumer count the queue is filled with N = 2 x ``--messages`` messages (see
:mod:`bench.fill`), then that many consumer processes (:mod:`bench.fleet`), each one
Kombu connection with ``basic_qos(prefetch_count=100)`` acking every message, are released
together.  Throughput = N / (from the release until the consumer that acked the N-th
message has cancelled, flushing kombu_pg's buffered acks).  Every process shares the
machine's CPUs with the broker: on 2 vCPUs the curve shows contention as much as the
broker's own concurrency.
"""

from __future__ import annotations

from .brokers import Broker, delete_entities
from .fill import fill
from .fleet import Fleet, Member, consume
from .kombu_level import PREFETCH
from .scenarios import Context, Measured, Metric, scenario

CONSUMERS = (1, 2, 4, 8)


@scenario(
    "scaling",
    f"Kombu level: 2 × N messages drained by {', '.join(map(str, CONSUMERS))} consumer processes "
    f"(prefetch {PREFETCH}, ack each)",
    [Metric(f"c{k}", f"{k} consumer{'s' if k > 1 else ''} msg/s") for k in CONSUMERS],
    # The SQLAlchemy transport drains a few hundred a second: its curve would take minutes
    # and say nothing new.  RabbitMQ with confirms differs only when publishing.
    applies=lambda broker: broker.key in ("kombu_pg", "redis", "amqp"),
    in_quick=False,
)
def scaling(ctx: Context, broker: Broker) -> Measured:
    n = 2 * ctx.params.messages
    out = Measured()
    for k in CONSUMERS:
        name = ctx.name("scale", broker.key, str(k))
        try:
            fill(broker, name, n, "x" * ctx.params.payload_bytes)
            members: list[Member] = [(consume, (broker, name, PREFETCH, n))] * k
            with Fleet(members) as fleet:
                started = fleet.go()
                drained = fleet.wait(n, ctx.params.stall_timeout_s)
                results = fleet.finish()
        finally:
            delete_entities(broker, [name])
        finished = max(r["finished"] for r in results)
        if drained >= n and finished:
            out.values[f"c{k}"] = n / (finished - started)
        else:
            out.notes.append(f"{k} consumers: stalled at {drained} of {n}")
    first, last = out.values.get(f"c{CONSUMERS[0]}"), out.values.get(f"c{CONSUMERS[-1]}")
    if first and last:
        out.notes.append(f"{CONSUMERS[-1]} ÷ {CONSUMERS[0]}: {last / first:.2f}×")
    best = max(out.values, key=out.values.__getitem__, default=None)
    if best:
        out.notes.append(f"peak at {best[1:]}")
    return out
