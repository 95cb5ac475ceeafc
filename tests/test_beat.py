"""Periodic tasks in PostgreSQL (kombu_pg.beat): schedules as JSON, due times, the
missed-ticks policies, the runtime API, and real ``celery beat`` processes racing."""

from __future__ import annotations

import os
import signal
import sys
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from celery import Celery
from celery.schedules import crontab, schedule, solar
from psycopg import sql

from kombu_pg.beat import Entries
from kombu_pg.beat.entries import CATCHUP_BATCH, plan
from kombu_pg.beat.schedules import from_json, next_due, to_json
from tests.worker import CeleryWorker, wait_until

UTC = timezone.utc


def _app(tz: str = "UTC", url: str = "postgresql://localhost/x", schema: str = "kombu_pg") -> Celery:
    app = Celery("t", broker=url, set_as_current=False)
    app.conf.timezone = tz
    app.conf.broker_transport_options = {"schema": schema}
    return app


def _dues(sched, start: datetime, count: int) -> list[datetime]:
    out = [next_due(sched, start)]
    while len(out) < count:
        out.append(next_due(sched, out[-1]))
    return out


# --- schedules as JSON -------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    5, timedelta(minutes=2), schedule(timedelta(seconds=30), relative=True),
    crontab(minute="*/15", hour="8-18", day_of_week="mon-fri"), crontab(minute={0, 30}),
])
def test_schedule_json_round_trip_keeps_due_times(value):
    app = _app("Europe/Berlin")
    data = to_json(value, app)
    restored = from_json(data, app)
    assert to_json(restored, app) == data
    start = datetime(2026, 5, 4, 9, 7, 13, tzinfo=UTC)
    original = value if not isinstance(value, (int, timedelta)) else schedule(value, app=app)
    original.app = app
    assert _dues(restored, start, 5) == _dues(original, start, 5)


def test_solar_round_trip():
    pytest.importorskip("ephem")
    app = _app()
    data = to_json(solar("sunset", 52.52, 13.40, app=app), app)
    assert data == {"type": "solar", "event": "sunset", "lat": 52.52, "lon": 13.40}
    dues = _dues(from_json(data, app), datetime(2026, 6, 21, 0, 0, tzinfo=UTC), 2)
    # Berlin's midsummer sunset is about 19:33 UTC, a day apart.
    assert dues[0].astimezone(UTC).hour == 19 and timedelta(hours=23, minutes=50) < dues[1] - dues[0] < timedelta(hours=24, minutes=10)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError):
        from_json({"type": "pickle", "data": "..."}, _app())


# --- due times across DST (no waiting: due times are computed from given instants) --------

def test_daily_crontab_across_spring_forward():
    app = _app("Europe/Berlin")
    # 02:30 does not exist on 2026-03-29 in Berlin: that day it runs at 03:30 CEST, once.
    dues = _dues(from_json(to_json(crontab(minute=30, hour=2), app), app), datetime(2026, 3, 27, 12, tzinfo=UTC), 3)
    assert dues == [datetime(2026, 3, 28, 1, 30, tzinfo=UTC), datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
                    datetime(2026, 3, 30, 0, 30, tzinfo=UTC)]


def test_daily_crontab_across_fall_back_runs_once():
    app = _app("Europe/Berlin")
    # 02:30 happens twice on 2026-10-25 in Berlin; the entry runs once that day.
    dues = _dues(from_json(to_json(crontab(minute=30, hour=2), app), app), datetime(2026, 10, 23, 12, tzinfo=UTC), 3)
    local = [d.astimezone(app.timezone) for d in dues]
    assert [d.date().day for d in local] == [24, 25, 26]
    assert all((d.hour, d.minute) == (2, 30) for d in local)
    # It runs at the first 02:30 (CEST, 00:30 UTC), not again an hour later.
    assert dues[1] == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert dues[2] - dues[1] == timedelta(hours=25)  # the day with 25 hours


def test_interval_ignores_dst():
    app = _app("America/New_York")
    start = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)  # 01:30 EST, half an hour before the change
    dues = _dues(from_json(to_json(timedelta(minutes=20), app), app), start, 4)
    assert [d - start for d in dues] == [timedelta(minutes=20 * i) for i in range(1, 5)]


# --- missed ticks ------------------------------------------------------------------------

def _late(policy: str, missed_ticks: int, late_after: float = 30):
    sched = schedule(timedelta(seconds=10), app=_app())
    due = datetime(2026, 1, 1, tzinfo=UTC)
    now = due + timedelta(seconds=10 * missed_ticks + 3)
    return due, plan(sched, due, now, policy, late_after)


def test_on_time_tick_is_published_under_every_policy():
    for policy in ("skip", "once", "catchup"):
        due, todo = _late(policy, 0)
        assert (todo.publish, todo.skipped, todo.next_due) == ([due], 0, due + timedelta(seconds=10))


def test_missed_ticks_once_publishes_the_latest():
    due, todo = _late("once", 6)
    assert todo.publish == [due + timedelta(seconds=60)] and todo.skipped == 6
    assert todo.next_due == due + timedelta(seconds=70)


def test_missed_ticks_catchup_publishes_each_in_batches():
    due, todo = _late("catchup", 6)
    assert todo.publish == [due + timedelta(seconds=10 * i) for i in range(7)] and todo.skipped == 0
    due, todo = _late("catchup", CATCHUP_BATCH + 5)
    assert len(todo.publish) == CATCHUP_BATCH and todo.next_due == due + timedelta(seconds=10 * CATCHUP_BATCH)


def test_missed_ticks_skip():
    due, todo = _late("skip", 6, late_after=30)  # the latest is 3 s old: still on time
    assert todo.publish == [due + timedelta(seconds=60)] and todo.skipped == 6
    due, todo = _late("skip", 6, late_after=1)
    assert todo.publish == [] and todo.skipped == 7 and todo.next_due == due + timedelta(seconds=70)
