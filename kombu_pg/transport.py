"""The Kombu transport: a thin adapter from Kombu's virtual channel API to the SQL store.

Messages are rows locked in place (never popped): a claim stamps a lock token, which is
the delivery tag; ack deletes by token, requeue unlocks by token.  Routing state
(exchanges, bindings) is read from the database on every publish, so a binding made in
one process routes a publish from another.  Wake-ups come from LISTEN/NOTIFY, through
Celery's event loop when there is one and through ``select`` otherwise.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from queue import Empty
from time import monotonic
from typing import Any

import psycopg
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.compat import register_after_fork
from kombu.utils.json import dumps, loads
from kombu.utils.scheduling import FairCycle
from psycopg.errors import ReadOnlySqlTransaction

from . import metrics
from .config import Options, build_conninfo, redact, redact_url
from .publish_batch import Batch, PublishBatch
from .store import JOB_KEY_MODES, BrokerStore, Claimed, JobPublish, connect, ensure_schema
from .store.broker import JOB_KEY_HEADER, JOB_KEY_MODE_HEADER, SERIAL_KEY_HEADER, OutgoingMessage
from .store.routing import check_queue_name, topic_pattern
from .store.wakeups import Listener

logger = logging.getLogger(__name__)

#: In the event loop, acks are written together: at the next claim, when this many are
#: waiting, or this many seconds after the first (a lost batch only means redelivery).
ACK_BATCH = 64
ACK_WINDOW = 0.01

EXCHANGE_TYPES = ("direct", "topic", "fanout")

class InvalidMessage(ValueError):
    """A row whose payload is not a Kombu message."""


class QoS(virtual.QoS):
    """Prefetch accounting in memory; acks are batched, requeues go straight to the database.

    An ack only joins the transport's ack buffer, which is flushed before the next claim,
    before waiting, on every event-loop tick and at close: a lost buffer can only cause a
    redelivery (at-least-once), never a loss.
    """

    def claim_limit(self) -> int:
        """How many messages to claim now: 0 until the prefetch window is half free.

        Refilling at half the window (instead of one message per ack) keeps claims batched.
        """
        cap = self.channel.connection.options.claim_batch_max
        prefetch = self.prefetch_count
        if not prefetch:
            return cap
        unacked = len(self._delivered) - len(self._dirty)
        headroom = prefetch - unacked
        if unacked and headroom < min(cap, max(1, prefetch // 2)):
            return 0
        return max(min(headroom, cap), 0)

    def ack(self, delivery_tag: str) -> None:
        if self.channel.connection is None:
            # The channel closed (connection lost): its deliveries were handed back, or
            # recovery frees them once their session is gone.  Nothing is left to ack.
            return
        could_claim = self.claim_limit()
        self.channel.connection.buffer_ack(delivery_tag)
        metrics.acked(self._delivered.get(delivery_tag))
        super().ack(delivery_tag)
        if not could_claim and self.claim_limit():
            self.channel.connection.wake(self.channel)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self.channel.connection is None:
            return  # as in ack: the channel is closed, recovery unlocks the message
        could_claim = self.claim_limit()
        transport = self.channel.connection
        if requeue:
            self.channel.store.requeue([delivery_tag])
        elif transport.options.dead_letter_rejected:
            self.channel.store.dead_letter(delivery_tag, "rejected by consumer")
        else:
            transport.buffer_ack(delivery_tag)
            logger.info("kombu-pg: message %s rejected without requeue and deleted", delivery_tag)
        metrics.rejected(self._delivered.get(delivery_tag), requeue)
        super().ack(delivery_tag)
        if not could_claim and self.claim_limit():
            self.channel.connection.wake(self.channel)

    def restore_unacked(self) -> list:
        """Unlock every unacked delivery in place, in one statement."""
        self._flush()
        tags = list(self._delivered)
        self._delivered.clear()
        try:
            self.channel.connection.flush_acks()
            if tags:
                self.channel.store.requeue(tags)
        except psycopg.Error as exc:
            # Nothing was removed from the table: recovery unlocks these once this
            # session is gone, so there is nothing to dump.
            logger.warning("kombu-pg: could not hand back %d message(s) now (%s); "
                           "recovery will", len(tags), exc)
        return []


class Channel(virtual.Channel):
    QoS = QoS
    supports_fanout = True
    do_restore = True

    def __init__(self, connection: "Transport", **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._noack_queues: set[str] = set()
        #: What the last publish with a job key did (read by kombu_pg.jobs).
        self.last_job_publish: JobPublish | None = None
        # auto_delete/exclusive queues this channel declared: deleted when it closes.
        self._owned_queues: set[str] = set()
        # Connect now, so a bad URL fails in Connection.connect(), not at first use.
        self.store = self._open_store()

    def _open_store(self) -> BrokerStore:
        return self.connection.work_store()

    # -- declarations ----------------------------------------------------------

    def prepare_queue_arguments(self, arguments, **kwargs):
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue, durable=True, exclusive=False, auto_delete=False,
                   arguments=None, **kwargs):
        check_queue_name(queue)
        arguments = arguments or {}
        temporary = auto_delete or exclusive
        self.store.declare_queue(
            queue,
            durable=bool(durable),
            exclusive=bool(exclusive),
            auto_delete=bool(auto_delete),
            message_ttl_ms=arguments.get("x-message-ttl"),
            expires_ms=arguments.get("x-expires"),
            max_priority=arguments.get("x-max-priority"),
            # It lives as long as this session (or a consumer of it): see unused_queues.
            owner=self.connection.consumer_id() if temporary else None,
        )
        if temporary:
            self._owned_queues.add(queue)

    def _has_queue(self, queue, **kwargs):
        return self.store.queue_exists(queue)

    def exchange_declare(self, exchange=None, type="direct", durable=False,
                         auto_delete=False, arguments=None, nowait=False, passive=False):
        type = type or "direct"
        exchange = exchange or f"amq.{type}"
        if passive:
            if self.store.exchange_type(exchange) is None:
                return super().exchange_declare(exchange, type, passive=True)
            return None
        if type not in EXCHANGE_TYPES:
            raise NotImplementedError(
                f"kombu-pg supports {', '.join(EXCHANGE_TYPES)} exchanges, not {type!r}")
        super().exchange_declare(exchange, type, durable, auto_delete, arguments, nowait)
        self.store.declare_exchange(exchange, type, durable=bool(durable), auto_delete=bool(auto_delete))

    def _exchange_type_name(self, exchange: str) -> str:
        try:
            return self.state.exchanges[exchange]["type"]
        except KeyError:
            return self.store.exchange_type(exchange) or "direct"

    def typeof(self, exchange, default="direct"):
        return self.exchange_types[self._exchange_type_name(exchange) if exchange else default]

    def queue_bind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        exchange = exchange or "amq.direct"
        check_queue_name(queue)
        type_name = self._exchange_type_name(exchange)
        pattern = topic_pattern(routing_key or "") if type_name == "topic" else None
        self.store.bind(exchange, queue, routing_key or "", pattern, exchange_type=type_name)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        self.store.unbind(exchange or "amq.direct", queue, routing_key or "")

    def get_table(self, exchange):
        return self.store.bindings(exchange)

    def list_bindings(self):
        return iter(self.store.all_bindings())

    def get_exchanges(self):
        return self.store.exchanges()

    def queue_delete(self, queue, if_unused=False, if_empty=False, **kwargs):
        if if_empty and self._size(queue):
            return
        self._delete(queue)
        self.state.queue_bindings_delete(queue)
        self._owned_queues.discard(queue)

    def exchange_delete(self, exchange, if_unused=False, nowait=False):
        self.store.delete_exchange(exchange)
        self.state.exchanges.pop(exchange, None)

    def _delete(self, queue, *args, **kwargs):
        poison = self.store.delete_queue(queue, self.connection.options.max_deliveries)
        _poison_deleted("queue_deleted", {queue: poison})

    # -- publish ----------------------------------------------------------------

    def basic_publish(self, message, exchange, routing_key, _publish_batch: Batch | None = None,
                      **kwargs):
        """Route, insert and notify in one statement; durable on return.

        A publish notifies only a queue with an idle consumer (see ``BrokerStore.mark_idle``).
        With ``_publish_batch`` (Kombu's ``Producer.batch()``, kombu_pg.bulk) the message is
        checked, then held by the batch, whatever its exchange or job key: the batch writes
        its messages in publish order, in one transaction.
        """
        if self.connection is None:
            # Closed under us (a reconnect inside a retried declare): a connection error
            # makes Kombu's publish retry publish again on the new channel.
            raise psycopg.InterfaceError("kombu-pg channel is closed (its connection was lost)")
        self._inplace_augment_message(message, exchange, routing_key)
        row = self._row(message)
        if not exchange:
            queue = routing_key or self.deadletter_queue
            if not queue:
                # AMQP would drop it silently; refusing keeps the message with its sender.
                raise ValueError("publish to the default exchange needs a routing key (the queue name)")
            if _publish_batch is not None:
                check_queue_name(queue)
                _publish_batch.add(row.outgoing(queue))
            else:
                self._insert(queue, row)
            return
        if row.job_key is not None:
            raise ValueError("job keys need the default exchange (routing key = queue): one waiting "
                             "message per key cannot span several bound queues")
        if _publish_batch is not None:
            _publish_batch.add(row.outgoing(routing_key or "", exchange=exchange))
            return
        started = monotonic()
        queues = self.store.publish_routed(exchange, routing_key, row.payload, priority=row.priority,
                                           ttl=row.ttl, serial_key=row.serial_key,
                                           visible_at=row.visible_at, notify=self._should_notify(row))
        metrics.published(row.serial_key is not None, monotonic() - started, len(queues))
        if not queues and self.deadletter_queue:
            logger.warning("kombu-pg: no route for exchange=%r routing_key=%r; sent to %r",
                           exchange, routing_key, self.deadletter_queue)
            self._insert(self.deadletter_queue, row)

    def _row(self, message: dict) -> "_Row":
        return _Row.from_message(message, self._get_message_priority(message),
                                 native_delay=self.connection.options.native_delayed_delivery)

    def _insert(self, queue: str, row: "_Row") -> None:
        check_queue_name(queue)
        if row.job_key is not None:
            self._insert_job(queue, row)
            return
        started = monotonic()
        self.store.publish(queue, row.payload, priority=row.priority, ttl=row.ttl, serial_key=row.serial_key,
                           visible_at=row.visible_at, notify=self._should_notify(row))
        metrics.published(row.serial_key is not None, monotonic() - started)

    def _should_notify(self, row: "_Row") -> bool | None:
        # None: the store decides (delayed messages, and queues with an idle consumer).
        return None

    def _insert_job(self, queue: str, row: "_Row") -> None:
        started = monotonic()
        self.last_job_publish = self.store.publish_job(
            queue, row.payload, row.job_key, mode=row.job_key_mode, priority=row.priority, ttl=row.ttl,
            serial_key=row.serial_key, visible_at=row.visible_at)
        metrics.published(row.serial_key is not None, monotonic() - started,
                          self.last_job_publish.outcome != "dropped")
        if self.last_job_publish.outcome == "dropped":
            logger.info("kombu-pg: message with job key %r dropped: one is already waiting (mode keep)",
                        row.job_key)

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        """Kombu's ``Producer.batch()``: publishes written together (see kombu_pg.publish_batch)."""
        return PublishBatch(self, max_size)

    def _put(self, queue, message, **kwargs):
        self._insert(queue, self._row(message))

    # -- consume ----------------------------------------------------------------

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        if no_ack:
            self._noack_queues.add(queue)
        else:
            self._noack_queues.discard(queue)
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        self.connection.on_consume(queue)
        return result

    def basic_cancel(self, consumer_tag):
        if self.connection is None:
            return None  # closed: close() already cancelled every consumer
        queue = self._tag_to_queue.get(consumer_tag)
        self.connection.flush_acks()
        result = super().basic_cancel(consumer_tag)
        if queue is not None and queue not in self._active_queues:
            self._noack_queues.discard(queue)
            if queue in self._owned_queues:
                # AMQP auto_delete: the queue goes when its last consumer does.
                self.queue_delete(queue)
            else:
                self.connection.on_cancel(queue)
        return result

    def basic_get(self, queue, no_ack=False, **kwargs):
        self.store.touch_queues([queue])
        messages = self.fetch(queue, 1, no_ack=no_ack)
        if not messages:
            return None
        message = self.Message(messages[0], channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def _get(self, queue, timeout=None):
        messages = self.fetch(queue, 1)
        if not messages:
            raise Empty()
        return messages[0]

    def fetch(self, queue: str, limit: int, *, no_ack: bool | None = None) -> list[dict]:
        """Claim up to ``limit`` messages of ``queue`` as Kombu payloads, best first."""
        if no_ack is None:
            no_ack = queue in self._noack_queues
        transport = self.connection
        options = transport.options
        consumer_id = transport.consumer_id()
        # Buffered acks ride on the claim: one round trip and one commit for both.
        acks = transport.take_acks()
        started = monotonic()
        try:
            rows = self.store.claim(queue, limit, consumer_id, max_deliveries=options.max_deliveries,
                                    acks=acks, durable=options.durable_acks)
        except BaseException:
            transport.return_acks(acks)
            raise
        claim_seconds = monotonic() - started
        if no_ack:
            # Nobody will ack: done with them as soon as they are handed over.
            self.store.ack([row.token for row in rows], durable=options.durable_acks)
        messages = []
        for row in rows:
            try:
                messages.append(self._to_payload(row))
            except InvalidMessage as exc:
                self._set_aside(queue, row, exc, no_ack)
        metrics.claimed(messages, claim_seconds, no_ack)
        return messages

    def _to_payload(self, row: Claimed) -> dict:
        try:
            payload = loads(row.payload)
        except Exception as exc:
            raise InvalidMessage(f"payload is not JSON: {exc}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict):
            raise InvalidMessage("payload is not a Kombu message (no properties mapping)")
        if not isinstance(payload.get("headers") or {}, dict):
            raise InvalidMessage("message headers are not a mapping")
        properties = payload["properties"]
        body, encoding = payload.get("body"), properties.get("body_encoding")
        if body is not None and not isinstance(body, str):
            raise InvalidMessage("message body is not text")
        if encoding == "base64" and body:
            try:
                base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidMessage("message body is not valid base64") from None
        elif encoding not in (None, "base64", "utf-8") and encoding not in self.codecs:
            raise InvalidMessage(f"unknown body encoding {encoding!r}")
        properties["delivery_tag"] = row.token
        delivery_info = properties.setdefault("delivery_info", {})
        if not isinstance(delivery_info, dict):
            raise InvalidMessage("delivery_info is not a mapping")
        delivery_info["redelivered"] = row.delivery_count > 1
        return payload

    def _set_aside(self, queue: str, row: Claimed, exc: InvalidMessage, no_ack: bool) -> None:
        logger.error("kombu-pg: message %s in queue %r is not a valid Kombu message (%s); "
                     "moved to %s.invalid_messages", row.id, queue, exc, self.store.schema)
        if no_ack:  # already removed from its queue: keep it all the same
            self.store.set_aside(row.id, queue, row.payload, str(exc))
        else:
            self.store.quarantine(row.token, str(exc))

    def deliver_batch(self, queue: str, callback) -> int:
        """Claim as many messages as the prefetch headroom allows and deliver them."""
        limit = self.qos.claim_limit()
        if not limit:
            return 0
        messages = self.fetch(queue, limit)
        if len(messages) == limit:
            self.connection.mark_busy(queue)
        for message in messages:
            callback(message, queue)
        return len(messages)

    def _get_and_deliver_batch(self, queue, callback):
        if not self.deliver_batch(queue, callback):
            raise Empty()

    def _reset_cycle(self):
        self._cycle = FairCycle(self._get_and_deliver_batch, self._active_queues, Empty)

    # -- size, purge, restore -----------------------------------------------------

    def _size(self, queue):
        return self.store.size(queue)

    def _purge(self, queue):
        purged = self.store.purge(queue, self.connection.options.max_deliveries)
        _poison_deleted("purged", {queue: purged.poison})
        return purged.messages

    def _restore(self, message):
        self.store.requeue([message.delivery_tag])

    def _restore_at_beginning(self, message):
        self._restore(message)

    def close(self):
        owned, self._owned_queues = self._owned_queues, set()
        max_deliveries = self.connection.options.max_deliveries if self.connection else None
        super().close()
        for queue in owned:
            try:
                _poison_deleted("queue_deleted", {queue: self.store.delete_queue(queue, max_deliveries)})
            except psycopg.Error:
                break  # recovery removes them once this session is gone


class Transport(virtual.Transport):
    Channel = Channel

    default_port = 5432
    driver_type = "postgresql"
    driver_name = "psycopg"
    can_parse_url = True

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,
        exchange_type=frozenset(EXCHANGE_TYPES),
        heartbeats=False,
    )

    # A server that turned read-only (a primary demoted to a standby, or
    # default_transaction_read_only turned on) refuses every write of the session: like a
    # lost connection, Kombu and Celery then drop it and connect again, which reaches the
    # new primary when the URL lists several hosts with target_session_attrs=read-write.
    connection_errors = virtual.Transport.connection_errors + (
        psycopg.OperationalError,
        psycopg.InterfaceError,
        ReadOnlySqlTransaction,
    )
    channel_errors = virtual.Transport.channel_errors
    recoverable_connection_errors = (
        psycopg.OperationalError, psycopg.InterfaceError, ReadOnlySqlTransaction, OSError,
    )
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs):
        self.options = Options.from_mapping(client.transport_options)
        if "notify_debounce" in (client.transport_options or {}):
            logger.warning("kombu-pg: the notify_debounce option is deprecated and ignored: a publish "
                           "notifies only queues that have an idle consumer")
        super().__init__(client, **kwargs)
        self.polling_interval = self.options.polling_interval
        self.conninfo = build_conninfo(
            client.hostname or "postgresql://",
            database=client.virtual_host,
            user=client.userid,
            password=client.password,
            port=client.port,
            connect_timeout=client.connect_timeout,
            ssl=client.ssl,
            extra=self.options.connect_kwargs,
        )
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._work: BrokerStore | None = None
        self._listener: Listener | None = None
        self._consumer_id: int | None = None
        self._pending: set[str] = set()
        self._next_maintenance = 0.0
        self._next_due: float | None = None
        self._due_timer = None
        self._ack_timer = None
        self._hub = None
        self._timers: list = []
        self._maintenance: BrokerStore | None = None
        self._wake_fds: tuple[int, int] | None = None
        self._acks: list[str] = []
        self._ack_lock = threading.Lock()
        # Event-loop mode claims on a thread of its own, so the loop (Celery's prefork
        # main process) keeps feeding the pool while PostgreSQL works: one at a time.
        self._claimer: ThreadPoolExecutor | None = None
        self._claim: _PendingClaim | None = None
        # The thread running drain_events or the event loop; acks from others wake it.
        self._loop_thread: int | None = None
        #: Queues this session's consumer is marked idle on (BrokerStore.mark_idle), on the
        #: listening connection: its producers publish on the work connection, and a
        #: session never conflicts with its own advisory locks.
        self._idle: set[str] = set()
        register_after_fork(self, _after_fork)

    # -- connections ----------------------------------------------------------------

    def work_store(self) -> BrokerStore:
        """The connection channels share for publish, claim and ack (connects lazily)."""
        with self._lock:
            if self._work is not None and (self._work.conn.closed or self._work.conn.broken):
                # The session is gone, and with it this consumer's registration and locks
                # (recovery frees those): start again with new sessions.
                self._drop_sessions()
            if self._work is None:
                conn = self._connect()
                self._migrate(conn)
                self._work = self._store(conn)
            return self._work

    def _store(self, conn: psycopg.Connection) -> BrokerStore:
        store = BrokerStore(conn, self.options.schema)
        store.on_superseded = metrics.superseded
        return store

    def _connect(self) -> psycopg.Connection:
        try:
            return connect(self.conninfo, jit=False)
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(
                f"kombu-pg cannot connect to {redact(self.conninfo)}: {exc}") from exc

    def _migrate(self, conn: psycopg.Connection) -> None:
        ensure_schema(conn, self.conninfo, self.options.schema, auto_migrate=self.options.auto_migrate)

    def consumer_id(self) -> int:
        """This transport's consumer registration, made on its first claim."""
        with self._lock:
            if self._consumer_id is None:
                self._consumer_id = self.work_store().register_consumer()
            return self._consumer_id

    def listener(self) -> Listener:
        with self._lock:
            if self._listener is None:
                work = self.work_store()
                self._listener = Listener(self.conninfo, work.channel, work.due_channel, self._on_due)
            return self._listener

    def _drop_sessions(self) -> None:
        for store in (self._work, self._listener):
            if store is not None:
                try:
                    store.conn.close()
                except psycopg.Error:
                    pass
        self._work = self._listener = self._maintenance = self._consumer_id = None
        self._idle = set()  # the marks were the listening session's locks

    def _maintenance_store(self) -> BrokerStore:
        # Recovery runs in a transaction; the work connection is shared with acking
        # threads, whose statements must never land inside it.
        with self._lock:
            if self._maintenance is None:
                self._maintenance = self._store(self.listener().conn)
            return self._maintenance

    def _wake_pipe(self) -> tuple[int, int]:
        with self._lock:
            if self._wake_fds is None:
                read_fd, write_fd = os.pipe()
                os.set_blocking(read_fd, False)
                os.set_blocking(write_fd, False)
                self._wake_fds = (read_fd, write_fd)
            return self._wake_fds

    def verify_connection(self, connection) -> bool:
        work = self._work
        return work is not None and not work.conn.closed and not work.conn.broken

    def driver_version(self):
        return psycopg.__version__

    @classmethod
    def as_uri(cls, uri: str, include_password: bool = False, mask: str = "**") -> str:
        if include_password:
            return uri
        # Kombu's sanitizer masks the userinfo password only, not ?password=/?sslpassword=.
        return redact_url(uri, mask)

    def close_connection(self, connection) -> None:
        self.unregister_from_event_loop()
        try:
            super().close_connection(connection)
        finally:
            self._release()

    def _release(self) -> None:
        wake_fds, self._wake_fds = self._wake_fds, None
        claimer, self._claimer = self._claimer, None
        if claimer is not None and os.getpid() == self._pid:
            self._abandon_claim()
            claimer.shutdown(wait=True)
        if os.getpid() != self._pid:
            # A forked child must not end the parent's sessions: drop them, never close.
            self._work = self._listener = self._maintenance = self._consumer_id = None
            self._idle = set()
            return
        work, consumer = self._work, self._consumer_id
        if work is not None and not work.conn.closed:
            try:
                self.flush_acks()
                if consumer is not None:
                    work.unregister_consumer(consumer)
            except psycopg.Error:
                pass  # the session ends below: recovery frees and redelivers what it held
        self._drop_sessions()
        for fd in wake_fds or ():
            try:
                os.close(fd)
            except OSError:
                pass

    # -- wake-ups ----------------------------------------------------------------------

    def on_consume(self, queue: str) -> None:
        """A consumer started: LISTEN before the first claim, so no wake-up is missed.

        The queue is in use while this session lives (x-expires and auto-delete clean-up
        leave it alone), however long the loop is busy elsewhere.
        """
        self.listener()
        self.work_store().consume_queue(queue, self.consumer_id())
        self._pending.add(queue)

    def on_cancel(self, queue: str) -> None:
        """A channel stopped consuming ``queue``: unless another channel of this connection
        still consumes or owns it, this session no longer uses it."""
        work, consumer = self._work, self._consumer_id
        if work is None or consumer is None:
            return
        if any(queue in channel._active_queues or queue in channel._owned_queues for channel in self.channels):
            return
        try:
            work.cancel_queue(queue, consumer)
            self.mark_busy(queue)  # nobody here waits for it any more
        except (psycopg.OperationalError, psycopg.InterfaceError):
            pass  # the session is gone, and its consumer rows go with it (recovery)

    def buffer_ack(self, tag: str) -> None:
        """Queue an ack for the next flush; wake the loop if acking from another thread."""
        with self._ack_lock:
            first = not self._acks
            self._acks.append(tag)
        if not first:
            return
        if threading.get_ident() != self._loop_thread:
            self._poke()  # the loop schedules the flush (_on_wake)
        else:
            self._schedule_ack_flush()

    def _schedule_ack_flush(self) -> None:
        # Every flush is a commit (a WAL flush): gather the acks of a short window into
        # one, unless a claim (which flushes first) comes sooner.  Loop thread only.
        if self._acks and self._hub is not None and self._ack_timer is None:
            self._ack_timer = self._hub.call_later(ACK_WINDOW, self._flush_acks_on_timer)

    def _flush_acks_on_timer(self) -> None:
        self._ack_timer = None
        if self._claim is not None:
            # A claim is in flight on the work connection: flushing now would block the
            # loop until it returns, and the next claim may well carry these acks anyway.
            self._schedule_ack_flush()
            return
        self.flush_acks()

    def take_acks(self) -> list[str]:
        """Empty the ack buffer; the caller acks them (or hands them back on failure)."""
        with self._ack_lock:
            tags, self._acks = self._acks, []
        return tags

    def return_acks(self, tags: list[str]) -> None:
        if tags:
            with self._ack_lock:
                self._acks[:0] = tags

    def flush_acks(self) -> None:
        """Ack what is buffered now, without claiming (claims carry acks themselves)."""
        work = self._work
        if work is None or not self._acks:
            return  # without a session its locks are gone: recovery redelivers
        tags = self.take_acks()
        try:
            # A freed serial key may let this very consumer take the key's next message.
            self._pending.update(work.ack(tags, durable=self.options.durable_acks))
        except BaseException:
            self.return_acks(tags)
            raise

    def wake(self, channel: Channel | None = None) -> None:
        """Prefetch capacity was freed (possibly from another thread): fetch again.

        Only ``channel``'s queues (all queues without one): prefetch is per channel, so an
        ack on the task channel frees nothing for another one.  Marking every queue made
        each refill also claim the worker's no-ack queues (Celery's pidbox), an empty
        claim that held the claimer thread while the task window waited.
        """
        queues = self._active_queues() if channel is None else channel._active_queues
        self._pending.update(queues)
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_pipe()[1], b"\0")
        except OSError:
            pass  # full (already awake) or closed

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_pipe()[0], 512):
                pass
        except OSError:
            pass

    def _active_queues(self) -> set[str]:
        return {q for channel in self.channels for q in channel._active_queues}

    def _fetch_pending(self) -> None:
        """Start a claim for the first queue with possible work and prefetch headroom.

        Event-loop mode only.  The claim runs on the claimer thread; its completion wakes
        the loop (:meth:`_finish_claim`), which delivers and starts the next one.
        """
        if self._claim is not None or self._hub is None:
            return
        pending = self._pending
        for channel in list(self.channels):
            if not channel._consumers:
                continue
            for queue in list(channel._active_queues):
                if queue not in pending:
                    continue
                limit = channel.qos.claim_limit()
                if not limit:
                    # Full: stays pending until an ack frees capacity, and needs no NOTIFY.
                    self.mark_busy(*(q for q in channel._active_queues if q in pending))
                    break
                if self._claimer is None:
                    self._claimer = ThreadPoolExecutor(1, thread_name_prefix="kombu-pg-claim")
                future = self._claimer.submit(channel.fetch, queue, limit)
                self._claim = _PendingClaim(channel, queue, limit, future)
                # Taken by this claim: a NOTIFY that arrives while it runs (for a message
                # it may not see) makes the queue pending again.
                pending.discard(queue)
                # (Not after close: the wake pipe is gone and must not be made again.)
                future.add_done_callback(lambda _: self._wake_fds is not None and self._poke())
                return
        # Queues nobody here consumes any more need no fetch.
        pending.intersection_update(self._active_queues())

    def _finish_claim(self) -> None:
        """Deliver a finished claim (loop thread); its errors surface here, in the loop."""
        claim = self._claim
        if claim is None or not claim.future.done():
            return
        self._claim = None
        messages = claim.future.result()
        if claim.channel not in self.channels:
            self._hand_back(messages)  # closed meanwhile: nobody can ack these
            return
        full = len(messages) == claim.limit
        if full:
            self._pending.add(claim.queue)  # more may wait
        for message in messages:
            self._deliver(message, claim.queue)
        if full:
            self.mark_busy(claim.queue)  # no NOTIFY needed to come back
        elif claim.queue not in self._idle:
            self.mark_idle({claim.queue})  # pending again: claimed once more after the mark
        # Else drained, and publishes to it notify.

    def _abandon_claim(self) -> None:
        """Leaving the event loop: wait for a claim in flight and hand its messages back."""
        claim, self._claim = self._claim, None
        if claim is None:
            return
        try:
            messages = claim.future.result()
        except Exception:
            return  # nothing was claimed, or the session is gone and recovery frees it
        self._hand_back(messages)

    def _hand_back(self, messages: list[dict]) -> None:
        work = self._work
        if work is None or not messages:
            return
        try:
            work.requeue([m["properties"]["delivery_tag"] for m in messages])
        except psycopg.Error:
            pass  # recovery frees them once this session ends

    # -- synchronous path ---------------------------------------------------------------

    def drain_events(self, connection, timeout=None):
        """Deliver one batch, waiting on LISTEN (not sleeping) until there is one."""
        deadline = None if timeout is None else monotonic() + timeout
        self._loop_thread = threading.get_ident()
        while True:
            self._maybe_maintain()
            if self._next_due is not None and monotonic() >= self._next_due:
                self.promote_due()
            try:
                self.cycle.get(self._deliver)
                return
            except Empty:
                pass
            if self._active_queues() - self._idle:
                # Claim once more after marking (see BrokerStore.mark_idle), then wait.
                self.mark_idle(self._active_queues())
                continue
            # No claim took the buffered acks with it: send them before waiting.
            self.flush_acks()
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                raise socket.timeout()
            wait = self.polling_interval if remaining is None else min(remaining, self.polling_interval)
            for moment in (self._next_maintenance, self._next_due):
                if moment is not None:
                    wait = min(wait, max(moment - monotonic(), 0.0))
            if self._listener is not None or self._active_queues():
                self._take_notifications(self.listener().wait(wait, also=(self._wake_pipe()[0],)))
                self._drain_wake_pipe()
            elif wait > 0:
                # No consumer: nothing can arrive for us, only the deadline matters.
                threading.Event().wait(wait)

    def _maybe_maintain(self) -> None:
        if monotonic() >= self._next_maintenance:
            self.maintain()

    def maintain(self) -> None:
        """Run a recovery pass and promote due messages (consumed queues need no touch:
        they are in use while this session lives)."""
        self._next_maintenance = monotonic() + self.options.recovery_interval
        if not self._active_queues() and self._listener is None:
            return
        store = self._maintenance_store()
        own = [self._consumer_id] if self._consumer_id is not None else []
        report = store.recover(own, self.options.visibility_timeout, self.options.max_deliveries)
        self._pending.update(report.released)
        _poison_deleted("expired", report.poison_expired)
        _poison_deleted("queue_deleted", report.poison_in_expired_queues)
        self.promote_due()

    def promote_due(self) -> None:
        """Make due delayed messages ready (everyone's: promotion is global) and learn
        when the next one is due."""
        store = self._maintenance_store()
        self._pending.update(set(store.promote_due()) & self._active_queues())
        self._next_due = None
        seconds = store.next_due()
        if seconds is not None:
            self._note_due(seconds)
        # Notifications that arrived during these statements wait in psycopg's backlog,
        # where the socket no longer signals them.
        self._take_notifications(self.listener().drain())

    def _note_due(self, seconds: float) -> None:
        """A delayed message becomes due in ``seconds``: promote then (if sooner than known)."""
        due = monotonic() + max(seconds, 0.0)
        if self._next_due is not None and self._next_due <= due:
            return
        self._next_due = due
        if self._hub is not None:
            if self._due_timer is not None:
                self._due_timer.cancel()
            self._due_timer = self._hub.call_later(max(seconds, 0.0), self.promote_due)

    def _on_due(self, epoch: float) -> None:
        """A delayed message was published, due at ``epoch`` (the listener's due channel)."""
        self._note_due(epoch - time.time())

    def _take_notifications(self, queues: set[str]) -> None:
        self._pending.update(queues & self._active_queues())

    def mark_idle(self, queues: set[str]) -> None:
        """About to wait for NOTIFYs on ``queues``: publishes to them notify from now on.
        They stay (or become) pending: a claim after the mark is what makes waiting safe."""
        new = queues - self._idle
        if not new:
            return
        self._mark(new, idle=True)
        self._pending.update(new)

    def mark_busy(self, *queues: str) -> None:
        """Working through ``queues`` (a full claim, a full prefetch window) or no longer
        consuming them: publishes to them stop notifying this session."""
        marked = self._idle.intersection(queues)
        if marked:
            self._mark(marked, idle=False)

    def _mark(self, queues: set[str], *, idle: bool) -> None:
        store = self._maintenance_store()
        (store.mark_idle if idle else store.mark_busy)(queues)
        if idle:
            self._idle |= queues
        else:
            self._idle -= queues
        # Notifications that arrived during the statement wait in psycopg's backlog.
        self._take_notifications(self.listener().drain())

    # -- event loop (Celery's hub) --------------------------------------------------------

    def register_with_event_loop(self, connection, loop):
        """Called again after every reconnect and hub reset: re-adds everything."""
        self.unregister_from_event_loop()
        self._hub = loop
        self._loop_thread = threading.get_ident()
        listener = self.listener()
        loop.add_reader(listener.fileno(), self._on_notify)
        loop.add_reader(self._wake_pipe()[0], self._on_wake)
        loop.on_tick.add(self._on_tick)
        self._timers = [
            loop.call_repeatedly(self.polling_interval, self._safety_poll),
            loop.call_repeatedly(self.options.recovery_interval, self.maintain),
        ]
        self._pending.update(self._active_queues())

    def unregister_from_event_loop(self, *args) -> None:
        hub, self._hub = self._hub, None
        if hub is None:
            return
        self._abandon_claim()
        listener = self._listener
        if listener is not None and not listener.conn.closed:
            hub.remove(listener.fileno())
        if self._wake_fds is not None:
            hub.remove(self._wake_fds[0])
        hub.on_tick.discard(self._on_tick)
        for tref in [*self._timers, self._due_timer, self._ack_timer]:
            if tref is not None:
                tref.cancel()
        self._timers, self._due_timer, self._ack_timer = [], None, None

    def _on_notify(self) -> None:
        self._take_notifications(self.listener().drain())
        self._fetch_pending()

    def _on_wake(self) -> None:
        self._drain_wake_pipe()
        self._finish_claim()
        self._fetch_pending()
        self._schedule_ack_flush()

    def _on_tick(self) -> None:
        # Runs on every loop iteration: no SQL unless there are acks or a queue may have work.
        if self._pending:
            self._fetch_pending()
        elif len(self._acks) >= ACK_BATCH:
            self.flush_acks()

    def _safety_poll(self) -> None:
        self._pending.update(self._active_queues())
        self._fetch_pending()


