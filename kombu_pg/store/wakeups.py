"""LISTEN/NOTIFY plumbing: the listening connection.

Free of Kombu: the transport registers :meth:`Listener.fileno` with Celery's event loop
(or waits on it with ``select``) and turns the queue names it yields into fetches.
"""

from __future__ import annotations

import logging
import select
from typing import Callable, Iterable

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
