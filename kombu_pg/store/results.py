"""Result backend operations: task results, groups, chord counters, result wake-ups.

Pure SQL over psycopg: payloads arrive already serialized (bytes) and leave as bytes;
turning them into Python values is the Celery adapter's job (``kombu_pg.backend``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from ..config import CLEANUP_BATCH
from .connect import read_only
from .queries import Queries

logger = logging.getLogger(__name__)

#: Stored in chord_parts.group_index when the part's position is unknown (sorts last).
UNKNOWN_GROUP_INDEX = 2_147_483_647


def results_channel(schema: str) -> str:
    """The NOTIFY channel on which a stored ready result announces its task id."""
    return f"{schema}:results"


@dataclass(frozen=True)
class ChordProgress:
    """What :meth:`ResultStore.chord_part_return` saw after counting one part."""

    done: int
    size: int | None
    #: True for exactly one call per chord run: the one that must send the body.
    claimed: bool


class ResultStore:
    """Result-backend SQL bound to one connection and one schema.

    The connection must be in autocommit mode: every method is one statement (so one
    transaction) unless it says otherwise.
    """

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self.q = Queries(schema, "results.sql")
        self.channel = results_channel(schema)
        # A session can be read-only on purpose (a reporting role that only reads results).
        self._opened_read_only = read_only(conn)

    def turned_read_only(self) -> bool:
        """Whether the server went read-only since this session was opened (a primary
        demoted to a standby, ``default_transaction_read_only`` turned on): its writes now
        fail and its reads may be stale.  Known from the reply to the first statement
        after the change (PostgreSQL 14 or later)."""
        return not self._opened_read_only and read_only(self.conn)

    def _exec(self, name: str, params: dict | None = None) -> psycopg.Cursor:
        return self.conn.execute(self.q[name], params)

    def _dicts(self, name: str, params: dict) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(self.q[name], params).fetchall()

    # -- task results ------------------------------------------------------------

    def store(
        self,
        task_id: str,
        status: str,
        *,
        content_type: str,
        content_encoding: str,
        result: bytes | None,
        ready: bool,
        traceback: str | None = None,
        children: bytes | None = None,
        started: bool = False,
        name: str | None = None,
        args: bytes | None = None,
        kwargs: bytes | None = None,
        worker: str | None = None,
        retries: int | None = None,
        queue: str | None = None,
        group_id: str | None = None,
        parent_id: str | None = None,
        extra: bytes | None = None,
        expires: float | None = None,
        notify: bool = True,
    ) -> bool:
        """Upsert a task's state; False when skipped because SUCCESS is already stored.

        With ``notify`` the task id is sent on :attr:`channel` in the same transaction.
        ``expires`` is in seconds from now (None: never).
        """
        row = self._exec(
            "store_result",
            dict(
                task_id=task_id,
                status=status,
                content_type=content_type,
                content_encoding=content_encoding,
                result=result,
                traceback=traceback,
                children=children,
                ready=ready,
                started=started,
                name=name,
                args=args,
                kwargs=kwargs,
                worker=worker,
                retries=retries,
                queue=queue,
                group_id=group_id,
                parent_id=parent_id,
                extra=extra,
                expires=expires,
                notify=notify,
                channel=self.channel,
            ),
        ).fetchone()
        return row is not None

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The task's row as a dict, or None when unknown, forgotten or expired."""
        rows = self._dicts("get_result", {"task_id": task_id})
        return rows[0] if rows else None

    def get_many(self, task_ids: Iterable[str], states: Sequence[str]) -> list[dict[str, Any]]:
        """Rows of ``task_ids`` currently in one of ``states``, in one round trip."""
        ids = list(task_ids)
        if not ids:
            return []
        return self._dicts("get_results", {"task_ids": ids, "states": list(states)})

    def exists(self, task_id: str) -> bool:
        return bool(self._exec("result_exists", {"task_id": task_id}).fetchone()[0])

    def forget(self, task_id: str) -> None:
        self._exec("forget", {"task_id": task_id})

    # -- groups --------------------------------------------------------------------

    def save_group(
        self, group_id: str, result: bytes, *, content_type: str, content_encoding: str,
        expires: float | None = None,
    ) -> None:
        self._exec(
            "save_group",
            dict(group_id=group_id, result=result, content_type=content_type,
                 content_encoding=content_encoding, expires=expires),
        )

    def get_group(self, group_id: str) -> dict[str, Any] | None:
        rows = self._dicts("get_group", {"group_id": group_id})
        return rows[0] if rows else None

    def delete_group(self, group_id: str) -> None:
        self._exec("delete_group", {"group_id": group_id})

    # -- chords ----------------------------------------------------------------------

    def chord_start(
        self, group_id: str, *, task_ids: Sequence[str] | None = None, header: bytes | None = None,
        content_type: str | None = None, content_encoding: str | None = None,
        expires: float | None = None,
    ) -> None:
        """A chord run begins (before its header is sent): reset any earlier run.

        ``task_ids`` (the header's ids in order) fixes the order of the body's values;
        ``header`` is a serialized header with nested groups, joined instead of the parts.
        """
        self._exec(
            "chord_start",
            dict(group_id=group_id, task_ids=None if task_ids is None else list(task_ids),
                 header=header, content_type=content_type,
                 content_encoding=content_encoding, expires=expires),
        )

    def set_chord_size(self, group_id: str, size: int, *, expires: float | None = None) -> None:
        self._exec("chord_size", dict(group_id=group_id, size=size, expires=expires))

    def chord_add(self, group_id: str, task_id: str, *, expires: float | None = None) -> None:
        """One more part, task ``task_id`` (``Task.add_to_chord``), must return before the
        body is sent.  Counted once per ``task_id``: safe to run again after a lost reply."""
        self._exec("chord_add", {"group_id": group_id, "task_id": task_id, "expires": expires})

    def chord_part_return(
        self,
        group_id: str,
        task_id: str,
        group_index: int | None,
        state: str,
        result: bytes | None,
        *,
        content_type: str,
        content_encoding: str,
        token: str,
        size_hint: int | None = None,
        expires: float | None = None,
    ) -> ChordProgress:
        """Count one header part (once per task id and position) and maybe claim the body.

        ``token`` must be unique per logical call (a uuid4); pass the same token again
        when retrying after a connection error so an already committed claim is seen.
        """
        row = self._exec(
            "chord_part_return",
            dict(
                group_id=group_id,
                task_id=task_id,
                group_index=UNKNOWN_GROUP_INDEX if group_index is None else int(group_index),
                state=state,
                result=result,
                content_type=content_type,
                content_encoding=content_encoding,
                token=token,
                size=size_hint,
                expires=expires,
            ),
        ).fetchone()
        return ChordProgress(done=row[0], size=row[1], claimed=bool(row[2]))

    def chord_header(self, group_id: str) -> dict[str, Any] | None:
        rows = self._dicts("chord_header", {"group_id": group_id})
        return rows[0] if rows and rows[0]["header"] is not None else None

    def chord_parts(self, group_id: str) -> list[dict[str, Any]]:
        """The returned header values in header order."""
        return self._dicts("chord_parts", {"group_id": group_id})

    def chord_finish(self, group_id: str, *, expires: float | None) -> None:
        """Drop the chord's parts; its row stays (until ``expires``) as a fired marker."""
        self._exec("chord_finish", {"group_id": group_id, "expires": expires})

    # -- maintenance -------------------------------------------------------------------

    def cleanup(self, batch: int = CLEANUP_BATCH) -> dict[str, int]:
        """Delete every expired row, in batches of ``batch`` per statement."""
        deleted = {}
        for table in ("results", "groups", "chords", "chord_parts"):
            total = 0
            while True:
                n = self._exec(f"cleanup_{table}", {"limit": batch}).rowcount
                total += n
                if n < batch:
                    break
            deleted[table] = total
        return deleted

    def cleanup_step(self, batch: int) -> dict[str, int] | None:
        """Delete at most ``batch`` expired rows per table in one transaction, unless
        another session is doing the same (then None).  Meant to be piggy-backed on
        writes, so it is bounded; a full batch means more is left."""
        with self.conn.transaction():
            if not self._exec("try_cleanup_lock", {"schema": self.schema}).fetchone()[0]:
                return None
            return {
                table: self._exec(f"cleanup_{table}", {"limit": batch}).rowcount
                for table in ("results", "groups", "chords", "chord_parts")
            }

    def counts(self) -> dict[str, int]:
        row = self._exec("count_rows").fetchone()
        return dict(zip(("results", "groups", "chords", "chord_parts"), row))


