"""Celery result backend on PostgreSQL with push-based waiting.

Configuration::

    app = Celery(backend="postgresql://user@host/db")        # or postgres://
    app.conf.result_backend_transport_options = {"schema": "kombu_pg"}

The URL follows the broker's rules (any libpq URL: multi-host, ``?sslmode=``...).
Options (all optional) come from ``result_backend_transport_options``; see
``docs/result-backend.md``.  This module is a thin adapter: SQL lives in
:mod:`kombu_pg.store.results` and ``kombu_pg/sql/results.sql``.

Waiting: ``AsyncResult.get()`` and ``GroupResult.get()`` LISTEN on ``<schema>:results``
and wake when the NOTIFY that the storing transaction sends arrives; a slow re-check
(``polling_interval``) is the only polling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timezone
from typing import Any, Callable, Iterable, Mapping, TypeVar
from uuid import uuid4

import psycopg
from celery import states
from celery.backends.base import BaseBackend, _create_chord_error_with_cause, decompress_payload
from celery.canvas import maybe_signature
from celery.exceptions import ChordError, ImproperlyConfigured, TimeoutError
from celery.result import GroupResult, ResultSet, allow_join_result, result_from_tuple
from celery.utils.functional import _regen
from kombu.serialization import loads
from kombu.utils.compat import register_after_fork
from kombu.utils.encoding import bytes_to_str
from psycopg.conninfo import conninfo_to_dict
from psycopg.errors import ReadOnlySqlTransaction

from .config import BackendOptions, build_conninfo, redact, redact_url
from .store.connect import connect
from .store.migrations import MigrationError, all_migrations, apply_migrations, current_version
from .store.results import ResultListener, ResultStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The last migration the result backend's SQL needs (found by name: numbers can shift
#: when migrations are merged): the one that lets chord_add count an added task once.
RESULTS_SCHEMA_VERSION = next(m.version for m in all_migrations() if m.name == "chord_add_once")

#: How long a fired chord's row is kept (to ignore late copies of header tasks) when
#: neither result_chord_expires nor result_expires is set.
CHORD_MARKER_SECONDS = 86400.0

# Meta keys stored in their own columns; anything else goes to ``extra``.
_COLUMN_KEYS = frozenset(
    {"task_id", "status", "result", "traceback", "children", "date_done", "group_id",
     "parent_id", "name", "args", "kwargs", "worker", "retries", "queue"}
)
_EXTENDED_KEYS = ("name", "args", "kwargs", "worker", "retries", "queue")

# Errors after which a session is given up for a new one.  A server that turned read-only
# (a primary demoted to a standby, default_transaction_read_only turned on) refuses every
# write of the session; a new connection reaches the new primary when the URL lists
# several hosts with target_session_attrs=read-write.  The refused write did not commit.
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, ReadOnlySqlTransaction)

# Schemas known to be migrated, per (conninfo, schema), for this process.
_READY_SCHEMAS: set[tuple[str, str]] = set()
_READY_LOCK = threading.Lock()

# When this process next piggy-backs a cleanup on a write, per (conninfo, schema).
_NEXT_CLEANUP: dict[tuple[str, str], float] = {}
_CLEANUP_LOCK = threading.Lock()
#: Seconds to the next piggy-backed cleanup when the last one left expired rows behind.
CLEANUP_CATCH_UP = 1.0


def _to_bytes(payload: str | bytes | None) -> bytes | None:
    if payload is None or isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    return payload.encode("utf-8")


def _expiry(value: float | None) -> float | None:
    """Seconds to keep a row, or None for never (Celery: 0 or None)."""
    return float(value) if value else None


def _ancestor_ids(result: Any, limit: int = 10_000) -> list[str]:
    """Task ids of ``result``'s parents (chain predecessors), earliest first.

    A group parent contributes its members.  Their failure means ``result`` will never
    run, so a waiter also wakes on their NOTIFYs.
    """
    levels: list[list[str]] = []
    node = getattr(result, "parent", None)
    count = 0
    while node is not None and count < limit:
        if isinstance(node, ResultSet):
            level = [bytes_to_str(r.id) for r in node.results if not isinstance(r, ResultSet)]
        else:
            level = [bytes_to_str(node.id)] if getattr(node, "id", None) else []
        levels.append(level)
        count += len(level)
        node = getattr(node, "parent", None)
    return [tid for level in reversed(levels) for tid in level]


def _after_fork(backend: "PostgresBackend") -> None:
    backend._reset_connections()


class PostgresBackend(BaseBackend):
    """Celery result backend storing results in PostgreSQL (``postgresql://`` URLs)."""

    supports_native_join = True
    supports_autoexpire = False
    supports_result_compression = True
    supports_failure_expires = True
    persistent = True

    def __init__(self, app=None, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        conf = self.app.conf
        if not url:
            raise ImproperlyConfigured(
                "the kombu-pg result backend needs a URL: result_backend = 'postgresql://user@host/db'"
            )
        self.options = BackendOptions.from_mapping(conf.get("result_backend_transport_options"))
        self.conninfo = build_conninfo(url, extra=self.options.connect_kwargs)
        self._own_app_name = (
            "application_name" in self.options.connect_kwargs
            or "application_name" in conninfo_to_dict(url)
        )
        self.schema = self.options.schema
        self.expires = _expiry(self.expires)
        failure_expires = conf.get("result_failure_expires")
        self.failure_expires = (
            self.expires if failure_expires is None
            else _expiry(self.prepare_expires(failure_expires, type=float))
        )
        chord_expires = conf.get("result_chord_expires")
        self.chord_expires = (
            self.expires if chord_expires is None
            else _expiry(self.prepare_expires(chord_expires, type=float))
        )
        self._local = threading.local()
        if register_after_fork is not None:
            register_after_fork(self, _after_fork)

    def __reduce__(self, args=(), kwargs=None):
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))

    # -- connections -----------------------------------------------------------------

    def _reset_connections(self) -> None:
        """Forget every connection without closing it: after fork they belong to the
        parent (psycopg does not terminate a connection made by another process)."""
        self._local = threading.local()

    def _thread_state(self) -> threading.local:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            # A fork the after-fork hook did not see: drop, never close, the parent's.
            local.__dict__.clear()
            local.pid = os.getpid()
        return local

    def _connect(self, role: str = "results") -> psycopg.Connection:
        kwargs = {}
        if not self._own_app_name:
            # Tell the backend's sessions apart in pg_stat_activity.
            kwargs["application_name"] = f"kombu_pg:{role}"
        try:
            return connect(self.conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(
                f"kombu-pg result backend cannot connect to {redact(self.conninfo)}: {exc}"
            ) from exc

    def _ensure_schema(self, conn: psycopg.Connection) -> None:
        key = (self.conninfo, self.schema)
        if key in _READY_SCHEMAS:
            return
        if self.options.auto_migrate:
            apply_migrations(conn, self.schema)
        else:
            version = current_version(conn, self.schema)
            if version < RESULTS_SCHEMA_VERSION:
                raise MigrationError(
                    f"schema {self.schema!r} is at version {version}; the result backend needs "
                    f"version {RESULTS_SCHEMA_VERSION}. Apply the migrations: auto_migrate=True, "
                    "or `celery -A proj pg migrate` (--print gives the SQL for a DBA)"
                )
        with _READY_LOCK:
            _READY_SCHEMAS.add(key)

    @staticmethod
    def _discard(conn: psycopg.Connection | None) -> None:
        if conn is None:
            return
        try:
            conn.close()
        except Exception:  # pragma: no cover - already broken
            pass

    def _store(self) -> ResultStore:
        local = self._thread_state()
        store = getattr(local, "store", None)
        if store is not None and (store.conn.closed or store.conn.broken):
            self._discard(store.conn)
            store = local.store = None
        if store is None:
            conn = self._connect()
            try:
                self._ensure_schema(conn)
            except BaseException:
                self._discard(conn)
                raise
            store = local.store = ResultStore(conn, self.schema)
        return store

    def _run(self, op: Callable[[ResultStore], T]) -> T:
        """Run ``op`` on this thread's store; once more on a fresh connection when the
        session turns out to be dead (idle timeout, server restart, terminated) or on a
        server that turned read-only.  A write refused as read-only did not commit; a read
        answered by a server that turned read-only may be stale, so it is made again."""
        store = self._store()
        try:
            value = op(store)
        except _CONNECTION_ERRORS as exc:
            lost = store.conn.closed or store.conn.broken or isinstance(exc, ReadOnlySqlTransaction)
            if not lost:
                raise
            reason: object = exc
        else:
            if not store.turned_read_only():
                return value
            reason = "the server turned read-only"
        logger.warning("kombu-pg result backend: session lost (%s); reconnecting", reason)
        self._drop_sessions()
        return op(self._store())

    def _listener(self) -> ResultListener:
        local = self._thread_state()
        listener = getattr(local, "listener", None)
        if listener is not None and (listener.conn.closed or listener.conn.broken):
            self._discard(listener.conn)
            listener = local.listener = None
        if listener is None:
            listener = local.listener = ResultListener(self._connect("results-listen"), self.schema)
        return listener

    def _drop_listener(self) -> None:
        listener = getattr(self._thread_state(), "listener", None)
        if listener is not None:
            self._discard(listener.conn)
            self._local.listener = None

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, _CONNECTION_ERRORS)

    def _drop_sessions(self) -> None:
        """Give up this thread's data and listening connections.  Both go: a listening
        session left on a server that turned read-only would never hear the new primary's
        NOTIFYs."""
        self._drop_listener()
        store = getattr(self._thread_state(), "store", None)
        if store is not None:
            self._discard(store.conn)
            self._local.store = None

    def on_backend_retryable_error(self, exc: BaseException) -> None:
        self._drop_sessions()

    # -- (de)serialization ---------------------------------------------------------------

    def _encode_bytes(self, value: Any) -> bytes:
        return _to_bytes(self.encode(value))

    def _decode_with(self, payload, content_type: str, content_encoding: str):
        if payload is None:
            return None
        payload = decompress_payload(bytes(payload))
        return loads(payload, content_type=content_type, content_encoding=content_encoding,
                     accept=self.accept)

    def _row_to_meta(self, row: Mapping[str, Any]) -> dict[str, Any]:
        ct, ce = row["content_type"], row["content_encoding"]
        meta: dict[str, Any] = {
            "task_id": row["task_id"],
            "status": row["status"],
            "result": self._decode_with(row["result"], ct, ce),
            "traceback": row["traceback"],
            "children": self._decode_with(row["children"], ct, ce),
            "date_done": row["date_done"].astimezone(timezone.utc) if row["date_done"] else None,
            "date_started": row["date_started"].astimezone(timezone.utc) if row["date_started"] else None,
        }
        if row["group_id"] is not None:
            meta["group_id"] = row["group_id"]
        if row["parent_id"] is not None:
            meta["parent_id"] = row["parent_id"]
        if row["name"] is not None or self.app.conf.find_value_for_key("extended", "result"):
            meta.update(
                name=row["name"],
                args=self._decode_with(row["args"], ct, ce),
                kwargs=self._decode_with(row["kwargs"], ct, ce),
                worker=row["worker"],
                retries=row["retries"],
                queue=row["queue"],
            )
        if row["extra"] is not None:
            extra = self._decode_with(row["extra"], ct, ce)
            if isinstance(extra, Mapping):
                for key, value in extra.items():
                    meta.setdefault(key, value)
        return self.meta_from_decoded(meta)

    # -- task results ----------------------------------------------------------------------

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback,
                                     request=request, format_date=False, encode=True)
        extra = {k: v for k, v in meta.items() if k not in _COLUMN_KEYS}
        children = meta.get("children")
        expires = self.failure_expires if state == states.FAILURE else self.expires
        ready = state in self.READY_STATES
        retries = meta.get("retries")
        task_id = bytes_to_str(task_id)
        self._run(lambda store: store.store(
            task_id,
            state,
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            result=self._encode_bytes(result),
            ready=ready,
            traceback=traceback,
            children=None if children is None else self._encode_bytes(children),
            started=state == states.STARTED,
            name=meta.get("name"),
            args=_to_bytes(meta.get("args")),
            kwargs=_to_bytes(meta.get("kwargs")),
            worker=meta.get("worker"),
            retries=retries if isinstance(retries, int) else None,
            queue=meta.get("queue"),
            group_id=meta.get("group_id"),
            parent_id=meta.get("parent_id"),
            extra=self._encode_bytes(extra) if extra else None,
            expires=expires,
            notify=ready,
        ))
        if ready and self.options.cleanup_interval:
            self._maybe_cleanup()
        return result

    def _maybe_cleanup(self) -> None:
        """Every ``cleanup_interval`` seconds per process, delete one bounded batch of
        expired rows (sooner again while batches come back full).  Never fails a write."""
        key = (self.conninfo, self.schema)
        now = time.monotonic()
        with _CLEANUP_LOCK:
            if now < _NEXT_CLEANUP.get(key, 0.0):
                return
            _NEXT_CLEANUP[key] = now + self.options.cleanup_interval
        batch = max(1, min(self.options.cleanup_batch, 1000))
        try:
            deleted = self._run(lambda store: store.cleanup_step(batch))
        except Exception as exc:  # pylint: disable=broad-except
            logger.warning("kombu-pg result backend: background cleanup failed: %r", exc)
            return
        if deleted and max(deleted.values()) >= batch:
            with _CLEANUP_LOCK:
                _NEXT_CLEANUP[key] = time.monotonic() + min(CLEANUP_CATCH_UP, self.options.cleanup_interval)
        if deleted and any(deleted.values()):
            logger.debug("kombu-pg result backend: expired rows deleted: %s", deleted)

    def _get_task_meta_for(self, task_id):
        row = self._run(lambda store: store.get(bytes_to_str(task_id)))
        if row is None:
            return {"status": states.PENDING, "result": None}
        return self._row_to_meta(row)

    def task_result_exists(self, task_id) -> bool:
        return self._run(lambda store: store.exists(bytes_to_str(task_id)))

    def _forget(self, task_id):
        self._run(lambda store: store.forget(bytes_to_str(task_id)))

    def cleanup(self) -> dict[str, int]:
        """Delete expired results, groups and chord state (``celery.backend_cleanup``)."""
        deleted = self._run(lambda store: store.cleanup(self.options.cleanup_batch))
        if any(deleted.values()):
            logger.info("kombu-pg result backend cleanup deleted %s", deleted)
        return deleted

    # -- groups ------------------------------------------------------------------------------

    def _save_group(self, group_id, result):
        payload = self._encode_bytes({"result": result.as_tuple()})
        self._run(lambda store: store.save_group(
            bytes_to_str(group_id), payload, content_type=self.content_type,
            content_encoding=self.content_encoding, expires=self.expires,
        ))
        return result

    def _restore_group(self, group_id):
        row = self._run(lambda store: store.get_group(bytes_to_str(group_id)))
        if row is None:
            return None
        meta = self._decode_with(row["result"], row["content_type"], row["content_encoding"])
        return {
            "result": result_from_tuple(meta["result"], self.app),
            "date_done": row["date_done"].astimezone(timezone.utc),
        }

    def _delete_group(self, group_id):
        self._run(lambda store: store.delete_group(bytes_to_str(group_id)))

    # -- waiting ---------------------------------------------------------------------------------

    def _fetch_ready(self, ids: Iterable[str], ready_states) -> dict[str, dict[str, Any]]:
        rows = self._run(lambda store: store.get_many(ids, sorted(ready_states)))
        return {row["task_id"]: self._row_to_meta(row) for row in rows}

    def _start_listening(self) -> bool:
        """LISTEN on this thread's listening connection; False if that failed."""
        try:
            self._listener().start()
            return True
        except _CONNECTION_ERRORS as exc:
            logger.warning("kombu-pg result backend: cannot LISTEN (%s); retrying", exc)
            self._drop_listener()
            return False

    def _listen_and_wait(self, ids: set[str], timeout: float) -> set[str] | None:
        """Sleep until a NOTIFY names one of ``ids`` or ``timeout`` passes; return the
        ids heard (empty on timeout).

        Returns None when the listening connection was lost or is new: the caller must
        LISTEN again on a new one *before* reading again, or a result stored in between
        would only be seen at the next safety re-read.
        """
        try:
            listener = self._listener()
            if not listener.listening:
                # A new listening session (the last one was dropped with the data session):
                # a result stored before this LISTEN is only seen by reading again first.
                listener.start()
                return None
            return listener.wait(ids, timeout)
        except _CONNECTION_ERRORS as exc:
            logger.warning("kombu-pg result backend: listening connection lost (%s); reconnecting", exc)
            self._drop_listener()
            return None

    def _stop_listening(self) -> None:
        listener = getattr(self._thread_state(), "listener", None)
        if listener is None:
            return
        try:
            listener.stop()
        except _CONNECTION_ERRORS:
            self._drop_listener()

    def _backoff(self, failures: int, deadline: float | None) -> None:
        pause = min(0.05 * 2 ** min(failures, 6), self.options.polling_interval)
        if deadline is not None:
            pause = min(pause, max(0.0, deadline - time.monotonic()))
        self._sleep(pause)

    def get_many(self, task_ids, timeout=None, interval=0.5, no_ack=True,
                 on_message=None, on_interval=None, max_iterations=None,
                 READY_STATES=states.READY_STATES, _parents=(), _wake=()):
        """Yield ``(task_id, meta)`` for each id as it becomes ready.

        One query per pass for all ids still pending; between passes the thread sleeps
        on LISTEN until a NOTIFY names one of them (``interval`` is not used: waking is
        pushed; ``polling_interval`` bounds the wait as a safety net).  ``on_interval``
        runs after every wake-up, before the re-read, so (as with Celery's own drainer)
        a parent's error takes precedence over the error it caused.

        ``_parents``: ancestor task ids (earliest first) of the awaited results.  Their
        NOTIFYs wake the waiter too, and once one of them has failed, the ids still
        pending are yielded with that failure: they will never run.  ``_wake``: more
        ids whose NOTIFYs wake the waiter (for ``on_interval`` to look at).
        """
        ids = {bytes_to_str(t) for t in task_ids}
        cache = self._cache
        for task_id in list(ids):
            cached = cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        if not ids:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self._thread_state()
        local.waiters = getattr(local, "waiters", 0) + 1
        parents = [bytes_to_str(p) for p in _parents]
        wake = set(parents) | {bytes_to_str(t) for t in _wake}
        iterations = failures = 0
        first = True
        listening = False
        # The ids a NOTIFY named since the last read; None: read every pending id (first
        # pass, safety re-read, new LISTEN).  Reading only what was announced keeps a
        # large group's join linear instead of re-reading every member on every wake.
        heard: set[str] | None = None
        try:
            while True:
                if not first and on_interval:
                    on_interval()
                if parents and not first and (heard is None or heard & wake):
                    failed = self._failed_parent(parents)
                    if failed is not None:
                        for task_id in list(ids):
                            ids.discard(task_id)
                            yield task_id, dict(failed, task_id=task_id)
                        return
                to_read = ids if heard is None else ids & heard
                try:
                    ready = self._fetch_ready(to_read, READY_STATES) if to_read else {}
                    failures = 0
                except _CONNECTION_ERRORS as exc:
                    # The store already reconnected once: this is a longer outage.  Fail
                    # fast on the first read (bad configuration), else keep trying.
                    if first:
                        raise
                    failures += 1
                    logger.warning("kombu-pg result backend: cannot read results (%s); retrying", exc)
                    ready = {}
                    self._backoff(failures, deadline)
                    heard = None
                first = False
                cache.update(ready)
                for task_id, meta in ready.items():
                    ids.discard(task_id)
                    if on_message is not None:
                        on_message(meta)
                    yield task_id, meta
                if not ids:
                    return
                iterations += 1
                if max_iterations and iterations >= max_iterations:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"Operation timed out ({timeout})")
                if not listening:
                    # LISTEN first, then read again: a result stored in between is
                    # either seen by that read or announced to this session.
                    listening = self._start_listening()
                    if not listening:
                        failures += 1
                        self._backoff(failures, deadline)
                    heard = None
                    continue
                wait = self.options.polling_interval
                if remaining is not None:
                    wait = min(wait, remaining)
                got = self._listen_and_wait(ids | wake, wait)
                listening = got is not None
                # Nothing heard (safety interval) or connection lost: read everything.
                heard = got or None
        finally:
            local.waiters -= 1
            if not local.waiters:  # the outermost wait of this thread ends
                self._stop_listening()

    def _failed_parent(self, parents: list[str]) -> dict[str, Any] | None:
        """The meta of the earliest failed ancestor, if any (one query)."""
        failed = self._fetch_ready(parents, states.PROPAGATE_STATES)
        for task_id in parents:
            if task_id in failed:
                return failed[task_id]
        return None

    def wait_for(self, task_id, timeout=None, interval=0.5, no_ack=True, on_interval=None,
                 _wake=()):
        """Wait for one task's ready state, woken by NOTIFY (see :meth:`get_many`)."""
        self._ensure_not_eager()
        for _, meta in self.get_many({task_id}, timeout=timeout, interval=interval,
                                     no_ack=no_ack, on_interval=on_interval, _wake=_wake):
            return meta
        raise TimeoutError("The operation timed out.")  # pragma: no cover

    def wait_for_pending(self, result, timeout=None, interval=0.5, no_ack=True,
                         on_message=None, on_interval=None, callback=None, propagate=True):
        """``AsyncResult.get()``: like Celery's, but the NOTIFY of a failed parent wakes
        the waiter too, so its error is raised at once (through ``on_interval``)."""
        self._ensure_not_eager()
        if on_message is not None:
            raise ImproperlyConfigured("Backend does not support on_message callback")
        meta = self.wait_for(result.id, timeout=timeout, interval=interval, on_interval=on_interval,
                             no_ack=no_ack, _wake=_ancestor_ids(result) if propagate else ())
        if meta:
            result._maybe_set_cache(meta)
            return result.maybe_throw(propagate=propagate, callback=callback)

    def iter_native(self, result, timeout=None, interval=0.5, no_ack=True,
                    on_message=None, on_interval=None):
        """``GroupResult.get()`` (native join).  When the group follows a task that
        failed (``a | fail | group(...)``), its members will never run: they are
        reported with the parent's failure instead of waiting for the timeout."""
        self._ensure_not_eager()
        results = result.results
        if not results:
            return
        task_ids = set()
        for member in results:
            if isinstance(member, ResultSet):
                yield member.id, member.results
            else:
                task_ids.add(member.id)
        yield from self.get_many(
            task_ids, timeout=timeout, interval=interval, no_ack=no_ack,
            on_message=on_message, on_interval=on_interval, _parents=_ancestor_ids(result),
        )

    # -- chords ------------------------------------------------------------------------------------

    def _chord_marker_expires(self) -> float:
        return self.chord_expires or self.expires or CHORD_MARKER_SECONDS

    def apply_chord(self, header_result_args, body, **kwargs):
        """No chord_unlock task: the header parts count themselves (on_chord_part_return).

        A header holding nested groups is saved so the body gets the nested structure.
        """
        self.ensure_chords_allowed()
        group_id = bytes_to_str(header_result_args[0])
        header = task_ids = None
        # A generator header is not consumed here: its values arrive in header order
        # as far as group_index tells.
        if not isinstance(header_result_args[1], _regen):
            header_result = self.app.GroupResult(*header_result_args)
            task_ids = [bytes_to_str(r.id) for r in header_result.results]
            if any(isinstance(r, GroupResult) for r in header_result.results):
                header = self._encode_bytes({"result": header_result.as_tuple()})
        self._run(lambda store: store.chord_start(
            group_id, task_ids=task_ids, header=header, content_type=self.content_type,
            content_encoding=self.content_encoding, expires=self.chord_expires,
        ))

    def set_chord_size(self, group_id, chord_size):
        self._run(lambda store: store.set_chord_size(
            bytes_to_str(group_id), int(chord_size), expires=self.chord_expires,
        ))

    def add_to_chord(self, chord_id, result):
        """``Task.add_to_chord()``: the added task's value reaches the body after the
        header's values."""
        self._run(lambda store: store.chord_add(
            bytes_to_str(chord_id), bytes_to_str(result.id), expires=self.chord_expires,
        ))

    def _unpack_part(self, part: Mapping[str, Any]):
        value = self._decode_with(part["result"], part["content_type"], part["content_encoding"])
        state = part["state"]
        if state in self.EXCEPTION_STATES:
            value = self.exception_to_python(value)
        if state in states.PROPAGATE_STATES:
            raise _create_chord_error_with_cause(
                message=f"Dependency {part['task_id']} raised {value!r}", original_exc=value,
            )
        return value

    def _join_saved_header(self, header: Mapping[str, Any]):
        meta = self._decode_with(header["header"], header["content_type"], header["content_encoding"])
        deps = result_from_tuple(meta["result"], self.app)
        try:
            with allow_join_result():
                return deps.join_native(timeout=self.app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:
            try:
                culprit = next(deps._failed_join_report())
                reason = f"Dependency {culprit.id} raised {exc!r}"
            except StopIteration:
                reason = repr(exc)
            raise _create_chord_error_with_cause(message=reason, original_exc=exc) from None

    def on_chord_part_return(self, request, state, result, **kwargs):
        """Count this header part atomically; the part that completes the chord sends
        the body with every header value (or fails it with a ChordError)."""
        app = self.app
        task_id, group_id = request.id, request.group
        if not task_id or not group_id or not request.chord:
            return
        group_id = bytes_to_str(group_id)
        payload = self._encode_bytes(self.encode_result(result, state))
        size_hint = request.chord.get("chord_size") if isinstance(request.chord, Mapping) else None
        token = str(uuid4())
        progress = self._run(lambda store: store.chord_part_return(
            group_id, bytes_to_str(task_id), getattr(request, "group_index", None), state, payload,
            content_type=self.content_type, content_encoding=self.content_encoding,
            token=token, size_hint=size_hint, expires=self.chord_expires,
        ))
        if not progress.claimed:
            if progress.size is not None and progress.done > progress.size:
                logger.warning("Chord counter incremented too many times for %r", group_id)
            return
        callback = maybe_signature(request.chord, app=app)
        try:
            header = self._run(lambda store: store.chord_header(group_id))
            if header is not None:
                values = self._join_saved_header(header)
            else:
                parts = self._run(lambda store: store.chord_parts(group_id))
                values = [self._unpack_part(p) for p in parts]
        except ChordError as exc:
            logger.error("Chord %r raised: %r", group_id, exc)
            self.chord_error_from_stack(callback, exc)
        except Exception as exc:  # pylint: disable=broad-except
            logger.exception("Chord %r raised: %r", group_id, exc)
            self.chord_error_from_stack(
                callback, _create_chord_error_with_cause(f"Join error: {exc!r}", exc))
        else:
            try:
                app.amqp._retry_publish(callback.delay, values)
            except Exception as exc:  # pylint: disable=broad-except
                logger.exception("Chord callback for %r raised: %r", group_id, exc)
                self.chord_error_from_stack(
                    callback, _create_chord_error_with_cause(f"Callback error: {exc!r}", exc))
        finally:
            self._run(lambda store: store.chord_finish(group_id, expires=self._chord_marker_expires()))

    # -- misc -------------------------------------------------------------------------------------

    def as_uri(self, include_password: bool = False) -> str:
        if include_password:
            return self.url
        return redact_url(self.url)

    def close(self) -> None:
        """Close this thread's connections (only if this process opened them)."""
        local = self._thread_state()
        for name in ("store", "listener"):
            obj = getattr(local, name, None)
            if obj is not None:
                self._discard(obj.conn)
                setattr(local, name, None)


__all__ = ["BackendOptions", "PostgresBackend"]
