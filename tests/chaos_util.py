"""Helpers shared by the chaos tests: the task log, gates, waiting with deadlines.

Every wait here is on a condition (a row, a log line, a process exit) with a deadline;
the short sleeps inside :func:`wait_until` are the polling step, not a synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from kombu_pg.store import BrokerStore, apply_migrations

from .worker import wait_until  # noqa: F401  (re-exported for the chaos tests)



def create_log_tables(conn: psycopg.Connection, schema: str) -> None:
    apply_migrations(conn, schema)
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {s}.task_log (id bigserial, task text, phase text, arg text,"
            " task_id text, hostname text, pid int, redelivered bool, at double precision);"
            " CREATE TABLE IF NOT EXISTS {s}.gates (name text PRIMARY KEY)"
        ).format(s=sql.Identifier(schema))
    )


@dataclass
class Row:
    task: str
    phase: str
    arg: str
    task_id: str
    hostname: str
    pid: int
    redelivered: bool
    at: float


class TaskLog:
    """Reads ``<schema>.task_log`` (written by chaos_app tasks) and opens gates."""

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    def rows(self, task: str | None = None, phase: str | None = None) -> list[Row]:
        query = sql.SQL(
            "SELECT task, phase, arg, task_id, hostname, pid, redelivered, at FROM {}.task_log"
            " WHERE (%(task)s::text IS NULL OR task = %(task)s)"
            " AND (%(phase)s::text IS NULL OR phase = %(phase)s) ORDER BY id"
        ).format(sql.Identifier(self.schema))
        return [Row(*r) for r in self.conn.execute(query, {"task": task, "phase": phase})]

    def args(self, task: str | None = None, phase: str | None = None) -> list[str]:
        return [r.arg for r in self.rows(task, phase)]

    def open_gate(self, name: str) -> None:
        self.conn.execute(
            sql.SQL("INSERT INTO {}.gates (name) VALUES (%s) ON CONFLICT DO NOTHING")
            .format(sql.Identifier(self.schema)), (name,))


def messages(conn: psycopg.Connection, schema: str, where: str = "true", params: tuple = ()) -> list[dict]:
    """Rows of the broker's messages table (payload left out), oldest first."""
    cur = conn.execute(
        sql.SQL("SELECT id, queue, delivery_count, lock_token, locked_by, locked_at, payload::json->'headers'->>'id'"
                " AS task_id FROM {}.messages WHERE " + where + " ORDER BY id")
        .format(sql.Identifier(schema)), params)
    names = [c.name for c in cur.description]
    return [dict(zip(names, r)) for r in cur]


def consumers(conn: psycopg.Connection, schema: str) -> list[dict]:
    return BrokerStore(conn, schema).consumers()


def terminate(conn: psycopg.Connection, backend_pids) -> int:
    """pg_terminate_backend each pid (waiting until each is gone); return how many ended."""
    ended = 0
    for pid in backend_pids:
        if conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]:
            ended += 1
    return ended


def orphan_messages(conn: psycopg.Connection, schema: str, from_queue: str, to_queue: str) -> list[int]:
    """Move every message of ``from_queue`` into ``to_queue`` locked by a consumer that does
    not exist, in one statement; return their ids.

    Only a recovery pass unlocks such a message, so a live worker that later runs it proves
    a recovery pass ran after this call (a "recovery probe").
    """
    rows = conn.execute(
        sql.SQL("UPDATE {}.messages SET queue = %s, lock_token = gen_random_uuid(), locked_by = -1,"
                " locked_at = now(), delivery_count = delivery_count + 1 WHERE queue = %s RETURNING id")
        .format(sql.Identifier(schema)), (to_queue, from_queue)).fetchall()
    return [r[0] for r in rows]
