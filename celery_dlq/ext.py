"""The Celery side: signal handlers, the reaper task, start-up capture.

``install(app)`` wires one :class:`DeadLetterQueue` to the app.  Each process (worker
main process, every prefork child, beat, the CLI) opens its own DLQ connection lazily.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Collection

import psycopg
from celery import signals
from celery.utils.serialization import raise_with_context
from celery.utils.time import get_exponential_backoff_interval
from kombu.serialization import dumps as kombu_dumps, loads as kombu_loads

from kombu_pg.config import build_conninfo
from kombu_pg.store import BrokerStore, connect, ensure_schema
from kombu_pg.store.connect import ProcessConnection

from . import config
from .capture import (
    NonRetryable, classify, entry_from_message, is_non_retryable, message_from_context,
    message_from_kombu, retry_limit, stamp_published,
)
from .content import accepted_content, is_accepted
from .store import DLQ_ID_HEADER, DLQStore, Entry

logger = logging.getLogger("celery_dlq")

REAP_TASK = "celery_dlq.reap"
#: Pauses before the attempts to resolve a requeued entry after a lost session (the first
#: attempt goes at once): a terminated session or a server restart of a few seconds must
#: not leave the row 'requeued' although its task succeeded.
RESOLVE_RETRY_DELAYS = (0.0, 0.5, 1.0, 2.0)

class DeadLetterQueue:
    """Per-app, per-process DLQ runtime."""

    def __init__(self, app) -> None:
        self.app = app
        self._settings: config.Settings | None = None
        self._lock = threading.RLock()
        self._connection = ProcessConnection(self._connect)
        # Only opened with dlq_replica_url; never migrated or marked: a standby refuses writes.
        self._replica = ProcessConnection(lambda: connect(build_conninfo(self.settings.replica_url)))
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
        if s.auto_migrate:
            try:
                ensure_schema(conn, conninfo, s.schema, auto_migrate=True)
            except BaseException:
                conn.close()
                raise
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
        unmet = self.backstop_unmet(entry.task_name)
        recovery = (f"The backstop sweep will NOT recover it: {unmet}." if unmet else
                    f"The backstop sweep ({REAP_TASK}, `celery dlq reap`, worker start) will recover it "
                    "from its FAILURE result.")
        logger.critical("celery_dlq: DLQ WRITE FAILED for task %s[%s] (%s: %s): %s. %s",
                        entry.task_name, entry.task_id, entry.reason, entry.exception_type,
                        " ".join(str(error).split()), recovery)  # one line: a log search finds it whole
        return None

    def backstop_unmet(self, task_name: str | None = None) -> str | None:
        """Why the backstop sweep cannot recover a failure (of ``task_name``), or None.

        The sweep reads FAILURE results from the kombu-pg result backend in the DLQ's
        schema, and only those stored with ``result_extended`` (the task name).
        """
        s = self.settings
        if s.backstop_window <= 0:
            return "it is off (dlq_backstop_window = 0)"
        conf = self.app.conf
        if not conf.result_extended:
            return "set result_extended = True, so FAILURE results keep the task name the sweep needs"
        try:
            from kombu_pg.backend import PostgresBackend

            backend = self.app.backend
        except Exception as exc:  # a backend that cannot even be built stores nothing
            return f"the result backend is unavailable ({type(exc).__name__})"
        if not isinstance(backend, PostgresBackend):
            return f"the result backend is {type(backend).__name__}, not kombu-pg's (result_backend)"
        if backend.schema != s.schema:
            return (f"the result backend's schema {backend.schema!r} is not the DLQ's {s.schema!r} "
                    "(result_backend_transport_options, dlq_schema)")
        task = self.app.tasks.get(task_name) if task_name else None
        if task is not None and task.ignore_result and not task.store_errors_even_if_ignored:
            return f"task {task_name} ignores its result (ignore_result, store_errors_even_if_ignored)"
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
            unrecovered: list[str] = []
            try:
                if worker_request is not None:
                    doc = message_from_kombu(worker_request.message)
                elif in_context:
                    doc = message_from_context(task, ctx, args, kwargs)
                else:
                    doc = minimal_message(task, task_id, args, kwargs)
                    unrecovered = ["queue", *BACKSTOP_UNRECOVERED]
            except Exception as exc:
                # Arguments the serializer refuses: keep the failure, say what is missing.
                logger.error("celery_dlq: the message of %s[%s] cannot be rebuilt (%s); "
                             "captured without its arguments", task.name, task_id, exc)
                doc = minimal_message(task, task_id, (), {})
                doc["headers"]["argsrepr"] = getattr(ctx, "argsrepr", None) if in_context else None
                doc["headers"]["dlq_unrebuildable"] = f"{type(exc).__name__}: {exc}"
                unrecovered = ["queue", *BACKSTOP_UNRECOVERED, "args", "kwargs"]
            entry = entry_from_message(
                doc, reason=reason, source=source, exc=exception,
                traceback=getattr(einfo, "traceback", None), retries=retries,
                worker=getattr(ctx, "hostname", None) or _hostname(), max_retries=retry_limit(task),
            )
            entry.unrecovered = unrecovered
        except Exception:
            logger.critical("celery_dlq: could not build a DLQ entry for task %s[%s]",
                            getattr(task, "name", "?"), task_id, exc_info=True)
            return
        self.write(entry)

    def on_task_revoked(self, sender=None, request=None, terminated=False, expired=False, **kwargs) -> None:
        """A requeued task revoked or expired in the worker: its row would stay
        ``requeued`` forever (no failure, no success follows), so it is ``dead`` again."""
        if not self._ours(sender) or request is None:
            return
        what = ("expired on arrival" if expired else "terminated while running" if terminated
                else "revoked on arrival")
        # The request is the task's Context: its attributes are the message headers.
        self._requeue_undone(_dlq_id(vars(request)), getattr(request, "id", None), what)

    def on_task_discarded(self, sender=None, message=None, **kwargs) -> None:
        """The worker discarded a requeued message it cannot run (unknown task, invalid
        message).  On kombu-pg the broker's reject recorded the failure first; this is a
        no-op then (the row is already ``dead``)."""
        if message is None or getattr(getattr(sender, "app", None), "_celery_dlq", None) is not self:
            return
        headers = getattr(message, "headers", None)
        headers = headers if isinstance(headers, dict) else {}
        self._requeue_undone(_dlq_id(headers), headers.get("id"), "discarded by the worker on arrival")

    def _requeue_undone(self, dlq_id: int | None, task_id: str | None, what: str) -> None:
        if dlq_id is None:
            return
        try:
            with self._lock:
                undone = self.store().requeue_undone(
                    dlq_id, f"requeued task {task_id} {what}: no result, back to dead")
        except Exception:
            self.reset_connection()
            logger.error("celery_dlq: could not mark DLQ entry %s dead again (its requeued task %s was %s)",
                         dlq_id, task_id, what, exc_info=True)
            return
        if undone:
            logger.warning("celery_dlq: requeued task %s was %s; DLQ entry %s is dead again",
                           task_id, what, dlq_id)

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
        error: Exception | None = None
        for delay in (*RESOLVE_RETRY_DELAYS, None):
            try:
                with self._lock:
                    self.store().resolve(int(dlq_id), ctx.id)
                return
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                error = exc
                self.reset_connection()  # a lost session: the next attempt reconnects
                if delay is None:
                    break
                time.sleep(delay)
            except Exception as exc:
                error = exc
                self.reset_connection()
                break
        logger.error("celery_dlq: could not mark DLQ entry %s resolved; it stays 'requeued'", dlq_id,
                     exc_info=error)

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
        unmet = self.backstop_unmet()
        if unmet and settings.backstop_window > 0:
            logger.warning("celery_dlq: the backstop sweep is enabled (dlq_backstop_window=%s) but cannot "
                           "recover a failed DLQ write: %s.", settings.backstop_window, unmet)
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
                    # The pass reaps the poison it released itself (celery_dlq installed).
                    report["moved"] += released.reaped
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
                    task = self.app.tasks.get(row[1])
                    entry = entry_from_result(row[:-1], s, accept,
                                              max_retries=getattr(task, "max_retries", None))
                    if entry is not None and store.capture_if_absent(entry, failed_at=row[-1]) is not None:
                        swept += 1
                if len(rows) < limit:
                    break
                after = (rows[-1][-1], rows[-1][0])  # skipped rows stay behind the cursor
            store.forget_tombstones(max(s.backstop_window, 1.0) * 2)
        if swept:
            logger.warning("celery_dlq: backstop sweep captured %d failure(s) missing from the DLQ", swept)
        return swept


def _dlq_id(headers: dict) -> int | None:
    """The ``dlq_id`` header of a requeued message, or None."""
    value = headers.get(DLQ_ID_HEADER)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _is_disconnect(exc: BaseException) -> bool:
    return not isinstance(exc, psycopg.errors.LockNotAvailable) and not isinstance(
        exc, psycopg.errors.QueryCanceled)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def guard_retry(task, dlq: DeadLetterQueue) -> None:
    """Make ``task.retry(exc=...)`` re-raise non-retryable errors instead of retrying, and
    give a hand-written ``self.retry()`` the task's backoff policy.

    Celery's autoretry (``autoretry_for``) and hand-written ``self.retry(exc=exc)`` both
    go through ``task.retry``; a non-retryable exception then fails the task on its first
    run, so no retry is burned and ``task_failure`` sends it to the DLQ.

    Celery applies ``retry_backoff`` / ``retry_jitter`` (a :func:`retry_policy` preset)
    only to autoretry; a bare ``self.retry()`` would wait ``default_retry_delay`` (180 s).
    With ``retry_backoff`` set and neither ``countdown`` nor ``eta`` given, the countdown
    is computed exactly as autoretry does.
    """
    original = task.retry

    def retry(*args, **kwargs):
        when_given = len(args) > 4 or kwargs.get("countdown") is not None or kwargs.get("eta") is not None
        if getattr(task, "retry_backoff", False) and not when_given:
            kwargs["countdown"] = policy_countdown(task)
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


def policy_countdown(task) -> int:
    """The delay before the next retry under the task's ``retry_backoff`` policy (Celery's
    autoretry formula: ``min(retry_backoff_max, retry_backoff * 2**retries)``, full jitter
    with ``retry_jitter``)."""
    return get_exponential_backoff_interval(
        factor=int(max(1.0, float(task.retry_backoff))), retries=task.request.retries or 0,
        maximum=int(getattr(task, "retry_backoff_max", 600)), full_jitter=getattr(task, "retry_jitter", True))


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


#: What the result backend does not keep, so a backstop entry cannot have it: the
#: exchange, priority, serial and job keys, first publish time, every header but task, id
#: and retries (custom ones included), and the links (callbacks, errbacks, chain, chord).
BACKSTOP_UNRECOVERED = ("exchange", "priority", "serial_key", "job_key", "published_at", "headers", "links")


def entry_from_result(row, settings: config.Settings | None, accept: Collection[str],
                      max_retries: int | None = None) -> Entry | None:
    """A DLQ entry rebuilt from a FAILURE row of the result backend (backstop sweep);
    None when the DLQ rules would not have captured that failure.  Columns are decoded
    only with ``accept`` (the app's result_accept_content).  ``unrecovered`` lists the
    message fields it lacks."""
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
        traceback=traceback, retries=retries or 0, worker=worker, max_retries=max_retries,
        unrecovered=[*BACKSTOP_UNRECOVERED, *(name for name, ok in (("args", args_ok), ("kwargs", kwargs_ok))
                                              if not ok)],
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
    signals.task_revoked.connect(dlq.on_task_revoked, weak=False)
    signals.task_unknown.connect(dlq.on_task_discarded, weak=False)
    signals.task_rejected.connect(dlq.on_task_discarded, weak=False)
    # Connected once for the process: several installed apps all stamp the same header.
    signals.before_task_publish.connect(stamp_published, weak=False, dispatch_uid="celery_dlq.published")
    signals.worker_init.connect(dlq.on_worker_init, weak=False)
    signals.worker_process_init.connect(dlq.on_worker_process_init, weak=False)

    @app.task(name=REAP_TASK, ignore_result=True, shared=False)
    def reap():
        """Move exhausted broker messages to the DLQ and run the backstop sweep."""
        return dlq.reap()

    def schedule(sender=None, **kwargs):
        _dead_letter_broker_rejects(app)
        interval = app.conf.get("dlq_reap_interval", config.DEFAULTS["dlq_reap_interval"])
        if interval:
            # A reap still waiting when the next one is due is redundant: it expires then.
            app.add_periodic_task(float(interval), app.signature(REAP_TASK), name=REAP_TASK,
                                  expires=float(interval))

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
