"""Bulk publish: many Celery tasks in one INSERT (and one commit).

Single publishes each wait for a commit; a batch writes all its messages with one
statement when the block exits, so it costs about as much as one publish:

    with batch(app) as producer:
        for user_id in user_ids:
            refresh.apply_async((user_id,), producer=producer)
        group(sigs).apply_async(producer=producer)      # groups and chunks work too

    send_many(refresh.s(user_id) for user_id in user_ids)   # the fastest path

All or nothing: if the block raises, nothing is published.  Every publish of the block
joins the batch, in publish order: named exchanges, job keys, delayed messages, and the
signatures ``send_many`` hands to ``apply_async`` too.

``send_many`` also skips most of Celery's per-call work: the first task of each shape
(task name and options) is published by Celery itself, and the message it produced becomes
a template for the rest, which only get their own id, arguments and headers.  Anything a
template cannot reproduce exactly (publish signals, sent events, routers that look at the
arguments, countdown/eta/expires, links, canvases) goes through ``apply_async`` as usual.
A ``before_task_publish`` receiver marked with :data:`TEMPLATE_SAFE` (it only adds headers
whose value one batch may share, such as celery_dlq's publish time) keeps templates on.
"""

from __future__ import annotations

import gc
import queue
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from celery import Celery, signals
from celery.app.routes import MapRoute
from celery.app.task import Task
from celery.canvas import Signature
from celery.result import AsyncResult
from celery.utils import uuid
from celery.utils.saferepr import saferepr
from kombu import Producer
from kombu.exceptions import OperationalError
from kombu.serialization import dumps, loads, registry

from .publish_batch import write
from .store.broker import BrokerStore, OutgoingMessage
from .transport import Channel, Transport

__all__ = ["batch", "send_many"]


class _BatchChannel(Channel):
    """A channel that holds every publish and writes them together.

    A batch that fits in one chunk is one statement.  A larger one is written a chunk at a
    time by a :class:`_Writer` while the caller builds the next chunk, all in one
    transaction: memory stays bounded and the batch stays all or nothing.
    """

    def __init__(self, transport: Transport, chunk_size: int) -> None:
        super().__init__(transport)
        self.chunk_size = chunk_size
        self.pending: list[OutgoingMessage] = []
        self.writer: _Writer | None = None
        # What the last basic_publish stored: send_many's templates are taken from it.
        self.last_publish: tuple[dict, str] | None = None

    def basic_publish(self, message, exchange, routing_key, **kwargs):
        self.last_publish = None
        super().basic_publish(message, exchange, routing_key, _publish_batch=self)
        self.last_publish = (message, exchange)

    def add(self, message: OutgoingMessage) -> None:
        """Hold one message of the batch (see :class:`kombu_pg.publish_batch.Batch`)."""
        self.pending.append(message)
        if len(self.pending) >= self.chunk_size:
            if self.writer is None:
                self.writer = _Writer(self.connection, self.store.schema, self.deadletter_queue)
            self.writer.write(self._take())

    def _take(self) -> list[OutgoingMessage]:
        messages, self.pending = self.pending, []
        return messages

    def commit(self) -> None:
        """Write what is pending; durable when this returns."""
        if self.writer is None:
            write(self.store, self._take(), deadletter=self.deadletter_queue)
        else:
            if self.pending:
                self.writer.write(self._take())
            self.writer, writer = None, self.writer
            writer.commit()

    def discard(self) -> None:
        self.pending = []
        if self.writer is not None:
            self.writer, writer = None, self.writer
            writer.rollback()


class _Writer:
    """Inserts chunks on its own connection and thread, in one transaction.

    One chunk waits while another is written, so memory stays bounded; the first error
    is raised to the caller at its next call, and the transaction then rolls back.
    """

    _COMMIT, _ROLLBACK = object(), object()

    def __init__(self, transport: Transport, schema: str, deadletter: str | None) -> None:
        self.store = BrokerStore(transport._connect(), schema)
        self.deadletter = deadletter
        self.chunks: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kombu-pg-bulk-writer", daemon=True)
        self.thread.start()

    def write(self, messages: list[OutgoingMessage]) -> None:
        self._raise()
        self.chunks.put(messages)

    def commit(self) -> None:
        self._finish(self._COMMIT)
        self._raise()

    def rollback(self) -> None:
        self._finish(self._ROLLBACK)

    def _finish(self, how: object) -> None:
        self.chunks.put(how)
        self.thread.join()
        self.store.conn.close()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        told = False  # whether the caller's commit/rollback has been taken off the queue
        try:
            with self.store.transaction():
                while (chunk := self.chunks.get()) is not self._COMMIT:
                    if chunk is self._ROLLBACK:
                        told = True
                        raise _RolledBack
                    write(self.store, chunk, deadletter=self.deadletter)
                told = True
        except _RolledBack:
            pass
        except BaseException as exc:  # the COMMIT itself can fail too
            self.error = exc
            # Keep taking chunks until told to finish: the caller never blocks on a writer
            # that is gone, and joins one that has ended.
            while not told:
                told = self.chunks.get() in (self._COMMIT, self._ROLLBACK)