@dataclass(frozen=True)
class _PendingClaim:
    channel: Channel
    queue: str
    limit: int
    future: Future


@dataclass(frozen=True)
class _Row:
    """What a Kombu message becomes in the messages table."""

    payload: str
    priority: int
    ttl: float | None
    serial_key: str | None
    visible_at: datetime | None = None
    job_key: str | None = None
    job_key_mode: str = "replace"

    @classmethod
    def from_message(cls, message: dict, priority: int, *, native_delay: bool = False) -> "_Row":
        headers = message.get("headers") or {}
        job_key_mode = headers.get(JOB_KEY_MODE_HEADER) or "replace"
        if job_key_mode not in JOB_KEY_MODES:
            raise ValueError(f"{JOB_KEY_MODE_HEADER} must be one of {', '.join(JOB_KEY_MODES)}, "
                             f"not {job_key_mode!r}")
        return cls(
            payload=dumps(message),
            priority=priority,
            ttl=_ttl_seconds(message),
            serial_key=_key(headers.get(SERIAL_KEY_HEADER)),
            visible_at=_celery_eta(headers) if native_delay else None,
            job_key=_key(headers.get(JOB_KEY_HEADER)),
            job_key_mode=job_key_mode,
        )

    def outgoing(self, routing_key: str, *, exchange: str = "") -> OutgoingMessage:
        """This message as one row of a many-message insert."""
        return OutgoingMessage(routing_key, self.payload, self.priority, self.ttl, self.serial_key,
                               self.visible_at, exchange, self.job_key, self.job_key_mode)


