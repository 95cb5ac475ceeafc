"""The Celery side: signal handlers, the reaper task, start-up capture.

``install(app)`` wires one :class:`DeadLetterQueue` to the app.  Each process (worker
main process, every prefork child, beat, the CLI) opens its own DLQ connection lazily.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections import OrderedDict
from typing import Any, Collection

import psycopg
from celery import signals
from celery.utils.serialization import raise_with_context
from kombu.serialization import dumps as kombu_dumps, loads as kombu_loads

from kombu_pg.config import build_conninfo
from kombu_pg.store import BrokerStore, apply_migrations, connect
from kombu_pg.store.connect import ProcessConnection

from . import config
from .capture import (
    NonRetryable, classify, entry_from_message, is_non_retryable, message_from_context,
    message_from_kombu,
)
from .content import accepted_content, is_accepted
from .store import DLQ_ID_HEADER, DLQStore, Entry

logger = logging.getLogger("celery_dlq")

REAP_TASK = "celery_dlq.reap"

class DeadLetterQueue:
    """Per-app, per-process DLQ runtime."""

    def __init__(self, app) -> None:
        self.app = app
        self._settings: config.Settings | None = None
        self._lock = threading.RLock()
        self._connection = ProcessConnection(self._connect)
        # Only opened with dlq_replica_url; never migrated or marked: a standby refuses writes.
        self._replica = ProcessConnection(lambda: connect(build_conninfo(self.settings.replica_url)))
        self._migrated = False
        self._requests: OrderedDict[str, Any] = OrderedDict()
        # Deliveries already captured in this process: Celery can report one failure
        # twice (a hard time limit fires task_failure, then the killed child's
        # WorkerLostError fires it again); a new delivery of the task clears the mark.
        self._captured: OrderedDict[str, bool] = OrderedDict()

    # -- settings and connection ----------------------------------------------------

    @property
    def settings(self) -> config.Settings:
        if self._settings is None:
            self._settings = config.load(self.app)
        return self._settings

    def _connect(self) -> psycopg.Connection:
        s = self.settings
        timeout_ms = int(s.write_timeout * 1000)
        extra = {"options": f"-c lock_timeout={timeout_ms}"} if timeout_ms else None
        conninfo = build_conninfo(s.database_url, extra=extra)
        conn = connect(conninfo)
        if s.auto_migrate and not self._migrated:
            apply_migrations(conn, s.schema)
            self._migrated = True
        if s.atomic:
            # What "installed" means to the broker's own deletions (expiry, purge, queue
            # deletion): they move poison into this DLQ first while the row says so.
            DLQStore(conn, s.schema).mark_installed(s.max_deliveries if s.enabled else None)
        return conn

    def store(self) -> DLQStore:
        with self._lock:
            self._forget_parent()
            return DLQStore(self._connection.get(), self.settings.schema)

    def read_store(self) -> DLQStore:
        """The store for reads only: on the replica when ``dlq_replica_url`` is set."""
        if not self.settings.replica_url:
            return self.store()
        with self._lock:
            self._forget_parent()
            return DLQStore(self._replica.get(), self.settings.schema)

    def _forget_parent(self) -> None:
        # In a forked child the parent's connection and in-flight bookkeeping are not ours.
        self._replica.release_inherited()
        if self._connection.release_inherited():
            self._requests, self._captured = OrderedDict(), OrderedDict()

    def reset_connection(self) -> None:
        with self._lock:
            self._connection.reset()
            self._replica.reset()

    def close(self) -> None:
        self.reset_connection()

    # -- writing -----------------------------------------------------------------------

    def write(self, entry: Entry) -> int | None:
        """Capture one failure; a failed write is logged loudly, never raised into Celery."""
        error: BaseException | None = None
        for attempt in (1, 2):
            try:
                with self._lock:
                    row_id, count = self.store().capture(entry)
                logger.warning("celery_dlq: task %s[%s] dead-lettered (%s, %s), DLQ id %s, failure %d",
                               entry.task_name, entry.task_id, entry.reason, entry.exception_type, row_id, count)
                return row_id
            except psycopg.OperationalError as exc:
                # A broken session (server restart): one retry on a fresh connection.
                self.reset_connection()
                if attempt == 2 or not _is_disconnect(exc):
                    error = exc
                    break
            except Exception as exc:
                self.reset_connection()
                error = exc
                break
        logger.critical(
            "celery_dlq: DLQ WRITE FAILED for task %s[%s] (%s: %s): %s. The failure is not "
            "lost if the result backend stored it: the backstop sweep (%s, `celery dlq reap`) "
            "captures FAILURE results missing from the DLQ.",
            entry.task_name, entry.task_id, entry.reason, entry.exception_type, error, REAP_TASK)
        return None

    # -- signal handlers ------------------------------------------------------------------

    def _ours(self, task) -> bool:
        return task is not None and getattr(task, "app", None) is self.app

    def on_task_received(self, sender=None, request=None, **kwargs) -> None:
        """Worker main process: remember the request, for failures reported there."""
        if request is None or not self._ours(getattr(request, "task", None)):
            return
        with self._lock:
            self._requests[request.id] = request
            self._captured.pop(request.id, None)
            limit = self.settings.request_memory
            while len(self._requests) > limit:
                self._requests.popitem(last=False)

    def on_task_prerun(self, sender=None, task=None, **kwargs) -> None:
        task = task or sender
        if self._ours(task) and not getattr(task, "_dlq_guarded", False):
            guard_retry(task, self)

    def on_task_failure(self, sender=None, task_id=None, exception=None, args=None, kwargs=None,
                        einfo=None, **extra) -> None:
        task = sender
        if not self._ours(task):
            return
        try:
            settings = self.settings
            if not settings.enabled or task.name in settings.excluded_tasks:
                return
            with self._lock:
                worker_request = self._requests.pop(task_id, None)
                if worker_request is None and task_id in self._captured:
                    logger.info("celery_dlq: second failure report for the same delivery of %s ignored",
                                task_id)
                    return
                if worker_request is not None:
                    self._captured[task_id] = True
                    while len(self._captured) > self.settings.request_memory:
                        self._captured.popitem(last=False)
            ctx = task.request
            in_context = ctx is not None and ctx.id == task_id and not ctx.called_directly
            if worker_request is not None:
                retries = worker_request.request_dict.get("retries") or 0
            else:
                retries = (ctx.retries or 0) if in_context else 0
            reason = classify(task, exception, retries, settings)
            if reason is None:
                return
            source = "worker" if worker_request is not None else "trace"
            try:
                if worker_request is not None:
                    doc = message_from_kombu(worker_request.message)
                elif in_context:
                    doc = message_from_context(task, ctx, args, kwargs)
                else:
                    doc = minimal_message(task, task_id, args, kwargs)
            except Exception as exc:
                # Arguments the serializer refuses: keep the failure, say what is missing.
                logger.error("celery_dlq: the message of %s[%s] cannot be rebuilt (%s); "
                             "captured without its arguments", task.name, task_id, exc)
                doc = minimal_message(task, task_id, (), {})
                doc["headers"]["argsrepr"] = getattr(ctx, "argsrepr", None) if in_context else None
                doc["headers"]["dlq_unrebuildable"] = f"{type(exc).__name__}: {exc}"
            entry = entry_from_message(
                doc, reason=reason, source=source, exc=exception,
                traceback=getattr(einfo, "traceback", None), retries=retries,
                worker=getattr(ctx, "hostname", None) or _hostname(),
            )
        except Exception:
            logger.critical("celery_dlq: could not build a DLQ entry for task %s[%s]",
                            getattr(task, "name", "?"), task_id, exc_info=True)
            return
        self.write(entry)

    def on_task_success(self, sender=None, **kwargs) -> None:
        """A requeued message (it carries the dlq_id header) succeeded: resolve its row."""
        task = sender
        if not self._ours(task):
            return
        ctx = task.request
        dlq_id = (ctx.headers or {}).get(DLQ_ID_HEADER) if ctx is not None else None
        if dlq_id is None and ctx is not None:
            dlq_id = vars(ctx).get(DLQ_ID_HEADER)
        if dlq_id is None:
            return
        try:
            with self._lock:
                self.store().resolve(int(dlq_id), ctx.id)
        except Exception:
            self.reset_connection()
            logger.error("celery_dlq: could not mark DLQ entry %s resolved", dlq_id, exc_info=True)

    def on_worker_init(self, sender=None, **kwargs) -> None:
        """Worker main process, before the pool, consumer and ``--purge``: capture first."""
        if getattr(sender, "app", None) is not self.app:
            return
        try:
            settings = self.settings
        except config.ConfigurationError as exc:
            # Celery logs and swallows exceptions from signal handlers; a DLQ that is
            # silently off is worse than a worker that refuses to start.
            logger.critical("celery_dlq: %s", exc)
            raise SystemExit(f"celery_dlq: {exc}") from None
        if settings.atomic:
            try:
                self.store()  # connecting says whether the DLQ is installed (see _connect)
            except psycopg.Error as exc:
                logger.error("celery_dlq: cannot reach the DLQ database at worker start: %s", exc)
        if not settings.enabled:
            self.warn_unrecoverable("worker start")
            return
        if settings.reap_at_worker_start:
            report = self.reap(recover=True)
            logger.warning("celery_dlq: start-up capture: %d exhausted message(s) moved to the DLQ, "
                           "%d failure(s) recovered by the backstop sweep", report["moved"], report["swept"])
        self.reset_connection()  # prefork children must not inherit it

    def on_worker_process_init(self, **kwargs) -> None:
        with self._lock:
            self._forget_parent()

    # -- operations --------------------------------------------------------------------------

    def warn_unrecoverable(self, where: str) -> int:
        """With the DLQ disabled, say how many exhausted messages nothing will keep."""
        s = self.settings
        if not (s.atomic and s.max_deliveries):
            return 0
        try:
            with self._lock:
                n = self.store().count_exhausted(s.max_deliveries)
        except Exception:
            self.reset_connection()
            return 0
        if n:
            logger.warning(
                "celery_dlq: the DLQ is disabled (dlq_enabled=False) and %d broker message(s) are "
                "past max_deliveries=%d at %s; anything that deletes them (purge, queue deletion, "
                "expiry) deletes them for good: they cannot be recovered.", n, s.max_deliveries, where)
        return n

    def reap(self, *, recover: bool = False) -> dict:
        """Capture everything pending: exhausted broker messages (looping until none are
        left) and, as a backstop, FAILURE results that never reached the DLQ."""
        s = self.settings
        report = {"moved": 0, "swept": 0, "recovered": 0}
        if not s.enabled:
            self.warn_unrecoverable("reap")
            return report
        with self._lock:
            store = self.store()
            if s.atomic and s.max_deliveries:
                report["moved"] += store.reap(s.max_deliveries, s.reap_batch_size)
                if recover:
                    # Messages held by workers that died (this one's previous life) are
                    # unlocked in place, then reaped if they are exhausted.
                    released = BrokerStore(store.conn, s.schema).recover([])
                    report["recovered"] = sum(released.released.values())
                    if report["recovered"]:
                        report["moved"] += store.reap(s.max_deliveries, s.reap_batch_size)
        if s.backstop_window > 0:
            report["swept"] = self.sweep()
        return report

    def sweep(self, limit: int = 500) -> int:
        """Backstop: FAILURE results (kombu-pg result backend) with no DLQ row."""
        s = self.settings
        swept = 0
        with self._lock:
            store = self.store()
            if not store.has_results_table():
                return 0
            after = None
            accept = accepted_content(self.app, results=True)
            while True:
                rows = store.backstop_candidates(s.backstop_window, limit, sorted(s.excluded_tasks),
                                                 s.backstop_grace, after)
                for row in rows:
                    entry = entry_from_result(row[:-1], s, accept)
                    if entry is not None and store.capture_if_absent(entry, failed_at=row[-1]) is not None:
                        swept += 1
                if len(rows) < limit:
                    break
                after = (rows[-1][-1], rows[-1][0])  # skipped rows stay behind the cursor
            store.forget_tombstones(max(s.backstop_window, 1.0) * 2)
        if swept:
            logger.warning("celery_dlq: backstop sweep captured %d failure(s) missing from the DLQ", swept)
        return swept


def _is_disconnect(exc: BaseException) -> bool:
    return not isinstance(exc, psycopg.errors.LockNotAvailable) and not isinstance(
        exc, psycopg.errors.QueryCanceled)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def guard_retry(task, dlq: DeadLetterQueue) -> None:
    """Make ``task.retry(exc=...)`` re-raise non-retryable errors instead of retrying.

    Celery's autoretry (``autoretry_for``) and hand-written ``self.retry(exc=exc)`` both
    go through ``task.retry``; a non-retryable exception then fails the task on its first
    run, so no retry is burned and ``task_failure`` sends it to the DLQ.
    """
    original = task.retry

    def retry(*args, **kwargs):
        exc = kwargs.get("exc", args[2] if len(args) > 2 else None)
        if exc is not None:
            try:
                settings = dlq.settings
            except Exception:
                settings = None
            if settings is not None and settings.enabled and is_non_retryable(exc, settings):
                raise_with_context(exc)
        return original(*args, **kwargs)

    task.retry = retry
    task._dlq_guarded = True


def minimal_message(task, task_id, args, kwargs) -> dict:
    content_type, content_encoding, data = kombu_dumps(
        (list(args or ()), dict(kwargs or {}), {"callbacks": None, "errbacks": None, "chain": None, "chord": None}),
        serializer=getattr(task, "serializer", None) or "json")
    if isinstance(data, str):
        data = data.encode(content_encoding or "utf-8")
    return {
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": {"lang": "py", "task": task.name, "id": task_id, "retries": 0},
        "properties": {"body_encoding": "base64", "delivery_info": {}, "priority": 0},
    }


def _decode(data, content_type, content_encoding, accept: Collection[str]) -> tuple[bool, Any]:
    """(decoded, value) of a result-backend column; a content type outside ``accept`` is
    never deserialized: (False, None)."""
    if data is None:
        return True, None
    if not is_accepted(content_type, accept):
        return False, None
    try:
        from celery.backends.base import decompress_payload

        return True, kombu_loads(decompress_payload(bytes(data)), content_type, content_encoding,
                                 accept=accept)
    except Exception:
        return False, None


def _result_reason(exc_class: type | None, retries: int, settings: config.Settings | None) -> str | None:
    """The same rules as :func:`classify`, from what the result backend kept."""
    from celery.exceptions import MaxRetriesExceededError, Reject

    if exc_class is not None and issubclass(exc_class, Reject):
        return "rejected"
    if exc_class is not None and issubclass(exc_class, MaxRetriesExceededError):
        return "retries_exhausted"
    if exc_class is not None and settings is not None and (
            issubclass(exc_class, NonRetryable) or issubclass(exc_class, settings.non_retryable or ())):
        return "non_retryable"
    if retries:
        return "retries_exhausted"
    if settings is None or settings.capture_unclassified:
        return "non_retryable"
    return None


def _loaded_class(module: str | None, name: str | None) -> type | None:
    """The exception class if its module is already imported (nothing is imported here)."""
    import sys

    if not name:
        return None
    cls = getattr(sys.modules.get(module or "builtins"), name, None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def entry_from_result(row, settings: config.Settings | None, accept: Collection[str]) -> Entry | None:
    """A DLQ entry rebuilt from a FAILURE row of the result backend (backstop sweep);
    None when the DLQ rules would not have captured that failure.  Columns are decoded
    only with ``accept`` (the app's result_accept_content)."""
    (task_id, name, queue, retries, worker, content_type, content_encoding, result, traceback,
     args, kwargs) = row
    _, meta = _decode(result, content_type, content_encoding, accept)
    exc_type = exc_message = None
    exc_class = None
    if isinstance(meta, dict):
        exc_type = meta.get("exc_type")
        exc_class = _loaded_class(meta.get("exc_module"), exc_type)
        if meta.get("exc_module") and meta["exc_module"] != "builtins" and exc_type:
            exc_type = f"{meta['exc_module']}.{exc_type}"
        message = meta.get("exc_message")
        exc_message = " ".join(map(str, message)) if isinstance(message, (list, tuple)) else (
            None if message is None else str(message))
    reason = _result_reason(exc_class, retries or 0, settings)
    if reason is None:
        return None
    args_ok, args = _decode(args, content_type, content_encoding, accept)
    kwargs_ok, kwargs = _decode(kwargs, content_type, content_encoding, accept)
    body_ct, body_ce, data = kombu_dumps(
        (list(args or ()), dict(kwargs or {}), {"callbacks": None, "errbacks": None, "chain": None, "chord": None}),
        serializer="json")
    if isinstance(data, str):
        data = data.encode(body_ce or "utf-8")
    doc = {
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": body_ce,
        "content-type": body_ct,
        "headers": {"lang": "py", "task": name, "id": task_id, "retries": retries},
        "properties": {"body_encoding": "base64", "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    }
    if not (args_ok and kwargs_ok):
        doc["headers"]["dlq_unrebuildable"] = (
            f"the result backend stored the arguments as {content_type!r}, which could not be "
            "decoded with result_accept_content")
    return Entry(
        message=json.dumps(doc, default=str), reason=reason, source="backstop", task_id=task_id, task_name=name, queue=queue, exchange=None,
        routing_key=queue, exception_type=exc_type, exception_message=exc_message,
        traceback=traceback, retries=retries or 0, worker=worker,
    )


def install(app) -> DeadLetterQueue:
    """Enable the DLQ for ``app`` (idempotent).  Settings are read lazily from ``dlq_*``."""
    existing = getattr(app, "_celery_dlq", None)
    if existing is not None:
        return existing
    dlq = DeadLetterQueue(app)
    app._celery_dlq = dlq
    signals.task_received.connect(dlq.on_task_received, weak=False)
    signals.task_prerun.connect(dlq.on_task_prerun, weak=False)
    signals.task_failure.connect(dlq.on_task_failure, weak=False)
    signals.task_success.connect(dlq.on_task_success, weak=False)
    signals.worker_init.connect(dlq.on_worker_init, weak=False)
    signals.worker_process_init.connect(dlq.on_worker_process_init, weak=False)

    @app.task(name=REAP_TASK, ignore_result=True, shared=False)
    def reap():
        """Move exhausted broker messages to the DLQ and run the backstop sweep."""
        return dlq.reap()

    def schedule(sender=None, **kwargs):
        _dead_letter_broker_rejects(app)
        interval = app.conf.get("dlq_reap_interval")
        if interval:
            app.add_periodic_task(float(interval), app.signature(REAP_TASK), name=REAP_TASK)

    if app.configured:
        schedule()
    else:
        app.on_after_configure.connect(schedule, weak=False)
    return dlq


def _dead_letter_broker_rejects(app) -> None:
    """With kombu-pg as the broker, reject(requeue=False) moves the message into the DLQ
    in one statement (the transport's ``dead_letter_rejected`` option)."""
    url = app.conf.broker_url or ""
    if url.split("://", 1)[0] in ("postgresql", "postgres"):
        options = dict(app.conf.broker_transport_options or {})
        options.setdefault("dead_letter_rejected", True)
        app.conf.broker_transport_options = options


__all__ = ["DeadLetterQueue", "NonRetryable", "REAP_TASK", "install"]
