"""Periodic-task entries in the database: the runtime API and the publishing of ticks.

A tick (an entry at one due time) is published in one transaction with its beat_ticks row
and the entry's new due time: commit makes all three visible, rollback none, and a second
beat finds the tick taken (the entry row is locked, then no longer due).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from celery import Celery
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..store import Queries, connect
from ..transactional import publish_in
from ..transport import Transport
from . import metrics
from .schedules import from_json, next_due, to_json

MISSED_POLICIES = ("skip", "once", "catchup")
#: Most ticks one entry publishes in one transaction under the ``catchup`` policy; the
#: rest follow in the next passes.
CATCHUP_BATCH = 100
#: Most due times walked to find the latest missed one (a 1 s entry after ~3 h down).
_WALK_LIMIT = 10_000
#: Seconds a beat_ticks row is kept (setting ``beat_pg_ticks_kept``).
DEFAULT_TICKS_KEPT = 86400.0

logger = logging.getLogger(__name__)


def beat_name() -> str:
    """This process as beat_ticks and ``pg schedule list`` name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Plan:
    """What one pass does with an entry found due."""

    publish: list[datetime]
    skipped: int
    next_due: datetime


def plan(sched: Any, due: datetime, now: datetime, missed: str, late_after: float) -> Plan:
    """The ticks to publish for an entry due at ``due`` when the database clock says ``now``.

    ``once`` publishes the latest due tick, ``catchup`` every due tick (CATCHUP_BATCH at a
    time), ``skip`` the latest one only if it is at most ``late_after`` seconds old.
    """
    dues = [due]
    following = next_due(sched, due)
    while following <= now and len(dues) < _WALK_LIMIT:
        if missed == "catchup" and len(dues) == CATCHUP_BATCH:
            break
        dues.append(following)
        following = next_due(sched, following)
    if missed == "catchup":
        publish = dues
    elif missed == "skip" and now - dues[-1] > timedelta(seconds=late_after):
        publish = []
    else:
        publish = dues[-1:]
    return Plan(publish, len(dues) - len(publish), following)


