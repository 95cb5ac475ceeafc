"""LISTEN/NOTIFY plumbing: the listening connection and the producer-side debouncer.

Free of Kombu: the transport registers :meth:`Listener.fileno` with Celery's event loop
(or waits on it with ``select``) and turns the queue names it yields into fetches.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Callable, Iterable

from psycopg import sql

from .connect import connect

logger = logging.getLogger(__name__)


class Listener:
    """A dedicated autocommit connection LISTENing on one channel.

    Notifications are only delivered outside transactions, so nothing else should run
    long transactions on this connection.
    """

    def __init__(self, conninfo: str, channel: str) -> None:
        self.channel = channel
        self.conn = connect(conninfo)
        self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def fileno(self) -> int:
        return self.conn.fileno()

    def drain(self) -> set[str]:
        """Payloads (queue names) of every notification received so far; never blocks."""
        return {n.payload for n in self.conn.notifies(timeout=0)}

    def wait(self, timeout: float, also: Iterable[int] = ()) -> set[str]:
        """Block up to ``timeout`` seconds for a notification (or a readable ``also`` fd)."""
        pending = self.drain()
        if pending:
            return pending
        select.select([self.fileno(), *also], [], [], max(timeout, 0))
        return self.drain()

    def close(self) -> None:
        self.conn.close()


class NotifyDebouncer:
    """Limits NOTIFYs to one per queue per ``interval`` seconds for one producer.

    A NOTIFY takes a cluster-wide lock at commit, so one per message halves concurrent
    publish throughput.  A suppressed NOTIFY is owed.  In a steady stream the next
    publish after the window carries it; a timer sends what is still owed one window
    later (the trailing notify), so no wake-up is lost when the stream stops.
    """

    def __init__(self, interval: float, send: Callable[[set[str]], None]) -> None:
        self.interval = interval
        self._send = send
        self._last: dict[str, float] = {}
        self._owed: set[str] = set()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def should_notify(self, queue: str) -> bool:
        if self.interval <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            last = self._last.get(queue)
            if last is None or now - last >= self.interval:
                self._last[queue] = now
                self._owed.discard(queue)
                return True
            self._owed.add(queue)
            if self._timer is None:
                self._start_timer(2 * self.interval - (now - last))
            return False

    def _start_timer(self, delay: float) -> None:
        # Caller holds the lock.
        self._timer = threading.Timer(delay, self._flush)
        self._timer.daemon = True
        self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            now = time.monotonic()
            # Owed queues whose window a later publish did not already close with a NOTIFY.
            owed = {q for q in self._owed if now - self._last[q] >= self.interval}
            self._owed -= owed
            for queue in owed:
                self._last[queue] = now
            if self._owed:  # owed, but their window is still open
                self._start_timer(self.interval)
        if owed:
            try:
                self._send(owed)
            except Exception:  # the consumers' safety poll still finds the messages
                logger.warning("kombu-pg: trailing NOTIFY for %s failed", sorted(owed), exc_info=True)

    def cancel(self) -> set[str]:
        """Stop the timer; return the queues still owed a NOTIFY (the caller sends them)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            owed, self._owed = self._owed, set()
        return owed
