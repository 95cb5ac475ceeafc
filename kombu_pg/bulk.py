"""Bulk publish: many Celery tasks in one INSERT (and one commit).

Single publishes each wait for a commit; a batch writes all its messages with one
statement when the block exits, so it costs about as much as one publish:

    with batch(app) as producer:
        for user_id in user_ids:
            refresh.apply_async((user_id,), producer=producer)
        group(sigs).apply_async(producer=producer)      # groups and chunks work too

All or nothing: if the block raises, nothing is published.  Messages with a job key
(which need their own outcome) are published at once, one by one.
"""

from __future__ import annotations

from contextlib import contextmanager
from time import monotonic
from typing import Iterable, Iterator

from celery import Celery
from celery.canvas import Signature
from celery.result import AsyncResult
from kombu import Producer

from . import metrics
from .store.broker import OutgoingMessage
from .transport import Channel, Transport

__all__ = ["batch", "send_many"]


class _BatchChannel(Channel):
    """A channel that collects default-exchange inserts and writes them in one statement."""

    def __init__(self, transport: Transport, max_size: int) -> None:
        super().__init__(transport)
        self.max_size = max_size
        self.pending: list[OutgoingMessage] = []

    def _insert(self, queue, row) -> None:
        if row.job_key is not None:
            super()._insert(queue, row)
            return
        self.pending.append(OutgoingMessage(queue, row.payload, row.priority, row.ttl, row.serial_key,
                                            row.visible_at))
        if len(self.pending) >= self.max_size:
            self.flush()

    def flush(self) -> int:
        messages, self.pending = self.pending, []
        started = monotonic()
        count = self.store.publish_many(messages)
        seconds = monotonic() - started
        serial = sum(1 for m in messages if m.serial_key is not None)
        for is_serial, n in ((True, serial), (False, count - serial)):
            if n:
                metrics.published(is_serial, seconds, n)
        return count


@contextmanager
def batch(app: Celery, *, max_size: int = 5000) -> Iterator[Producer]:
    """A producer whose publishes are written together when the block exits.

    Batches larger than ``max_size`` are written in several statements (bounded memory);
    each statement is durable when it returns.
    """
    with app.pool.acquire(block=True) as connection:
        transport = connection.transport
        if not isinstance(transport, Transport):
            raise TypeError(f"bulk publish needs the kombu-pg broker, not {transport.driver_type!r}")
        connection.ensure_connection()
        channel = _BatchChannel(transport, max_size)
        try:
            yield app.amqp.Producer(channel, auto_declare=False)
            channel.flush()
        finally:
            channel.pending = []
            channel.close()


def send_many(signatures: Iterable[Signature], *, app: Celery | None = None, **options) -> list[AsyncResult]:
    """Publish every signature in one statement; return their results in order."""
    signatures = list(signatures)
    if not signatures:
        return []
    app = app or signatures[0].app
    with batch(app) as producer:
        return [sig.apply_async(producer=producer, **options) for sig in signatures]
