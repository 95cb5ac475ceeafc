"""Opening psycopg connections the way every kombu-pg component needs them."""

from __future__ import annotations

import os
import threading
from typing import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..config import scrub

#: Broker sessions run short statements only.  JIT compilation never pays off for them,
#: yet the planner asks for it whenever its estimate passes ``jit_above_cost``, and for a
#: queue table without fresh statistics (a burst, autovacuum off or behind) the estimate
#: comes from the table's size alone: a recovery pass then spent ~130-220 ms compiling
#: a statement that runs in a few, on the thread that runs Celery's event loop.
NO_JIT = "-c jit=off"


def connect(conninfo: str, *, jit: bool = True, **kwargs) -> psycopg.Connection:
    """An autocommit connection: each statement commits on its own, and nothing holds a
    transaction open across callbacks (LISTEN needs that too).

    ``jit=False`` turns JIT compilation off for the session (added to any ``options``
    the conninfo already carries, no extra round trip).
    """
    if not jit:
        given = kwargs.get("options") or conninfo_to_dict(conninfo).get("options") or ""
        kwargs["options"] = f"{given} {NO_JIT}".strip()
    try:
        return psycopg.connect(conninfo, autocommit=True, **kwargs)
    except psycopg.Error as exc:
        # libpq quotes parts of a conninfo it cannot parse; raised again with the secrets
        # masked, and without the original (``from None``), so no traceback shows them.
        message = scrub(str(exc), conninfo, kwargs)
        if message == str(exc):
            raise
        raise type(exc)(message) from None


def read_only(conn: psycopg.Connection) -> bool:
    """Whether the server last reported this session as read-only: a hot standby, or
    ``default_transaction_read_only`` on (``ALTER SYSTEM``, role or database settings).

    PostgreSQL 14 and later report both settings at connect and with the reply to the
    first statement after a change; older servers report neither (always False).
    """
    status = conn.info.parameter_status
    return status("default_transaction_read_only") == "on" or status("in_hot_standby") == "on"


# Connections inherited through fork are kept referenced, never closed or collected:
# closing (or GC) would end the parent's session on the shared socket.
_inherited: list[psycopg.Connection] = []


class ProcessConnection:
    """One lazily opened connection per process, reopened when closed or broken.

    After a fork the child opens its own; the parent's is left alone (see ``_inherited``).
    Not thread-safe: callers that share it serialise their use.
    """

    def __init__(self, opener: Callable[[], psycopg.Connection]) -> None:
        self._open = opener
        self._conn: psycopg.Connection | None = None
        self._pid = os.getpid()

    def release_inherited(self) -> bool:
        """In a forked child, let go of the parent's connection; whether this was one."""
        if self._pid == os.getpid():
            return False
        if self._conn is not None:
            _inherited.append(self._conn)
        self._conn, self._pid = None, os.getpid()
        return True

    def get(self) -> psycopg.Connection:
        self.release_inherited()
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._open()
        return self._conn

    def current(self) -> psycopg.Connection | None:
        """This process's connection as it is (None if none was opened), without opening
        or reopening one."""
        self.release_inherited()
        return self._conn

    def reset(self) -> None:
        """Close this process's connection (the next :meth:`get` opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except Exception:
                pass  # closing a broken connection can fail; it is dropped all the same


class ThreadConnection:
    """A :class:`ProcessConnection` per thread: one lazily opened connection per thread
    and process, for components whose threads each run their own statements."""

    def __init__(self, opener: Callable[[], psycopg.Connection]) -> None:
        self._open = opener
        self._local = threading.local()

    def _holder(self) -> ProcessConnection:
        holder = getattr(self._local, "holder", None)
        if holder is None:
            holder = self._local.holder = ProcessConnection(self._open)
        return holder

    def get(self) -> psycopg.Connection:
        """This thread's connection, opened (again) if there is none, it is closed or
        broken, or it is a parent process's."""
        return self._holder().get()

    def current(self) -> psycopg.Connection | None:
        """This thread's connection as it is, without opening one (None if none)."""
        return self._holder().current()

    def reset(self) -> None:
        """Close this thread's connection (if this process opened it)."""
        self._holder().reset()