class Entries:
    """The schedule kept in one schema: list, add, change, enable, disable, remove, run now.

    Changes take effect at the beats' next pass (at most ``beat_max_loop_interval``
    seconds), without restarting them.
    """

    def __init__(self, app: Celery, conn: psycopg.Connection | None = None, *, schema: str | None = None,
                 own: bool = False) -> None:
        """Without ``conn``, connect to the app's broker (migrating its schema if needed);
        ``own``: close ``conn`` on :meth:`close`.  ``conn`` must be in autocommit mode."""
        transport = app.connection_for_write().transport
        if not isinstance(transport, Transport):
            raise TypeError(f"the app's broker is {transport.driver_type!r}, not PostgreSQL")
        self.app = app
        self.schema = schema or transport.options.schema
        self.ticks_kept = float(app.conf.get("beat_pg_ticks_kept") or DEFAULT_TICKS_KEPT)
        self.queries = Queries(self.schema, "beat.sql")
        self._own = own or conn is None
        if conn is None:
            conn = connect(transport.conninfo, jit=False)
            transport._migrate(conn)
        self.conn = conn

    def close(self) -> None:
        if self._own:
            self.conn.close()

    def __enter__(self) -> "Entries":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _now(self) -> datetime:
        return self.conn.execute(self.queries["now"]).fetchone()[0]

    def _row(self, name: str, task: str, schedule: Any, *, args: Any = (), kwargs: Any = None,
             options: Any = None, missed: str = "once", enabled: bool = True, relative: bool = False,
             source: str = "api", now: datetime) -> dict[str, Any]:
        if missed not in MISSED_POLICIES:
            raise ValueError(f"missed must be one of {', '.join(MISSED_POLICIES)}, got {missed!r}")
        data = to_json(schedule, self.app, relative=relative)
        return {"name": name, "task": task, "schedule": Jsonb(data), "args": Jsonb(list(args)),
                "kwargs": Jsonb(dict(kwargs or {})), "options": Jsonb(dict(options or {})),
                "missed": missed, "source": source, "enabled": enabled,
                "next_due": next_due(from_json(data, self.app), now)}

    def add(self, name: str, task: str, schedule: Any, **fields: Any) -> None:
        """Add or replace entry ``name``; ``schedule`` is anything beat_schedule accepts.
        Fields: args, kwargs, options (queue, priority, expires, headers...), missed
        (skip/once/catchup), enabled, relative."""
        with self.conn.transaction():
            self.conn.execute(self.queries["upsert"], self._row(name, task, schedule, now=self._now(), **fields))

    def change(self, name: str, **fields: Any) -> None:
        """Change some of an entry's fields (task, schedule, args, kwargs, options, missed)."""
        with self.conn.transaction():
            current = self.get(name)
            task = fields.pop("task", current["task"])
            schedule = fields.pop("schedule", None) or from_json(current["schedule"], self.app)
            merged = {"args": current["args"], "kwargs": current["kwargs"], "options": current["options"],
                      "missed": current["missed"], "enabled": current["enabled"], **fields}
            self.conn.execute(self.queries["upsert"], self._row(
                name, task, schedule, source=current["source"], now=self._now(), **merged))

    def get(self, name: str) -> dict[str, Any]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(self.queries["get"], {"name": name}).fetchone()
        if row is None:
            raise KeyError(name)
        return row

    def list(self) -> list[dict[str, Any]]:
        """Every entry with its next due time and last run (time, task id, beat)."""
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(self.queries["list"]).fetchall()

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self.conn.transaction():
            sched = from_json(self.get(name)["schedule"], self.app)
            self.conn.execute(self.queries["set_enabled"],
                              {"name": name, "enabled": enabled, "next_due": next_due(sched, self._now())})

    def remove(self, name: str) -> None:
        if self.conn.execute(self.queries["remove"], {"name": name}).rowcount == 0:
            raise KeyError(name)

    def run_now(self, name: str, beat: str | None = None) -> str:
        """Publish entry ``name`` now, once, outside its schedule (its due time is kept);
        returns the task id."""
        with self.conn.transaction():
            with self.conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(self.queries["lock_entry"], {"name": name}).fetchone()
            if row is None:
                raise KeyError(name)
            task_id = self._publish(row, row["now"], beat or f"run-now:{beat_name()}")
            self.conn.execute(self.queries["advance"], {"name": name, "next_due": None, "last_due": None,
                                                        "task_id": task_id, "beat": beat or f"run-now:{beat_name()}",
                                                        "runs": 1})
        return task_id

    def sync_config(self, schedule: dict[str, dict[str, Any]]) -> None:
        """Make the ``config`` entries those of ``schedule`` (a beat_schedule mapping).
        Enabled flags and run history survive; a changed schedule restarts its due time."""
        with self.conn.transaction():
            now = self._now()
            for name, spec in schedule.items():
                self.conn.execute(self.queries["upsert"], self._row(
                    name, spec["task"], spec["schedule"], args=spec.get("args") or (),
                    kwargs=spec.get("kwargs"), options=spec.get("options"),
                    missed=spec.get("missed", "once"), relative=spec.get("relative", False),
                    source="config", now=now))
            self.conn.execute(self.queries["drop_stale_config"], {"names": list(schedule)})

    def publish_due(self, beat: str, late_after: float) -> int:
        """Publish every tick due now that no other beat has taken; returns how many."""
        published = 0
        while (done := self.publish_next_due(beat, late_after)) is not None:
            published += done[0]
        return published

    def publish_next_due(self, beat: str, late_after: float) -> tuple[int, int] | None:
        """Take one due entry and publish its ticks in one transaction: (published, skipped),
        or None when nothing is due.  A tick whose publish fails (an unknown task, arguments
        that do not fit) is logged and skipped, so it cannot hold up the other entries."""
        row = todo = None
        try:
            with self.conn.transaction():
                with self.conn.cursor(row_factory=dict_row) as cur:
                    row = cur.execute(self.queries["claim_due"]).fetchone()
                if row is None:
                    return None
                todo = plan(from_json(row["schedule"], self.app), row["next_due"], row["now"], row["missed"],
                            late_after)
                task_id = None
                for due in todo.publish:
                    task_id = self._publish(row, due, beat)
                if todo.publish:
                    self.conn.execute(self.queries["advance"], {
                        "name": row["name"], "next_due": todo.next_due, "last_due": todo.publish[-1],
                        "task_id": task_id, "beat": beat, "runs": len(todo.publish)})
                    self.conn.execute(self.queries["prune"], {"name": row["name"], "keep": self.ticks_kept})
                else:
                    self._skip(row, todo)
        except psycopg.OperationalError:
            raise
        except Exception:
            if todo is None:
                raise
            logger.exception("beat %s: cannot publish %s (task %s); skipping its due tick(s)",
                             beat, row["name"], row["task"])
            self._skip(row, todo)
            metrics.ticks(0, len(todo.publish) + todo.skipped)
            return 0, len(todo.publish) + todo.skipped
        metrics.ticks(len(todo.publish), todo.skipped)
        return len(todo.publish), todo.skipped

    def _skip(self, row: dict[str, Any], todo: Plan) -> None:
        self.conn.execute(self.queries["skip"], {"name": row["name"], "due": row["next_due"],
                                                 "next_due": todo.next_due})

    def _publish(self, row: dict[str, Any], due: datetime, beat: str) -> str:
        options = dict(row["options"])
        # Like Celery's beat: the header tells a task it was sent by a scheduler.
        options["headers"] = {**options.get("headers", {}), "celery_beat_task": True}
        signature = self.app.signature(row["task"], args=row["args"], kwargs=row["kwargs"])
        task_id = publish_in(self.conn, signature, app=self.app, **options).id
        self.conn.execute(self.queries["record_tick"],
                          {"entry": row["name"], "due": due, "beat": beat, "task_id": task_id})
        return task_id

    def seconds_to_next(self) -> float | None:
        """Seconds until the earliest enabled entry is due, by the database clock."""
        return self.conn.execute(self.queries["next_wakeup"]).fetchone()[0]
