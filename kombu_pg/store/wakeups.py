"""LISTEN/NOTIFY plumbing: the listening connection and the producer-side debouncer.

Free of Kombu: the transport registers :meth:`Listener.fileno` with Celery's event loop
(or waits on it with ``select``) and turns the queue names it yields into fetches.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Callable, Collection, Iterable

from psycopg import sql

from .connect import connect

logger = logging.getLogger(__name__)


class Listener:
    """A dedicated autocommit connection LISTENing on one channel (and a due channel).

    Notifications are only delivered outside transactions, so nothing else should run
    long transactions on this connection.  With ``due_channel``, each due-time
    announcement on it (epoch seconds) goes to ``on_due``; payloads on ``channel`` are
    always queue names.
    """

    def __init__(self, conninfo: str, channel: str, due_channel: str | None = None,
                 on_due: Callable[[float], None] | None = None) -> None:
        self.channel = channel
        self.due_channel = due_channel
        self.on_due = on_due
        self.conn = connect(conninfo, jit=False)
        for name in filter(None, (channel, due_channel)):
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))

    def fileno(self) -> int:
        return self.conn.fileno()

    def drain(self) -> set[str]:
        """Queue names of every notification received so far (due times go to ``on_due``);
        never blocks."""
        return self._take()[0]

    def wait(self, timeout: float, also: Iterable[int] = ()) -> set[str]:
        """Block up to ``timeout`` seconds for a notification (or a readable ``also`` fd)."""
        names, heard = self._take()
        if heard:  # a due time too: the caller's next wait may have to be shorter
            return names
        select.select([self.fileno(), *also], [], [], max(timeout, 0))
        return self.drain()

    def _take(self) -> tuple[set[str], bool]:
        """The queue names received, and whether anything (a due time too) was."""
        names, heard = set(), False
        for notification in self.conn.notifies(timeout=0):
            heard = True
            if notification.channel != self.due_channel:
                names.add(notification.payload)
            elif self.on_due is not None:
                try:
                    self.on_due(float(notification.payload))
                except ValueError:
                    logger.warning("kombu-pg: ignored a due-time announcement that is not a time: %r",
                                   notification.payload[:40])
        return names, heard

    def close(self) -> None:
        self.conn.close()


#: A publish is routed by (exchange, routing key); the default exchange is ("", queue).
RouteKey = tuple[str, str]


class NotifyDebouncer:
    """Limits NOTIFYs to one per route per ``interval`` seconds for one producer.

    A NOTIFY takes a cluster-wide lock at commit and holds it through the WAL flush, so
    one per message costs every producer.  Whether a publish notifies is decided per
    route, (exchange, routing key), before its statement runs; what a suppressed publish
    owes is the queues its statement inserted into (:meth:`published`).  In a steady
    stream the route's next notifying publish carries them; a timer sends what is still
    owed one window later (the trailing notify), so no wake-up is lost when the stream
    stops.
    """

    #: Routes remembered before the stale ones are forgotten: a route seen longer than
    #: ``interval`` ago notifies at once whether or not it is remembered, so forgetting
    #: it only bounds memory (routing keys can be unbounded, e.g. per-user topics).
    MAX_ROUTES = 1024

    def __init__(self, interval: float, send: Callable[[set[str]], None]) -> None:
        self.interval = interval
        self._send = send
        self._last: dict[RouteKey, float] = {}  # when the route's window opened
        self._owed: dict[RouteKey, set[str]] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def should_notify(self, route: RouteKey) -> bool:
        """True if this publish notifies: the route's last window has closed (a new one opens)."""
        if self.interval <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            last = self._last.get(route)
            if last is not None and now - last < self.interval:
                return False
            if last is None and len(self._last) >= self.MAX_ROUTES:
                self._forget_stale(now)
            self._last[route] = now
            return True

    def published(self, route: RouteKey, queues: Collection[str], notified: bool) -> None:
        """Record what a publish's committed statement did.

        A NOTIFY naming a queue covers every message committed to it before, so a
        notifying publish settles what any route owes those queues; a suppressed one
        owes them until then (or until the trailing notify).
        """
        if self.interval <= 0:
            return
        with self._lock:
            if notified:
                self._settle(set(queues))
                return
            if not queues:
                return
            self._owed.setdefault(route, set()).update(queues)
            now = time.monotonic()
            # A statement slower than the window may find its route forgotten meanwhile.
            opened = self._last.setdefault(route, now)
            if self._timer is None:
                self._start_timer(2 * self.interval - (now - opened))

    def _settle(self, queues: set[str]) -> None:
        # Caller holds the lock.
        for route in list(self._owed):
            self._owed[route] -= queues
            if not self._owed[route]:
                del self._owed[route]

    def _forget_stale(self, now: float) -> None:
        # Caller holds the lock.  Owed routes stay: the timer reads their windows.
        self._last = {r: t for r, t in self._last.items() if now - t < self.interval or r in self._owed}

    def _start_timer(self, delay: float) -> None:
        # Caller holds the lock.
        self._timer = threading.Timer(max(delay, 0.0), self._flush)
        self._timer.daemon = True
        self._timer.start()

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            now = time.monotonic()
            # Owed routes whose window a later publish did not already close with a NOTIFY.
            due = [r for r in self._owed if now - self._last[r] >= self.interval]
            owed = set().union(*(self._owed[r] for r in due))
            for route in due:
                self._last[route] = now
            self._settle(owed)
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
            owed = set().union(*self._owed.values())
            self._owed = {}
        return owed