def _poison_deleted(how: str, counts: dict[str, int]) -> None:
    """Poison messages (delivered max_deliveries times) a deletion removed without
    capturing them, celery_dlq not being installed: never silently."""
    for queue, count in counts.items():
        if count:
            logger.warning("kombu-pg: %d poison message(s) (delivered max_deliveries times) deleted "
                           "from queue %r (%s) without reaching a dead-letter queue (celery_dlq "
                           "keeps them when installed)", count, queue, how)
            metrics.poison_deleted(how, count)


def _key(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _celery_eta(headers: dict) -> datetime | None:
    """The ETA of a Celery (protocol 2) task message, when it is in the future."""
    eta = headers.get("eta")
    if not eta:
        return None
    try:
        when = eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))
    except ValueError:
        return None  # Celery will complain about it; the broker delivers it now
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when if when > datetime.now(timezone.utc) else None


def _ttl_seconds(message: dict) -> float | None:
    # Kombu carries a per-message TTL as milliseconds in a string, AMQP style.
    expiration = message["properties"].get("expiration")
    if expiration is None:
        return None
    try:
        return max(float(expiration) / 1000.0, 0.0)
    except (TypeError, ValueError):
        return None


def _after_fork(transport: Transport) -> None:
    # Drop, never close: closing would end the parent's sessions (shared sockets).
    transport._work = transport._listener = transport._consumer_id = None
    transport._idle = set()  # the parent's listening session holds those marks
    transport._maintenance = transport._wake_fds = transport._hub = transport._ack_timer = None
    transport._timers = []
    # The claimer thread stayed in the parent.
    transport._claimer = transport._claim = None
