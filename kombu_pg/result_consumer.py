"""Waiting for results: the result backend's LISTEN/NOTIFY side.

:class:`ResultConsumer` is to :class:`kombu_pg.backend.PostgresBackend` what Celery's
Redis ``ResultConsumer`` (``celery/backends/redis.py``) is to the Redis backend: it owns
the listening session and the waiting loop, and the backend delegates ``get()``'s
methods (``wait_for_pending``, ``iter_native``, ``get_many``, ``wait_for``) to it.

It does not take Celery's ``AsyncBackendMixin`` (``celery/backends/asynchronous.py``):
that shares one consumer between the threads of a process and makes ``get()`` wait for a
drainer (the calling thread, or a greenlet under eventlet/gevent) to hand results over
through a per-process registry of pending results and buckets, which then needs locking
between threads.  Here a NOTIFY names the task id, so each waiting thread LISTENs on a
session of its own and filters what it hears: no thread ever waits for another, under
threads, prefork or plain scripts alike, at the cost of one listening connection per
waiting thread.  Result reads go through the backend (its data session, decoding, cache).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import psycopg
from celery import states
from celery.exceptions import ImproperlyConfigured, TimeoutError
from celery.result import AsyncResult, ResultSet
from kombu.utils.encoding import bytes_to_str
from psycopg.errors import ReadOnlySqlTransaction

from .store.connect import ThreadConnection
from .store.results import ResultListener

if TYPE_CHECKING:
    from .backend import PostgresBackend

# The waiting is the backend's to users: its log lines keep the backend's logger.
logger = logging.getLogger("kombu_pg.backend")

# Errors after which a session is given up for a new one.  A server that turned read-only
# (a primary demoted to a standby, default_transaction_read_only turned on) refuses every
# write of the session; a new connection reaches the new primary when the URL lists
# several hosts with target_session_attrs=read-write.  The refused write did not commit.
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, ReadOnlySqlTransaction)


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


class ResultConsumer:
    """Waits for task results of one backend instance, woken by NOTIFY.

    Per thread: one listening connection (a :class:`ThreadConnection`, so a forked child
    opens its own) and the count of waits in progress; LISTEN is switched off when the
    outermost wait of the thread ends.
    """

    def __init__(self, backend: "PostgresBackend") -> None:
        self.backend = backend
        self._listen = ThreadConnection(lambda: backend.open_connection("results-listen"))
        self._local = threading.local()  # this thread's ResultListener and wait count

    # -- the listening connection ---------------------------------------------------------

    def _listener(self) -> ResultListener:
        conn = self._listen.get()
        listener = getattr(self._local, "listener", None)
        if listener is None or listener.conn is not conn:
            # A new session (the last one was lost, dropped or the parent's): not listening.
            listener = self._local.listener = ResultListener(conn, self.backend.schema)
        return listener

    def drop_listener(self) -> None:
        """Close this thread's listening connection; the next wait opens a new one."""
        self._listen.reset()
        self._local.listener = None

    # -- waiting ------------------------------------------------------------------------------

    def _start_listening(self) -> bool:
        """LISTEN on this thread's listening connection; False if that failed."""
        try:
            self._listener().start()
            return True
        except CONNECTION_ERRORS as exc:
            logger.warning("kombu-pg result backend: cannot LISTEN (%s); retrying", exc)
            self.drop_listener()
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
        except CONNECTION_ERRORS as exc:
            logger.warning("kombu-pg result backend: listening connection lost (%s); reconnecting", exc)
            self.drop_listener()
            return None

    def _stop_listening(self) -> None:
        listener = getattr(self._local, "listener", None)
        if listener is None or listener.conn is not self._listen.current():
            return  # none, or one of a parent process (it is the parent's to stop)
        try:
            listener.stop()
        except CONNECTION_ERRORS:
            self.drop_listener()

    def _backoff(self, failures: int, deadline: float | None) -> None:
        pause = min(0.05 * 2 ** min(failures, 6), self.backend.options.polling_interval)
        if deadline is not None:
            pause = min(pause, max(0.0, deadline - time.monotonic()))
        self.backend._sleep(pause)

    def get_many(self, task_ids: Iterable[str], timeout: float | None = None, interval: float = 0.5,
                 no_ack: bool = True, on_message: Callable[[dict], Any] | None = None,
                 on_interval: Callable[[], Any] | None = None, max_iterations: int | None = None,
                 READY_STATES: frozenset[str] = states.READY_STATES, _parents: Iterable[str] = (),
                 _wake: Iterable[str] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
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
        cache = self.backend._cache
        for task_id in list(ids):
            cached = cache.get(task_id)
            if cached is not None and cached["status"] in READY_STATES:
                ids.discard(task_id)
                yield task_id, cached
        if not ids:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        local = self._local
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
                    ready = self.backend._fetch_ready(to_read, READY_STATES) if to_read else {}
                    failures = 0
                except CONNECTION_ERRORS as exc:
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
                wait = self.backend.options.polling_interval
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
        failed = self.backend._fetch_ready(parents, states.PROPAGATE_STATES)
        for task_id in parents:
            if task_id in failed:
                return failed[task_id]
        return None

    def wait_for(self, task_id: str, timeout: float | None = None, interval: float = 0.5,
                 no_ack: bool = True, on_interval: Callable[[], Any] | None = None,
                 _wake: Iterable[str] = ()) -> dict[str, Any]:
        """Wait for one task's ready state, woken by NOTIFY (see :meth:`get_many`)."""
        self.backend._ensure_not_eager()
        for _, meta in self.get_many({task_id}, timeout=timeout, interval=interval,
                                     no_ack=no_ack, on_interval=on_interval, _wake=_wake):
            return meta
        raise TimeoutError("The operation timed out.")  # pragma: no cover

    def wait_for_pending(self, result: AsyncResult, timeout: float | None = None, interval: float = 0.5,
                         no_ack: bool = True, on_message: Callable[[dict], Any] | None = None,
                         on_interval: Callable[[], Any] | None = None,
                         callback: Callable[..., Any] | None = None, propagate: bool = True) -> Any:
        """``AsyncResult.get()``: like Celery's, but the NOTIFY of a failed parent wakes
        the waiter too, so its error is raised at once (through ``on_interval``)."""
        self.backend._ensure_not_eager()
        if on_message is not None:
            raise ImproperlyConfigured("Backend does not support on_message callback")
        meta = self.wait_for(result.id, timeout=timeout, interval=interval, on_interval=on_interval,
                             no_ack=no_ack, _wake=_ancestor_ids(result) if propagate else ())
        if meta:
            result._maybe_set_cache(meta)
            return result.maybe_throw(propagate=propagate, callback=callback)

    def iter_native(self, result: ResultSet, timeout: float | None = None, interval: float = 0.5,
                    no_ack: bool = True, on_message: Callable[[dict], Any] | None = None,
                    on_interval: Callable[[], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """``GroupResult.get()`` (native join).  When the group follows a task that
        failed (``a | fail | group(...)``), its members will never run: they are
        reported with the parent's failure instead of waiting for the timeout."""
        self.backend._ensure_not_eager()
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
