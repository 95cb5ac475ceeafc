"""Broker operations on the kombu-pg tables: routing state, publish, claim, ack, recovery."""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable, Iterator, Sequence

import psycopg
from psycopg.pq import TransactionStatus

from .queries import Queries

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """A message taken from a queue: ``token`` is its lock token (None for no-ack)."""

    id: int
    priority: int
    payload: str
    token: str | None
    delivery_count: int


@dataclass(frozen=True)
class OutgoingMessage:
    """One message for :meth:`BrokerStore.publish_many`: to the queue ``routing_key``
    names, or with an ``exchange`` to the queues bound to it as the routing key matches."""

    routing_key: str
    payload: str
    priority: int = 0
    ttl: float | None = None
    serial_key: str | None = None
    visible_at: datetime | None = None
    exchange: str = ""
    #: A job key (default exchange only) makes this one upsert, as :meth:`BrokerStore.publish_job`.
    job_key: str | None = None
    job_key_mode: str = "replace"


@dataclass(frozen=True)
class JobPublish:
    """What a publish with a job key did: ``enqueued``, ``replaced``, ``dropped`` or
    ``queued_behind_in_flight`` (inserted while a message with the key is being processed)."""

    outcome: str
    replaced_task_id: str | None = None


JOB_KEY_MODES = ("replace", "preserve_eta", "keep")

#: Message header naming the serial key: one message per key in flight, cluster-wide.
SERIAL_KEY_HEADER = "serial_key"
#: Message headers naming the job key (one waiting message per key) and what a second
#: publish with the key does: one of JOB_KEY_MODES, "replace" by default.
JOB_KEY_HEADER = "job_key"
JOB_KEY_MODE_HEADER = "job_key_mode"


@dataclass(frozen=True)
class Superseded:
    """A delivered message whose delivery ended without an ack (requeue, hand-back,
    unregister, recovery) while another message with its job key was waiting: deleted,
    the waiting one (the newer request for the job) runs instead."""

    queue: str
    job_key: str
    serial: bool
    task_id: str | None
    waiting_task_id: str | None


@dataclass
class Unlocked:
    """What an unlock did: messages unlocked per queue, and the ones superseded."""

    released: dict[str, int] = field(default_factory=dict)
    superseded: list[Superseded] = field(default_factory=list)


@dataclass(frozen=True)
class Purged:
    """What a purge deleted: ``messages``, of which ``poison`` were delivered ``max_deliveries``
    times or more and not captured (celery_dlq not installed)."""

    messages: int
    poison: int


@dataclass
class RecoveryReport:
    ran: bool = False
    dead_consumers: list[int] = field(default_factory=list)
    released: dict[str, int] = field(default_factory=dict)
    superseded: list[Superseded] = field(default_factory=list)
    expired_messages: int = 0
    #: Queues removed: x-expires, or exclusive/auto-delete ones whose session is gone.
    expired_queues: list[str] = field(default_factory=list)
    #: Poison deleted without being captured (celery_dlq not installed), per queue: by
    #: message expiry, and with the removed queues.
    poison_expired: dict[str, int] = field(default_factory=dict)
    poison_in_expired_queues: dict[str, int] = field(default_factory=dict)
    #: Poison moved into the DLQ (celery_dlq installed) by the pass's own reaping.
    reaped: int = 0
    #: Parts of the pass that failed (each logged); the others still ran.
    failed: list[str] = field(default_factory=list)


#: With celery_dlq installed, a recovery pass moves up to this many reaper batches (500
#: messages each) of poison into the DLQ.
REAP_BATCHES_PER_PASS = 4


