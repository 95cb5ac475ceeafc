"""Kombu's ``Producer.batch()`` on kombu-pg: a batch's publishes in one statement.

    with producer.batch(max_size=1000):
        for n in range(10_000):
            producer.publish({"n": n}, exchange=exchange, routing_key="jobs")

Each publish is checked and routed as usual, then held; the batch writes what it holds
in one statement (one commit) every ``max_size`` messages and when the outermost block
exits.  If the block raises, what was not written yet is dropped (Kombu's contract).
Messages with a job key are held too, and written in their place (see
:meth:`BrokerStore.publish_many`); their outcome is not reported.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, Protocol, Sequence

from . import metrics
from .store import BrokerStore
from .store.broker import OutgoingMessage

if TYPE_CHECKING:
    from .transport import Channel


class Batch(Protocol):
    """What ``Channel.basic_publish`` hands a batched publish's message to."""

    def add(self, message: OutgoingMessage) -> None: ...


class PublishBatch:
    """The session ``Channel.create_publish_batch`` gives Kombu's producer batch."""

    def __init__(self, channel: "Channel", max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self.pending: list[OutgoingMessage] = []
        self.closed = False

    def publish(self, message: dict, exchange: str = "", routing_key: str = "", **kwargs) -> None:
        if self.closed:
            raise RuntimeError("kombu-pg publish batch is closed")
        self.channel.basic_publish(message, exchange, routing_key, _publish_batch=self)

    def add(self, message: OutgoingMessage) -> None:
        self.pending.append(message)
        if len(self.pending) >= self.max_size:
            self.flush()

    def flush(self) -> None:
        messages, self.pending = self.pending, []
        write(self.channel.store, messages, deadletter=self.channel.deadletter_queue)

    def discard(self) -> None:
        self.pending = []

    def close(self) -> None:
        self.closed = True
        self.pending = []


def write(store: BrokerStore, messages: Sequence[OutgoingMessage], *, deadletter: str | None = None) -> None:
    """Insert ``messages`` in publish order in one transaction, counted in the publish metrics."""
    started = monotonic()
    count = store.publish_many(messages, deadletter=deadletter)
    seconds = monotonic() - started
    serial = sum(1 for m in messages if m.serial_key is not None)
    # (A job key's "keep" may have dropped some: never count below zero.)
    for is_serial, n in ((True, serial), (False, max(count - serial, 0))):
        if n:
            metrics.published(is_serial, seconds, n)
