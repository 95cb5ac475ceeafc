"""Celery result backend on PostgreSQL with push-based waiting.

Configuration::

    app = Celery(backend="postgresql://user@host/db")        # or postgres://
    app.conf.result_backend_transport_options = {"schema": "kombu_pg"}

The URL follows the broker's rules (any libpq URL: multi-host, ``?sslmode=``...).
Options (all optional) come from ``result_backend_transport_options``; see
``docs/result-backend.md``.  This module is a thin adapter: SQL lives in
:mod:`kombu_pg.store.results` and ``kombu_pg/sql/results.sql``.

Waiting (:mod:`kombu_pg.result_consumer`): ``AsyncResult.get()`` and ``GroupResult.get()``
LISTEN on ``<schema>:results`` and wake when the NOTIFY that the storing transaction sends
arrives; a slow re-check (``polling_interval``) is the only polling.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar
from uuid import uuid4

import psycopg
from celery import states
from celery.backends.base import BaseBackend, _create_chord_error_with_cause, decompress_payload
from celery.canvas import maybe_signature
from celery.exceptions import ChordError, ImproperlyConfigured
from celery.result import AsyncResult, GroupResult, ResultSet, allow_join_result, result_from_tuple
from celery.utils.functional import _regen
from kombu.serialization import loads
from kombu.utils.encoding import bytes_to_str
from psycopg.conninfo import conninfo_to_dict
from psycopg.errors import ReadOnlySqlTransaction

from .config import BackendOptions, build_conninfo, redact, redact_url
from .result_consumer import CONNECTION_ERRORS, ResultConsumer
from .store.connect import ThreadConnection, connect
from .store.migrations import all_migrations, ensure_schema
from .store.results import ResultStore

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
        # Per thread: Celery shares a backend instance between threads unless
        # result_backend_thread_safe is off, and a psycopg session serves one at a time.
        self._data = ThreadConnection(self._open_data)
        self._local = threading.local()  # this thread's ResultStore over its connection
        self.result_consumer = ResultConsumer(self)

    def __reduce__(self, args=(), kwargs=None):
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))

    # -- connections -----------------------------------------------------------------

    def open_connection(self, role: str) -> psycopg.Connection:
        """A new session of this backend; ``role`` names it in pg_stat_activity unless the
        URL or ``connect_kwargs`` set ``application_name``."""
        kwargs = {}
        if not self._own_app_name:
            kwargs["application_name"] = f"kombu_pg:{role}"
        try:
            return connect(self.conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            raise psycopg.OperationalError(
                f"kombu-pg result backend cannot connect to {redact(self.conninfo)}: {exc}"
            ) from exc

    def _open_data(self) -> psycopg.Connection:
        conn = self.open_connection("results")
        try:
            ensure_schema(conn, self.conninfo, self.schema, auto_migrate=self.options.auto_migrate,
                          minimum=RESULTS_SCHEMA_VERSION)
        except BaseException:
            conn.close()
            raise
        return conn

    def _store(self) -> ResultStore:
        conn = self._data.get()
        store = getattr(self._local, "store", None)
        if store is None or store.conn is not conn:
            store = self._local.store = ResultStore(conn, self.schema)
        return store

    def _run(self, op: Callable[[ResultStore], T]) -> T:
        """Run ``op`` on this thread's store; once more on a fresh connection when the
        session turns out to be dead (idle timeout, server restart, terminated) or on a
        server that turned read-only.  A write refused as read-only did not commit; a read
        answered by a server that turned read-only may be stale, so it is made again."""
        store = self._store()
        try:
            value = op(store)
        except CONNECTION_ERRORS as exc:
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

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, CONNECTION_ERRORS)

    def _drop_sessions(self) -> None:
        """Close this thread's data and listening connections.  Both go: a listening
        session left on a server that turned read-only would never hear the new primary's
        NOTIFYs."""
        self.result_consumer.drop_listener()
        self._data.reset()
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

    def get_many(self, task_ids: Iterable[str], **kwargs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        """See :meth:`ResultConsumer.get_many`."""
        return self.result_consumer.get_many(task_ids, **kwargs)

    def wait_for(self, task_id: str, **kwargs: Any) -> dict[str, Any]:
        """See :meth:`ResultConsumer.wait_for`."""
        return self.result_consumer.wait_for(task_id, **kwargs)

    def wait_for_pending(self, result: AsyncResult, **kwargs: Any) -> Any:
        """``AsyncResult.get()``: see :meth:`ResultConsumer.wait_for_pending`."""
        return self.result_consumer.wait_for_pending(result, **kwargs)

    def iter_native(self, result: ResultSet, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """``GroupResult.get()``: see :meth:`ResultConsumer.iter_native`."""
        return self.result_consumer.iter_native(result, **kwargs)

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
        self._drop_sessions()


__all__ = ["BackendOptions", "PostgresBackend"]