class _RolledBack(Exception):
    pass


class _BatchProducer(Producer):
    """A producer for one batch: declares each queue once, and never retries a publish.

    Kombu's own declare check costs more than the insert.  A retry would revive the
    producer on a new channel after a connection error, so that publish and the ones
    after it would go out one by one, outside the batch: the whole batch fails instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._declared: list = []
        self._channel_set = False
        super().__init__(*args, **kwargs)
        self._channel_set = True

    def publish(self, *args: Any, **kwargs: Any):
        kwargs["retry"] = False
        return super().publish(*args, **kwargs)

    def revive(self, channel) -> None:
        if self._channel_set:
            raise OperationalError("the connection was lost during a kombu-pg batch: nothing in it "
                                   "was published")
        super().revive(channel)

    def maybe_declare(self, entity, retry=False, **retry_policy):
        if not entity or entity in self._declared:
            return False
        declared = super().maybe_declare(entity, retry, **retry_policy)
        self._declared.append(entity)
        return declared


@contextmanager
def batch(app: Celery, *, max_size: int = 1000) -> Iterator[Producer]:
    """A producer whose publishes are written together, durably, when the block exits.

    ``max_size`` messages at most are held in memory: a larger batch is written in
    statements of that many, in one transaction that commits when the block exits.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer, not {max_size!r}")
    with app.pool.acquire(block=True) as connection:
        transport = connection.transport
        if not isinstance(transport, Transport):
            raise TypeError(f"bulk publish needs the kombu-pg broker, not {transport.driver_type!r}")
        connection.ensure_connection()
        channel = _BatchChannel(transport, max_size)
        try:
            yield _BatchProducer(channel, auto_declare=False)
            with connection._reraise_as_library_errors():
                channel.commit()
        finally:
            channel.discard()
            channel.close()


def send_many(signatures: Iterable[Signature], *, app: Celery | None = None, max_size: int = 1000,
              **options) -> list[AsyncResult]:
    """Publish every signature in one statement; return their results in order.

    ``options`` apply to every signature, as in ``sig.apply_async(**options)``.
    """
    signatures = list(signatures)
    if not signatures:
        return []
    app = app or signatures[0].app
    options = {k: v for k, v in options.items() if v is not None}
    with _cyclic_gc_paused(), batch(app, max_size=max_size) as producer:
        sender = _TemplateSender(app, producer)
        return [sender.send(sig, options) for sig in signatures]


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    # Building thousands of messages allocates enough to trigger several full collections,
    # each walking the whole heap: in a large process (a web app, a bench after a few
    # scenarios) that took a third of the time.  What is built here holds no cycles.
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# Options whose value differs per message or that Celery turns into more than headers.
_NOT_TEMPLATED = frozenset({"countdown", "eta", "expires", "link", "link_error", "chord", "chain",
                            "argsrepr", "kwargsrepr", "stamped_headers", "connection", "router",
                            "producer", "publisher", "result_cls", "add_to_parent"})
_OWN = ("task_id", "headers")  # per message, applied to the template's copy


class _Template:
    """What every message of one shape shares, taken from one message Celery published."""

    def __init__(self, app: Celery, task: Task | None, sample: AsyncResult, message: dict,
                 queue: str) -> None:
        headers = message["headers"]
        self.app, self.queue, self.message = app, queue, message
        self.headers = headers
        self.properties = message["properties"]
        self.root_is_id = headers["root_id"] == sample.id
        self.serializer = registry.type_to_name[message["content-type"]]
        body = loads(_decode(message), message["content-type"], message["content-encoding"],
                     accept=[message["content-type"]])
        self.embed = body[2]
        self.check_arguments = getattr(task, "__header__", None) if task is not None and task.typing else None
        self.result_cls = type(sample)
        self.ignored = sample.ignored
        self.parent = app.current_worker_task
        self.repr_levels = app.conf.task_repr_maxlevels
        self.repr_size = (app.amqp.argsrepr_maxsize, app.amqp.kwargsrepr_maxsize)

    def send(self, channel: _BatchChannel, producer: Producer, args: tuple, kwargs: dict,
             options: dict) -> AsyncResult:
        if self.check_arguments is not None:
            self.check_arguments(*args, **kwargs)
        task_id = options.get("task_id") or uuid()
        headers = dict(self.headers, id=task_id, argsrepr=self._repr(args, self.repr_size[0]),
                       kwargsrepr=self._repr(kwargs, self.repr_size[1]))
        if self.root_is_id:
            headers["root_id"] = task_id
        if options.get("headers"):
            headers.update(options["headers"])
        _, _, data = dumps((args, kwargs, self.embed), serializer=self.serializer)
        body, _ = channel.encode_body(data, channel.body_encoding)
        # The template's delivery tag is kept: a claim replaces it with the claim's own.
        message = dict(self.message, body=body, headers=headers,
                       properties=dict(self.properties, correlation_id=task_id))
        channel.add(channel._row(message).outgoing(self.queue))
        if not self.ignored:
            self.app.backend.on_task_call(producer, task_id)
        result = self.result_cls(task_id)
        result.ignored = self.ignored
        if self.parent is not None:
            self.parent.add_trail(result)
        return result

    def _repr(self, value: tuple | dict, maxsize: int) -> str:
        # saferepr is the slowest step of a message; for a few plain scalars it equals repr.
        items = value.values() if type(value) is dict else value
        if len(items) <= 8 and all(type(item) in _PLAIN or (type(item) is str and _plain_str(item))
                                   for item in items) \
                and all(type(key) is str and _plain_str(key) for key in (value if type(value) is dict else ())):
            text = repr(value)
            if len(text) < maxsize // 2:
                return text
        return saferepr(value, maxsize, maxlevels=self.repr_levels)


