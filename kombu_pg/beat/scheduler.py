"""``celery beat -S kombu_pg.beat:Scheduler``: the schedule lives in PostgreSQL.

Any number of beats may run: each pass takes due entries with ``FOR UPDATE SKIP LOCKED``
and publishes a tick in the transaction that records it, so each tick is published once,
and when a beat dies the others keep publishing (there is no leader to fail over).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import beat
from celery.schedules import crontab

from .entries import Entries, beat_name
from .schedules import from_json

logger = logging.getLogger(__name__)

#: Seconds after its due time a tick counts as missed for the ``skip`` policy
#: (setting ``beat_pg_late_after``).
DEFAULT_LATE_AFTER = 30.0


class Scheduler(beat.Scheduler):
    """A Celery beat scheduler whose entries are rows of ``<schema>.beat_entries``.

    At start the entries of ``beat_schedule`` are synced in; every tick then reads the
    database, so entries added, changed, disabled or run through ``pg schedule`` (or
    :class:`kombu_pg.beat.Entries`) take effect without a restart.
    """

    #: Beat wakes at least this often to see runtime changes (``beat_max_loop_interval``).
    max_interval = 5

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        self._entries: Entries | None = None
        self.beat = beat_name()
        self.late_after = float(app.conf.get("beat_pg_late_after") or DEFAULT_LATE_AFTER)
        super().__init__(app, *args, **kwargs)

    @property
    def entries(self) -> Entries:
        if self._entries is None:
            self._entries = Entries(self.app)
        return self._entries

    def setup_schedule(self) -> None:
        config = dict(self.app.conf.beat_schedule or {})
        # Celery's own schedulers add this default entry too (install_default_entries).
        if self.app.conf.result_expires and not self.app.backend.supports_autoexpire:
            config.setdefault("celery.backend_cleanup", {
                "task": "celery.backend_cleanup", "schedule": crontab("0", "4", "*"),
                "options": {"expires": 12 * 3600}})
        self.entries.sync_config(config)
        logger.info("beat %s: %d configured entr%s synced to the database", self.beat, len(config),
                    "y" if len(config) == 1 else "ies")

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Publish what is due; return the seconds until the next entry is due."""
        try:
            published = self.entries.publish_due(self.beat, self.late_after)
            if published:
                logger.info("beat %s: published %d tick(s)", self.beat, published)
            wait = self.entries.seconds_to_next()
        except Exception:
            logger.exception("beat %s: database pass failed; retrying", self.beat)
            self._reconnect()
            return self.max_interval
        return self.max_interval if wait is None else min(wait, self.max_interval)

    def _reconnect(self) -> None:
        if self._entries is not None:
            try:
                self._entries.close()
            finally:
                self._entries = None

    def get_schedule(self) -> dict[str, beat.ScheduleEntry]:
        return {row["name"]: self.Entry(
            name=row["name"], task=row["task"], schedule=from_json(row["schedule"], self.app),
            args=row["args"], kwargs=row["kwargs"], options=row["options"], app=self.app,
            last_run_at=row["last_run_at"], total_run_count=row["run_count"])
            for row in self.entries.list()}

    def set_schedule(self, schedule: dict) -> None:
        self.data = schedule

    schedule = property(get_schedule, set_schedule)

    def sync(self) -> None:
        """Nothing to write: every tick is committed when it is published."""

    def close(self) -> None:
        self._reconnect()

    @property
    def info(self) -> str:
        return f"    . db -> {self.entries.schema}.beat_entries (beat {self.beat})"