class ResultListener:
    """LISTEN on the results channel of one schema over a dedicated connection.

    The connection does nothing else, so every notification is seen.  Listening is
    switched on around a wait and off afterwards (:meth:`stop`), so an idle client never
    lets the server's notification queue pile up behind it.
    """

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.channel = results_channel(schema)
        self.listening = False

    def start(self) -> None:
        if not self.listening:
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self.listening = True

    def stop(self) -> None:
        if self.listening:
            self.conn.execute("UNLISTEN *")
            self.listening = False
            # Drop what arrived meanwhile; the next wait re-reads the table anyway.
            for _ in self.conn.notifies(timeout=0):
                pass

    def wait(self, wanted: Iterable[str] | None, timeout: float) -> set[str]:
        """Block up to ``timeout`` seconds for a notification about one of ``wanted``
        (any id when None); return every wanted id heard (empty on timeout).

        Whole packets are consumed (``stop_after``), so no notification that arrived with
        the first one is dropped; those already delivered are collected too.
        """
        wanted = None if wanted is None else set(wanted)
        heard: set[str] = set()

        def take(notifications) -> None:
            for n in notifications:
                if n.channel == self.channel and (wanted is None or n.payload in wanted):
                    heard.add(n.payload)

        deadline = time.monotonic() + max(0.0, timeout)
        while not heard:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            take(self.conn.notifies(timeout=remaining, stop_after=1))
        if heard:
            take(self.conn.notifies(timeout=0))
        return heard