class BrokerStore:
    """Broker SQL bound to one connection and one schema.

    The connection must be in autocommit mode; every method is one round trip unless it
    says otherwise.  The class is free of Kombu, so it can be driven directly in tests.

    Threads may share a store (the transport's claimer thread, acking and publishing
    threads): every statement runs under one re-entrant lock, and :meth:`transaction`
    holds it from BEGIN to COMMIT, so no thread's statement can land inside another's
    transaction.  Use one store per connection, and go through the store for every
    statement on it.
    """

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.q = Queries(schema)
        self.schema = schema
        #: NOTIFY channel for "queue X has work"; the payload is the queue name.
        self.channel = f"{schema}:queues"
        #: NOTIFY channel for "a delayed message is due then"; the payload is epoch seconds.
        #: A channel of its own: any string can be a queue name, so no payload on the
        #: queue channel could mean something else.
        self.due_channel = f"{schema}:due"
        self._namespace = schema
        self._serial_namespace = f"{schema}:serial"
        # Advisory-lock namespaces of the wake-up protocol (see mark_idle).
        self._idle_namespace = f"{schema}:idle"
        self._publishing_namespace = f"{schema}:publishing"
        self._dlq: Queries | None = None
        #: Called with the messages every unlock superseded (the transport counts them).
        self.on_superseded: Callable[[Sequence[Superseded]], None] | None = None
        self._lock = threading.RLock()

    # -- helpers ---------------------------------------------------------------

    def _exec(self, name: str, params: dict | None = None) -> psycopg.Cursor:
        return self._execute(self.q[name], params)

    def _execute(self, query: str, params: dict | None = None) -> psycopg.Cursor:
        # The rows are fetched by execute itself (client-side cursor), so the lock only
        # has to cover the round trip.
        with self._lock:
            return self.conn.execute(query, params)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction (or, inside one, a savepoint) on this store's connection that no
        other thread's statement can join: they wait until it ends."""
        with self._lock, self.conn.transaction():
            yield

    def _scalar(self, name: str, params: dict | None = None):
        row = self._exec(name, params).fetchone()
        return row[0] if row else None

    # -- queues, exchanges, bindings --------------------------------------------

    def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        auto_delete: bool = False,
        message_ttl_ms: int | None = None,
        expires_ms: int | None = None,
        max_priority: int | None = None,
        owner: int | None = None,
    ) -> None:
        """Create or redefine a queue.  An exclusive or auto-delete queue lives while its
        ``owner`` (the declaring session's consumer id) or a consumer of it does: without
        either, the next recovery pass removes it."""
        self._exec(
            "declare_queue",
            dict(
                name=name,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                message_ttl_ms=message_ttl_ms,
                expires_ms=expires_ms,
                max_priority=max_priority,
                owner=owner,
            ),
        )

    def queue_exists(self, name: str) -> bool:
        return bool(self._scalar("queue_exists", {"name": name}))

    def touch_queues(self, names: Sequence[str]) -> None:
        if names:
            self._exec("touch_queues", {"names": list(names)})

    def consume_queue(self, queue: str, consumer_id: int) -> None:
        """The consumer consumes ``queue``: it is in use (x-expires, auto-delete) as long as
        the consumer's session lives, until :meth:`cancel_queue`."""
        self._exec("consume_queue", {"queue": queue, "consumer": consumer_id})

    def cancel_queue(self, queue: str, consumer_id: int) -> None:
        self._exec("cancel_queue", {"queue": queue, "consumer": consumer_id})

    def delete_queue(self, name: str, max_deliveries: int | None = None) -> int:
        """Delete the queue, its bindings and all its messages (in flight ones too); return
        how many poison messages went with it uncaptured (see :meth:`_poison_limit`)."""
        return self._delete_queues([name], max_deliveries).get(name, 0)

    def _delete_queues(self, names: list[str], max_deliveries: int | None) -> dict[str, int]:
        poison = self._poison_limit(max_deliveries, queues=names)
        return dict(self._exec("delete_queues", {"names": names, "poison": poison}).fetchall())

    def declare_exchange(self, name: str, type: str, *, durable: bool = True, auto_delete: bool = False) -> None:
        self._exec("declare_exchange", dict(name=name, type=type, durable=durable, auto_delete=auto_delete))

    def exchange_type(self, name: str) -> str | None:
        return self._scalar("exchange_type", {"name": name})

    def exchanges(self) -> list[str]:
        return [r[0] for r in self._exec("list_exchanges")]

    def delete_exchange(self, name: str) -> None:
        self._exec("delete_exchange", {"name": name})

    def bind(self, exchange: str, queue: str, routing_key: str, pattern: str | None, *, exchange_type: str = "direct") -> None:
        """Bind in one statement; the queue and exchange rows are created if missing."""
        self._exec("bind", dict(exchange=exchange, queue=queue, routing_key=routing_key or "", pattern=pattern,
                                type=exchange_type))

    def unbind(self, exchange: str, queue: str, routing_key: str) -> None:
        self._exec("unbind", dict(exchange=exchange, queue=queue, routing_key=routing_key or ""))

    def bindings(self, exchange: str) -> list[tuple[str, str | None, str]]:
        return [tuple(r) for r in self._exec("bindings_for_exchange", {"exchange": exchange})]

    def all_bindings(self) -> list[tuple[str, str, str]]:
        return [tuple(r) for r in self._exec("list_bindings")]

    # -- messages ----------------------------------------------------------------

    def _message_params(self, payload: str, priority: int, ttl: float | None, serial_key: str | None,
                        visible_at: datetime | None, **extra) -> dict:
        return dict(payload=payload, priority=priority, ttl=ttl, serial_key=serial_key,
                    visible_at=visible_at, notify_payload=due_payload(visible_at),
                    notify_channel=self.channel if visible_at is None else self.due_channel,
                    idle=self._idle_namespace, publishing=self._publishing_namespace, **extra)

    def publish(
        self,
        queue: str,
        payload: str,
        *,
        priority: int = 0,
        ttl: float | None = None,
        serial_key: str | None = None,
        visible_at: datetime | None = None,
        notify: bool | None = None,
    ) -> None:
        """Insert one message; durable when this returns (autocommit).

        ``notify``: True or False sends a NOTIFY or not; None (the default) sends one for a
        delayed message, else only when a consumer of the queue is idle, waiting for one
        (see :meth:`mark_idle`).
        A ``visible_at`` in the future delays delivery until then (see :meth:`promote_due`);
        the NOTIFY then says when (:func:`due_payload`, on :attr:`due_channel`) instead of
        naming the queue.
        """
        self._exec("publish", self._message_params(payload, priority, ttl, serial_key, visible_at,
                                                   queue=queue, notify=notify))

    def publish_routed(
        self,
        exchange: str,
        routing_key: str,
        payload: str,
        *,
        priority: int = 0,
        ttl: float | None = None,
        serial_key: str | None = None,
        visible_at: datetime | None = None,
        notify: bool | None = None,
    ) -> list[str]:
        """Insert a copy for every queue whose binding matches; return those queues.
        ``notify`` as in :meth:`publish`, per queue."""
        params = self._message_params(payload, priority, ttl, serial_key, visible_at, exchange=exchange,
                                      routing_key=routing_key or "", notify=notify)
        return [r[0] for r in self._exec("publish_routed", params).fetchall()]

    def publish_many(self, messages: Sequence[OutgoingMessage], *, deadletter: str | None = None) -> int:
        """Insert many messages, in publish order and in one transaction (one commit).

        Messages without a job key are one statement that wakes each queue once; when some
        have one, each of those is an upsert of its own (:meth:`publish_job`) between the
        statements for the messages before and after it, and all of it commits together
        (or, inside the caller's transaction, with it).  A routed message no binding
        matches goes to ``deadletter`` if given, else nowhere.  Delayed messages
        (``visible_at`` in the future) are announced with their earliest due time.
        Returns how many were published (a job key's ``keep`` may drop one).
        """
        runs = _runs(messages)
        if len(runs) <= 1 or self.conn.info.transaction_status != TransactionStatus.IDLE:
            return sum(self._publish_run(run, deadletter) for run in runs)
        with self.transaction():
            return sum(self._publish_run(run, deadletter) for run in runs)

    def _publish_run(self, messages: Sequence[OutgoingMessage], deadletter: str | None) -> int:
        first = messages[0]
        if first.job_key is not None:
            published = self.publish_job(
                first.routing_key, first.payload, first.job_key, mode=first.job_key_mode,
                priority=first.priority, ttl=first.ttl, serial_key=first.serial_key,
                visible_at=first.visible_at)
            return int(published.outcome != "dropped")
        columns = list(zip(*((m.exchange, m.routing_key, m.priority, m.payload, m.serial_key, m.visible_at,
                              m.ttl) for m in messages)))
        self._exec("publish_many", dict(
            exchanges=list(columns[0]), routing_keys=list(columns[1]), priorities=list(columns[2]),
            payloads=list(columns[3]), serial_keys=list(columns[4]), visible_ats=list(columns[5]),
            ttls=list(columns[6]), deadletter=deadletter, channel=self.channel, due_channel=self.due_channel))
        return len(messages)

    def publish_job(
        self,
        queue: str,
        payload: str,
        job_key: str,
        *,
        mode: str = "replace",
        priority: int = 0,
        ttl: float | None = None,
        serial_key: str | None = None,
        visible_at: datetime | None = None,
    ) -> JobPublish:
        """Insert a message with a job key, or replace/keep the waiting one, in one statement.

        ``replace`` gives the waiting message the new body, priority and due time;
        ``preserve_eta`` does the same but keeps its due time; ``keep`` drops the new one.
        A message with the key that is in flight is never modified.
        """
        if mode not in JOB_KEY_MODES:
            raise ValueError(f"job key mode must be one of {', '.join(JOB_KEY_MODES)}, not {mode!r}")
        params = self._message_params(payload, priority, ttl, serial_key, visible_at, queue=queue,
                                      job_key=job_key, mode=mode)
        row = self._exec("publish_job", params).fetchone()
        if row is None:
            return JobPublish("dropped")
        inserted, replaced_task_id, behind_in_flight, _ = row
        if not inserted:
            return JobPublish("replaced", replaced_task_id)
        return JobPublish("queued_behind_in_flight" if behind_in_flight else "enqueued")

    def promote_due(self) -> list[str]:
        """Make due delayed messages ready and wake their consumers; return the queues."""
        return [r[0] for r in self._exec("promote_due", {"channel": self.channel})]

    def next_due(self) -> float | None:
        """Seconds until the next delayed message is due, None when none is waiting."""
        value = self._scalar("next_due")
        return None if value is None else float(value)

    def claim(
        self,
        queue: str,
        limit: int,
        consumer_id: int,
        *,
        max_deliveries: int | None = None,
        acks: Sequence[str] = (),
        durable: bool = True,
    ) -> list[Claimed]:
        """Lock up to ``limit`` ready messages, returned best first (priority, then age).

        At most one message per serial key is in flight across all consumers; messages
        already delivered ``max_deliveries`` times are skipped (poison).  ``acks`` are
        acked first, in the same statement and commit (see :meth:`ack`); with
        ``durable=False`` that commit does not wait for the WAL flush: a server crash
        can undo it, which only redelivers the messages (at-least-once).
        """
        rows = self._exec(
            "claim",
            dict(queue=queue, limit=limit, consumer=consumer_id, max_deliveries=max_deliveries,
                 namespace=self._serial_namespace, acks=list(acks), channel=self.channel,
                 durable=durable),
        ).fetchall()
        return _in_claim_order(rows)

    def ack(self, tokens: Iterable[str], *, durable: bool = True) -> list[str]:
        """Delete delivered messages; a token that no longer matches is a no-op (fencing).

        Returns the queues where a serial key was freed (their consumers were notified).
        ``durable`` as in :meth:`claim`.
        """
        tokens = list(tokens)
        if not tokens:
            return []
        return [r[0] for r in self._exec("ack", {"tokens": tokens, "channel": self.channel,
                                                 "durable": durable})]

    def requeue(self, tokens: Iterable[str]) -> list[str]:
        """Unlock delivered messages in place and wake consumers; return the queues.

        A message with a job key that has a waiting message is superseded instead (see
        :class:`Superseded`).
        """
        tokens = list(tokens)
        if not tokens:
            return []
        return list(self._unlock("requeue", {"tokens": tokens, "channel": self.channel}).released)

    def _unlock(self, name: str, params: dict) -> Unlocked:
        """Run a statement returning the rows of the ``unlock`` function (migration
        ``*_unlock_job_keys.sql``)."""
        result = Unlocked()
        for queue, unlocked, job_key, serial, task_id, waiting_task_id in self._exec(name, params):
            if job_key is None:
                result.released[queue] = unlocked
            else:
                result.superseded.append(Superseded(queue, job_key, serial, task_id, waiting_task_id))
        for gone in result.superseded:
            logger.warning(
                "kombu-pg: task %s (job key %r, queue %r) was delivered and not acked while task %s "
                "with the same job key was waiting: superseded by it and deleted",
                gone.task_id, gone.job_key, gone.queue, gone.waiting_task_id)
        if result.superseded and self.on_superseded is not None:
            self.on_superseded(result.superseded)
        return result

    def _dlq_exec(self, name: str, params: dict | None = None) -> psycopg.Cursor:
        if self._dlq is None:
            self._dlq = Queries(self.schema, "dlq.sql")
        return self._execute(self._dlq[name], params)

    def dead_letter(self, token: str, detail: str | None = None) -> bool:
        """Move one delivered message into the dead-letter table (celery_dlq's), whole, in
        one statement; False when the token no longer matches (fenced)."""
        existed, _ = self._dlq_exec("reject_to_dlq", {"token": token, "detail": detail}).fetchone()
        return bool(existed)

    def reap_batch(self, max_deliveries: int, limit: int = 500, *, queues: Sequence[str] | None = None,
                   expired: bool = False) -> list[int]:
        """One statement: move up to ``limit`` unlocked messages delivered ``max_deliveries``
        times or more (of ``queues``; only expired ones with ``expired``) into the DLQ
        table (celery_dlq's reaper); return the DLQ row ids."""
        params = dict(max_deliveries=max_deliveries, limit=limit, queues=list(queues) if queues else None,
                      expired=expired)
        return [r[0] for r in self._dlq_exec("reap", params)]

    def reap(self, max_deliveries: int, batch_size: int = 500, *, queues: Sequence[str] | None = None,
             expired: bool = False, max_batches: int | None = None) -> int:
        """:meth:`reap_batch` until none is left; return how many moved.

        Safe on many hosts at once: rows another reaper (or a claim) holds are skipped,
        and a batch that found only such rows ends the loop.
        """
        moved = batches = 0
        while max_batches is None or batches < max_batches:
            ids = self.reap_batch(max_deliveries, batch_size, queues=queues, expired=expired)
            batches += 1
            moved += len(ids)
            if not ids:
                break
        return moved

    def _poison_limit(self, max_deliveries: int | None, *, queues: Sequence[str] | None = None,
                      expired: bool = False) -> int | None:
        """Before a deletion: the delivery count from which a message it deletes is poison.

        With celery_dlq installed, the poison among the messages about to be deleted
        (``queues``' or the ``expired`` ones) is first moved into the DLQ (see
        :meth:`_reap_installed`), and its ``max_deliveries`` is the limit; otherwise the
        transport's ``max_deliveries`` (None: no limit, nothing is poison).
        """
        installed_max, _ = self._reap_installed(queues=queues, expired=expired)
        return max_deliveries if installed_max is None else installed_max

    def _reap_installed(self, *, queues: Sequence[str] | None = None, expired: bool = False,
                        max_batches: int | None = None) -> tuple[int | None, int]:
        """With celery_dlq installed (its row in ``dlq_installed``), move the poison of
        ``queues`` (only the expired with ``expired``; all without either) into the DLQ with
        the reaper's statement.  Returns celery_dlq's ``max_deliveries`` (None: not
        installed) and how many moved; the reap runs only when there is poison, so a pass
        never waits for a lock on a DLQ table it does not need."""
        row = self._dlq_exec("installed", {"queues": list(queues) if queues else None,
                                           "expired": expired}).fetchone()
        if row is None:
            return None, 0
        installed_max, poison_found = row
        moved = self.reap(installed_max, queues=queues, expired=expired, max_batches=max_batches) if poison_found else 0
        return installed_max, moved

    def quarantine(self, token: str, error: str) -> None:
        self._exec("quarantine", {"token": token, "error": error, "channel": self.channel})

    def set_aside(self, message_id: int, queue: str, payload: str, error: str) -> None:
        self._exec("set_aside", dict(id=message_id, queue=queue, payload=payload, error=error))

    def purge(self, queue: str, max_deliveries: int | None = None) -> Purged:
        """Delete the queue's ready messages (see :meth:`_poison_limit` for poison)."""
        poison = self._poison_limit(max_deliveries, queues=[queue])
        return Purged(*self._exec("purge", {"queue": queue, "poison": poison}).fetchone())

    def size(self, queue: str) -> int:
        return int(self._scalar("size", {"queue": queue}))

    def mark_idle(self, queues: Iterable[str]) -> None:
        """This session's consumer is about to wait for NOTIFYs on ``queues``: from now on a
        publish to them notifies (one round trip; autocommit, outside any transaction).

        Each queue is marked once per session until :meth:`mark_busy` (the marks stack).
        The caller must claim from the queues again after this returns, then wait.  No
        wake-up is lost: a publish P that does not notify found no idle mark and held the
        shared publishing lock from before it looked until it committed.  The mark's
        exclusive publishing lock is taken after the idle lock.  If P looked after the idle
        lock was taken, P saw the mark (and notified).  Otherwise P took its publishing lock
        before this statement asked for the exclusive one, which then waits for P's commit:
        the claim that follows this statement sees P's message.  A publish that cannot take
        its publishing lock (this statement holds or waits for it) notifies.
        """
        queues = sorted(set(queues))  # one lock order for every consumer
        if queues:
            self._exec("mark_idle", {"queues": queues, "idle": self._idle_namespace,
                                     "publishing": self._publishing_namespace})

    def mark_busy(self, queues: Iterable[str]) -> None:
        """Undo :meth:`mark_idle` for ``queues`` (each marked by this session): publishes to
        them stop notifying unless another consumer is idle."""
        queues = sorted(set(queues))
        if queues:
            self._exec("mark_busy", {"queues": queues, "idle": self._idle_namespace})

    # -- status ---------------------------------------------------------------------

    def queue_stats(self, max_deliveries: int | None = None) -> list[dict]:
        return _dicts(self._exec("queue_stats", {"max_deliveries": max_deliveries}))

    def serial_key_stats(self, limit: int = 50) -> list[dict]:
        return _dicts(self._exec("serial_key_stats", {"limit": limit}))

    def consumers(self) -> list[dict]:
        return _dicts(self._exec("consumer_list"))

    def invalid_count(self) -> int:
        return int(self._scalar("invalid_count"))

    # -- consumers and recovery ----------------------------------------------------

    def register_consumer(self, hostname: str | None = None, pid: int | None = None) -> int:
        """Register this session as a consumer; its liveness is the session's own life."""
        return self._scalar(
            "register_consumer",
            dict(
                sequence=f'"{self.schema}".consumer_ids',
                namespace=self._namespace,
                hostname=hostname or socket.gethostname(),
                pid=pid or os.getpid(),
            ),
        )

    def unregister_consumer(self, consumer_id: int) -> list[str]:
        """Hand back everything the consumer still holds and drop its row and lock.

        One statement each, never a transaction: the connection may be shared by threads.
        """
        unlocked = self._unlock("unregister_consumer", {"id": consumer_id, "channel": self.channel})
        self._exec("release_consumer_lock", {"namespace": self._namespace, "id": consumer_id})
        return list(unlocked.released)

    def recover(self, own_consumers: Sequence[int], visibility_timeout: float | None = None,
                max_deliveries: int | None = None) -> RecoveryReport:
        """One recovery pass; skipped (``ran=False``) while another session runs one.

        Runs in a transaction (see :meth:`transaction`).  Each part runs in a savepoint: a
        part that fails is logged and undone alone, and the others still run (only a lost
        connection ends the pass).  ``max_deliveries``: the transport's, to count the
        poison expiry deletes (see :meth:`_poison_limit`).
        """
        report = RecoveryReport()
        with self.transaction():
            if not self._scalar("try_recovery_lock", {"namespace": self._namespace}):
                return report
            report.ran = True

            def release() -> None:
                dead = [r[0] for r in self._exec("dead_consumers", {"own": list(own_consumers),
                                                                    "namespace": self._namespace})]
                unlocked = self._unlock("release_stale", dict(dead=dead, visibility_timeout=visibility_timeout,
                                                              channel=self.channel))
                report.dead_consumers, report.released, report.superseded = (
                    dead, unlocked.released, unlocked.superseded)

            def expire_messages() -> None:
                self._delete_expired_messages(report, max_deliveries)

            def expire_queues() -> None:
                self._delete_unused_queues(report, max_deliveries)

            def reap_poison() -> None:
                # Poison need not wait for beat or a worker start to run celery_dlq's reaper.
                # Bounded per pass, and never stuck behind a lock on the DLQ table (the pass
                # runs on a worker's event-loop thread): this part is last, so the local
                # lock_timeout covers it alone.
                self._execute("SELECT set_config('lock_timeout', '1000', true)")
                report.reaped = self._reap_installed(max_batches=REAP_BATCHES_PER_PASS)[1]

            for part in (release, expire_messages, expire_queues, reap_poison):
                self._recovery_part(part, report)
        if report.released:
            logger.warning(
                "kombu-pg recovered %d message(s) from dead or stale consumers: %s",
                sum(report.released.values()),
                report.released,
            )
        return report

    def _recovery_part(self, part: Callable[[], None], report: RecoveryReport) -> None:
        try:
            with self.transaction():  # a savepoint
                part()
        except psycopg.Error as exc:
            if self.conn.closed or self.conn.broken:
                raise
            report.failed.append(part.__name__)
            logger.error("kombu-pg recovery: %s failed, the rest of the pass goes on: %s", part.__name__, exc)

    def _delete_expired_messages(self, report: RecoveryReport, max_deliveries: int | None) -> None:
        poison = self._poison_limit(max_deliveries, expired=True)
        for queue, count, uncaptured in self._exec("delete_expired_messages", {"poison": poison}):
            report.expired_messages += count
            if uncaptured:
                report.poison_expired[queue] = uncaptured

    def _delete_unused_queues(self, report: RecoveryReport, max_deliveries: int | None) -> None:
        report.expired_queues = [r[0] for r in self._exec("unused_queues")]
        if report.expired_queues:
            report.poison_in_expired_queues = self._delete_queues(report.expired_queues, max_deliveries)



def due_payload(visible_at: datetime | None) -> str | None:
    """What a delayed message's NOTIFY on the due channel says: its due time, epoch seconds."""
    return None if visible_at is None else f"{visible_at.timestamp():.3f}"


def _runs(messages: Sequence[OutgoingMessage]) -> list[Sequence[OutgoingMessage]]:
    """``messages`` cut, in order, into runs without a job key and single keyed messages."""
    runs: list[Sequence[OutgoingMessage]] = []
    start = 0
    for i, message in enumerate(messages):
        if message.job_key is not None:
            runs += [messages[start:i], [message]]
            start = i + 1
    runs.append(messages[start:])
    return [run for run in runs if run]


def _dicts(cursor: psycopg.Cursor) -> list[dict]:
    names = [c.name for c in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def _in_claim_order(rows: list[tuple]) -> list[Claimed]:
    # UPDATE/DELETE ... RETURNING does not keep the CTE's ORDER BY.
    rows.sort(key=lambda r: (-r[1], r[0]))
    return [Claimed(r[0], r[1], r[2], str(r[3]) if r[3] is not None else None, r[4]) for r in rows]