_PLAIN = frozenset({int, float, bool, type(None)})


def _plain_str(text: str) -> bool:
    """Whether repr(text) is what saferepr prints: no escapes, no quote switching."""
    return text.isascii() and text.isprintable() and "'" not in text and "\\" not in text


def _decode(message: dict) -> Any:
    encoding = message["properties"].get("body_encoding")
    body = message["body"]
    return body if encoding in (None, "utf-8") else Channel.codecs[encoding].decode(body)


#: Set this attribute to True on a ``before_task_publish`` receiver that only adds headers
#: whose value every message of one batch may share: templated messages then carry the
#: value it gave the batch's first message of their shape.
TEMPLATE_SAFE = "kombu_pg_template_safe"


def _blocks_templates(signal: Any, honour_safe: bool) -> bool:
    """Whether a receiver of ``signal`` may make a message differ from its template."""
    for _, receiver in signal.receivers:
        if isinstance(receiver, weakref.ReferenceType):
            receiver = receiver()
        if receiver is not None and not (honour_safe and getattr(receiver, TEMPLATE_SAFE, False)):
            return True
    return False


class _TemplateSender:
    """Sends signatures through templates where that is exactly what Celery would send."""

    def __init__(self, app: Celery, producer: Producer) -> None:
        self.app = app
        self.producer = producer
        self.channel: _BatchChannel = producer.channel
        self.templates: dict[tuple, _Template | None] = {}
        self.enabled = (
            app.conf.task_protocol == 2
            and not app.conf.task_send_sent_event
            and not app.conf.task_always_eager
            and not _blocks_templates(signals.before_task_publish, honour_safe=True)
            and not _blocks_templates(signals.after_task_publish, honour_safe=False)
            and not _blocks_templates(signals.task_sent, honour_safe=False)
            # Routers other than task_routes mappings may look at the arguments.
            and all(isinstance(route, MapRoute) for route in app.amqp.router.routes)
        )

    def send(self, sig: Signature, options: dict) -> AsyncResult:
        if self.enabled and type(sig) is Signature and not sig.subtask_type:
            args, kwargs, merged = sig._merge((), {}, options) if options else (sig.args, sig.kwargs, sig.options)
            key = self._key(sig, merged)
        else:
            key = None
        template = self.templates.get(key) if key is not None else None
        if template is None:
            result = sig.apply_async(producer=self.producer, **options)
            if key is not None and key not in self.templates:
                self.templates[key] = self._template(sig, result)
            return result
        return template.send(self.channel, self.producer, args, kwargs, merged)

    def _key(self, sig: Signature, merged: dict) -> tuple | None:
        if not _NOT_TEMPLATED.isdisjoint(merged):
            return None
        try:
            shape = tuple(sorted((k, v) for k, v in merged.items() if k not in _OWN))
            header_names = tuple(sorted(merged.get("headers") or ()))
            key = (sig.task, sig.immutable, shape, header_names)
            hash(key)
        except TypeError:  # an unhashable option value: let Celery handle it
            return None
        return key

    def _template(self, sig: Signature, result: AsyncResult) -> _Template | None:
        published = self.channel.last_publish
        if published is None or not isinstance(result, AsyncResult):
            return None
        message, exchange = published
        headers = message["headers"]
        if exchange or headers.get("eta") or headers.get("expires") or "compression" in headers \
                or "expiration" in message["properties"] or headers.get("id") != result.id:
            return None
        task = self.app.tasks.get(sig.task)
        if task is not None and (type(task).shadow_name is not Task.shadow_name
                                 or task._dump_pydantic_arguments is not None):
            return None  # per-call hooks a template would skip
        return _Template(self.app, task, result, message, message["properties"]["delivery_info"]["routing_key"])
