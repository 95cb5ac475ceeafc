"""The DLQ tables in PostgreSQL: capture, reaping, listing, requeue, delete, stats.

Pure SQL over psycopg 3 (queries in ``kombu_pg/sql/dlq.sql``); nothing here imports
Celery or Kombu, so it is tested on its own against a real server.  The connection
must be in autocommit mode: every method is one statement (one round trip) unless it
says it opens a transaction.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, List, Mapping, Sequence

import psycopg

from kombu_pg.store import BrokerStore, Queries
from kombu_pg.store.broker import JOB_KEY_HEADER, JobPublish

logger = logging.getLogger(__name__)

REASONS = ("non_retryable", "retries_exhausted", "max_deliveries", "rejected", "manual")
STATUSES = ("dead", "requeued", "resolved")
QUEUE_KINDS = ("parallel", "serial")
#: The header linking a requeued message to its DLQ row.
DLQ_ID_HEADER = "dlq_id"
#: Filters accepted by list/count/bulk operations; anything else is refused.
FILTER_KEYS = frozenset({"task", "queue", "job_key", "reason", "exception", "status", "since", "until",
                         "ids"})
MAX_PAGE = 1000


class DLQError(Exception):
    """Base class of celery_dlq errors."""


class NotFound(DLQError):
    """No DLQ row has this id."""


class UsageError(DLQError):
    """A request that is ambiguous or malformed (unknown filter, bulk without filter)."""


@dataclass
class Entry:
    """One failure to record (what a signal handler or the backstop sweep captured)."""

    message: str
    reason: str
    source: str
    task_id: str | None = None
    task_name: str | None = None
    queue: str | None = None
    exchange: str | None = None
    routing_key: str | None = None
    priority: int = 0
    serial_key: str | None = None
    exception_type: str | None = None
    exception_message: str | None = None
    traceback: str | None = None
    retries: int = 0
    worker: str | None = None
    #: The task's retry limit when it failed (None: unknown).
    max_retries: int | None = None
    #: When the original message was published (None: unknown).
    published_at: datetime | None = None
    job_key: str | None = None
    #: Message fields this capture could not recover (the backstop sweep's entries).
    unrecovered: list[str] = field(default_factory=list)

    def params(self) -> dict:
        if self.reason not in REASONS:
            raise UsageError(f"unknown reason {self.reason!r}; use one of {', '.join(REASONS)}")
        return {
            "task_id": self.task_id, "task_name": self.task_name, "queue": self.queue,
            "exchange": self.exchange, "routing_key": self.routing_key,
            "priority": int(self.priority or 0), "serial_key": self.serial_key,
            "reason": self.reason, "exception_type": self.exception_type,
            "exception_message": _clip(self.exception_message, 10_000),
            "traceback": _clip(self.traceback, 100_000), "message": self.message,
            "retries": int(self.retries or 0), "source": self.source, "worker": self.worker,
            "max_retries": self.max_retries, "published_at": self.published_at, "job_key": self.job_key,
            "unrecovered": list(self.unrecovered),
        }


@dataclass
class Page:
    rows: list[dict]
    total: int
    next_cursor: int | None


#: Why a requeue was refused (``RequeueResult.refused``).
REFUSED_STATUS = "status"  # the entry is not dead; force requeues it anyway
REFUSED_JOB_KEY = "job_key_waiting"  # a task with its job key is waiting; force replaces it
REFUSED_CONTENT = "content_not_accepted"  # send_task would have to deserialize the body


@dataclass
class RequeueResult:
    id: int
    requeued: bool
    detail: str
    queues: list[str] = field(default_factory=list)
    #: Not requeued on purpose: one of the REFUSED_* codes (None when requeued or on error).
    refused: str | None = None
    #: For a job-keyed message: what the publish did (enqueued, replaced, queued_behind_in_flight).
    job_outcome: str | None = None
    #: Refused for its job key: the waiting task holding the key (when it could be read).
    waiting_task_id: str | None = None
    #: A forced requeue replaced this waiting task (same job key): it will not run, and is
    #: marked REVOKED in the result backend.
    replaced_task_id: str | None = None


_LIST_COLUMNS = (
    "id", "task_id", "task_name", "queue", "reason", "exception_type", "exception_message",
    "status", "retries", "failure_count", "delivery_count", "source", "first_failed_at",
    "last_failed_at", "requeue_count", "job_key",
)
_GET_COLUMNS = (
    "id", "task_id", "task_name", "queue", "exchange", "routing_key", "priority", "serial_key",
    "reason", "exception_type", "exception_message", "traceback", "message", "retries",
    "delivery_count", "failure_count", "status", "notes", "source", "broker_message_id",
    "worker", "first_failed_at", "last_failed_at", "requeue_count", "requeued_at", "resolved_at",
    "max_retries", "published_at", "job_key", "unrecovered",
)


def _clip(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 20] + "... [truncated]"


def check_filters(filters: Mapping[str, Any] | None) -> dict:
    """Validate filter names and values; return the bound parameters (absent ones None)."""
    filters = dict(filters or {})
    unknown = sorted(set(filters) - FILTER_KEYS)
    if unknown:
        raise UsageError(f"unknown filter(s) {', '.join(unknown)}; known: {', '.join(sorted(FILTER_KEYS))}")
    params = {key: None for key in FILTER_KEYS}
    for key, value in filters.items():
        if value is None or value == "" or value == ():
            continue
        if key == "reason" and value not in REASONS:
            raise UsageError(f"unknown reason {value!r}; use one of {', '.join(REASONS)}")
        if key == "status" and value not in STATUSES:
            raise UsageError(f"unknown status {value!r}; use one of {', '.join(STATUSES)}")
        if key in ("since", "until") and not isinstance(value, datetime):
            raise UsageError(f"filter {key!r} must be a datetime")
        if key == "ids":
            value = [int(v) for v in value]
        params[key] = value
    return params


def has_filter(params: Mapping[str, Any]) -> bool:
    return any(params.get(key) is not None for key in FILTER_KEYS)


class DLQStore:
    """DLQ SQL bound to one autocommit connection and one schema."""

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self.q = Queries(schema, "dlq.sql")

    def _exec(self, name: str, params: Mapping[str, Any] | None = None) -> psycopg.Cursor:
        return self.conn.execute(self.q[name], params)

    def _one(self, name: str, params: Mapping[str, Any] | None = None) -> tuple:
        """The single row a statement always returns (aggregates, RETURNING of an upsert)."""
        row = self._exec(name, params).fetchone()
        assert row is not None, name
        return row

    # -- capture ----------------------------------------------------------------------

    def capture(self, entry: Entry) -> tuple[int, int]:
        """Record a failure; return (row id, failure_count).  Same task id: same row."""
        row = self._one("capture", entry.params())
        return row[0], row[1]

    def capture_if_absent(self, entry: Entry, failed_at: datetime | None = None) -> int | None:
        """Record a failure unless its task id is already in the DLQ (or was deleted); a row
        requeued before ``failed_at`` is updated instead (the requeued run failed again)."""
        row = self._exec("capture_if_absent", {**entry.params(), "failed_at": failed_at}).fetchone()
        return row[0] if row else None

    # -- reaping -------------------------------------------------------------------------

    def reap_batch(self, max_deliveries: int, limit: int = 500,
                   queues: Sequence[str] | None = None) -> List[int]:
        """One statement: move up to ``limit`` exhausted, unlocked messages; return DLQ ids."""
        return self._reaper(max_deliveries).reap_batch(max_deliveries, limit, queues=queues)

    def reap(self, max_deliveries: int, batch_size: int = 500, queues: Sequence[str] | None = None,
             max_batches: int | None = None) -> int:
        """Drain in bounded batches until no candidate is left; return how many moved
        (:meth:`kombu_pg.store.BrokerStore.reap`)."""
        return self._reaper(max_deliveries).reap(max_deliveries, batch_size, queues=queues,
                                                 max_batches=max_batches)

    def _reaper(self, max_deliveries: int) -> BrokerStore:
        if max_deliveries < 1:
            raise UsageError("max_deliveries must be >= 1")
        return BrokerStore(self.conn, self.schema)

    def mark_installed(self, max_deliveries: int | None) -> None:
        """Say at the SQL level whether celery_dlq is installed for the broker in this
        schema (``max_deliveries`` None: it is not); see docs/dlq.md."""
        if max_deliveries is None:
            self._exec("mark_not_installed")
        else:
            self._exec("mark_installed", {"max_deliveries": max_deliveries})

    def reject_to_dlq(self, token: str, detail: str | None = None) -> tuple[bool, int | None]:
        """Dead-letter one delivered message by its lock token, in one statement.

        Returns (the message existed, the new DLQ row id or None when the task id was
        already in the DLQ).  This is the statement the transport runs for
        ``reject(requeue=False)`` when dead-lettering is on.
        """
        existed, row_id = self._one("reject_to_dlq", {"token": token, "detail": detail})
        return bool(existed), row_id

    def count_exhausted(self, max_deliveries: int) -> int:
        return self._one("count_exhausted", {"max_deliveries": max_deliveries})[0]

    # -- backstop sweep ---------------------------------------------------------------------

    def has_results_table(self) -> bool:
        return bool(self._one("results_table_exists", {"schema": self.schema})[0])

    def backstop_candidates(self, window_seconds: float, limit: int = 500,
                            excluded_tasks: Sequence[str] = (), grace_seconds: float = 0,
                            after: tuple | None = None) -> List[tuple]:
        """FAILURE results with no DLQ row (the result backend's table, same schema),
        stored between ``window_seconds`` and ``grace_seconds`` ago, after the
        ``(date_done, task_id)`` position ``after``.  The last column is date_done."""
        after_ts, after_id = after if after else (None, None)
        return self._exec(
            "backstop_candidates",
            {"window": window_seconds, "limit": limit, "excluded": list(excluded_tasks),
             "grace": grace_seconds, "after_ts": after_ts, "after_id": after_id},
        ).fetchall()

    def forget_tombstones(self, window_seconds: float) -> int:
        return self._exec("forget_tombstones", {"window": window_seconds}).rowcount

    # -- inspecting -----------------------------------------------------------------------

    def list(self, filters: Mapping[str, Any] | None = None, *, limit: int = 50,
             cursor: int | None = None) -> Page:
        """A page (newest first) and the total matching the same filters."""
        params = check_filters(filters)
        limit = max(1, min(int(limit), MAX_PAGE))
        rows = self._exec("list", {**params, "limit": limit, "cursor": cursor}).fetchall()
        total = self._one("count", params)[0]
        out = [dict(zip(_LIST_COLUMNS, r)) for r in rows]
        next_cursor = out[-1]["id"] if len(out) == limit else None
        return Page(out, total, next_cursor)

    def count(self, filters: Mapping[str, Any] | None = None) -> int:
        return self._one("count", check_filters(filters))[0]

    def matching_ids(self, filters: Mapping[str, Any], limit: int = 100_000) -> List[int]:
        params = check_filters(filters)
        if not has_filter(params):
            raise UsageError("a bulk operation needs explicit ids or at least one filter")
        return [r[0] for r in self._exec("matching_ids", {**params, "limit": limit})]

    def all_ids(self) -> List[int]:
        params = {key: None for key in FILTER_KEYS}
        return [r[0] for r in self._exec("matching_ids", {**params, "limit": 2**62})]

    def get(self, dlq_id: int) -> dict:
        row = self._exec("get", {"id": dlq_id}).fetchone()
        if row is None:
            raise NotFound(f"no DLQ entry with id {dlq_id}")
        return dict(zip(_GET_COLUMNS, row))

    def stats(self) -> dict:
        total, failures, dead, requeued, resolved, oldest, newest, oldest_dead = self._one("stats_totals")
        return {
            "total": total, "failures": int(failures), "dead": dead, "requeued": requeued,
            "resolved": resolved, "oldest": oldest, "newest": newest, "oldest_dead": oldest_dead,
            "by_task": {t: {"entries": n, "failures": int(f)} for t, n, f in self._exec("stats_by_task")},
            "by_reason": {r: {"entries": n, "failures": int(f)} for r, n, f in self._exec("stats_by_reason")},
        }

    # -- changing ---------------------------------------------------------------------------

    def delete(self, ids: Iterable[int]) -> List[int]:
        """Delete rows in one round trip; return the ids that existed."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        return sorted(r[0] for r in self._exec("delete", {"ids": ids}))

    def add_note(self, dlq_id: int, note: str) -> None:
        if self._exec("add_note", {"id": dlq_id, "note": note}).fetchone() is None:
            raise NotFound(f"no DLQ entry with id {dlq_id}")

    def resolve(self, dlq_id: int | None, task_id: str | None) -> int | None:
        """A requeued message succeeded: mark its row resolved (no-op otherwise)."""
        row = self._exec("resolve", {"id": dlq_id, "task_id": task_id}).fetchone()
        return row[0] if row else None

    def requeue_undone(self, dlq_id: int, note: str) -> bool:
        """The requeued message was revoked, expired or discarded on arrival: the row is
        ``dead`` again with ``note``.  False when the row was not ``requeued``."""
        return self._exec("requeue_undone", {"id": dlq_id, "note": note}).fetchone() is not None

    def mark_requeued(self, dlq_id: int, note: str | None = None, seen_failures: int | None = None) -> None:
        """Record a requeue.  With ``seen_failures`` (the failure_count read before
        publishing) a failure of the new run captured meanwhile keeps the row 'dead'."""
        self._exec("mark_requeued", {"id": dlq_id, "note": note, "seen_failures": seen_failures})

    def waiting_job(self, job_key: str) -> str | None:
        """The task id of the waiting message holding ``job_key`` (broker tables), if any."""
        row = self._exec("waiting_job", {"job_key": job_key}).fetchone()
        return row[0] if row else None

    def lock_for_requeue(self, dlq_id: int) -> dict | None:
        row = self._exec("lock_for_requeue", {"id": dlq_id}).fetchone()
        if row is None:
            return None
        return dict(zip(("id", "task_id", "task_name", "queue", "exchange", "routing_key", "priority",
                         "serial_key", "message", "status", "source"), row))

    def requeue_to_broker(self, dlq_id: int, *, note: str | None = None, force: bool = False,
                          keep_retries: bool = False, keep_expires: bool = False) -> RequeueResult:
        """Requeue onto the kombu-pg broker in the same database, in ONE transaction.

        The row is locked first, so two concurrent requeues of one row enqueue once.  The
        message is the stored Kombu message with the ``dlq_id`` header linking it to this
        row and, unless kept, its retry budget restored and its ``expires`` cleared (see
        :func:`relink`); it goes back to its original queue (rows taken from the
        broker) or is routed by its original exchange and routing key (signal captures).

        A message with a job key keeps it.  If another task with that key is waiting, the
        requeue is refused (``REFUSED_JOB_KEY``, nothing changes) unless ``force``: then it
        replaces that task, whose id is returned in ``replaced_task_id`` (the caller marks
        it revoked).  A key held only by a task in flight queues the requeue behind it.
        """
        broker = BrokerStore(self.conn, self.schema)
        with self.conn.transaction():
            row = self.lock_for_requeue(dlq_id)
            if row is None:
                raise NotFound(f"no DLQ entry with id {dlq_id}")
            if row["status"] != "dead" and not force:
                return RequeueResult(dlq_id, False, f"already {row['status']}", refused=REFUSED_STATUS)
            payload = relink(row["message"], dlq_id, keep_retries=keep_retries, keep_expires=keep_expires)
            job_key = job_key_of(payload)
            if job_key is not None:  # job keys only ever travel through the default exchange
                return self._requeue_job(broker, row, payload, job_key, note=note, force=force)
            queues: list[str] = []
            if row["source"] not in ("reaper", "broker") and row["exchange"]:
                queues = broker.publish_routed(
                    row["exchange"], row["routing_key"] or "", payload,
                    priority=row["priority"] or 0, serial_key=row["serial_key"])
            if not queues:
                target = _target(row)
                broker.publish(target, payload, priority=row["priority"] or 0, serial_key=row["serial_key"])
                queues = [target]
            self.mark_requeued(dlq_id, note)
        return RequeueResult(dlq_id, True, "requeued", queues)

    def _requeue_job(self, broker: BrokerStore, row: dict, payload: str, job_key: str, *,
                     note: str | None, force: bool) -> RequeueResult:
        """The job-key part of :meth:`requeue_to_broker` (inside its transaction).

        ``keep`` leaves a waiting task with the key untouched and inserts nothing, so an
        unforced requeue can never overwrite a newer task; ``replace`` (forced) does.
        """
        dlq_id, target = row["id"], _target(row)
        published = broker.publish_job(target, payload, job_key, mode="replace" if force else "keep",
                                       priority=row["priority"] or 0, serial_key=row["serial_key"])
        waiting = self.waiting_job(job_key) if published.outcome == "dropped" else None
        if published.outcome != "dropped":
            self.mark_requeued(dlq_id, note)
        return job_requeue_result(dlq_id, published, job_key, row["task_id"], [target], waiting)

    # -- metrics -------------------------------------------------------------------------------

    def metrics_size(self) -> List[tuple]:
        return self._exec("metrics_size").fetchall()

    def metrics_added(self) -> List[tuple]:
        return self._exec("metrics_added").fetchall()


def job_requeue_result(dlq_id: int, published: JobPublish, job_key: str, task_id: str | None,
                       queues: list[str], waiting: str | None = None) -> RequeueResult:
    """What a requeue of a job-keyed message did, from its publish outcome.

    ``dropped`` (mode keep: another task with the key is waiting) is a refusal; a replaced
    task that is this entry's own earlier requeue displaces nobody.
    """
    if published.outcome == "dropped":
        return RequeueResult(
            dlq_id, False,
            f"refused: {f'task {waiting}' if waiting else 'a task'} with the same job key {job_key!r} is waiting; "
            "force replaces it (it then never runs and is marked revoked)",
            refused=REFUSED_JOB_KEY, waiting_task_id=waiting)
    replaced = published.replaced_task_id
    if published.outcome == "replaced" and replaced == task_id:
        detail, replaced = "requeued (replaced its own waiting copy)", None
    elif published.outcome == "replaced":
        detail = f"requeued; replaced waiting task {replaced} (same job key {job_key!r})"
    elif published.outcome == "queued_behind_in_flight":
        detail = f"requeued behind the task in flight with job key {job_key!r}"
    else:
        detail = "requeued"
    return RequeueResult(dlq_id, True, detail, queues, job_outcome=published.outcome,
                         replaced_task_id=replaced)


def relink(message: str, dlq_id: int, *, keep_retries: bool = False, keep_expires: bool = False) -> str:
    """The stored message with the ``dlq_id`` header that links it to its row.

    A requeue is a fresh start: the ``retries`` header goes back to 0 (the task gets its
    whole retry budget again) and ``expires`` is dropped (a stored expiry time has usually
    passed, and the worker would revoke the task on arrival), unless kept.
    """
    doc = json.loads(message)
    headers = doc.get("headers")
    if not isinstance(headers, dict):
        headers = doc["headers"] = {}
    headers[DLQ_ID_HEADER] = dlq_id
    if not keep_retries and "retries" in headers:
        headers["retries"] = 0
    if not keep_expires:
        headers.pop("expires", None)
        if isinstance(doc.get("properties"), dict):  # the broker-level TTL Celery derives from it
            doc["properties"].pop("expiration", None)
    return json.dumps(doc)


def _target(row: Mapping[str, Any]) -> str:
    target = row["queue"] or row["routing_key"]
    if not target:
        raise DLQError(f"DLQ entry {row['id']} has no queue to requeue to")
    return target


def job_key_of(payload: str) -> str | None:
    try:
        headers = json.loads(payload).get("headers") or {}
    except (ValueError, AttributeError):
        return None
    key = headers.get(JOB_KEY_HEADER)
    return str(key) if key not in (None, "") else None
