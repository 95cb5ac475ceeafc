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


# --- real beats --------------------------------------------------------------------------

def _beat(env: dict, entries: str) -> CeleryWorker:
    """``celery beat`` (CeleryWorker runs any celery command; its readiness is waited on
    with the "beat: Starting..." line)."""
    def as_beat(cmd: list[str]) -> list[str]:
        return [*cmd[:cmd.index("worker")], "beat", "-l", "info", "--pidfile="]
    return CeleryWorker("beat_app", {**env, "BEAT_ENTRIES": entries}, wrap=as_beat)


def _ticks(conn, schema: str) -> list[tuple]:
    return conn.execute(sql.SQL("SELECT entry, due, beat, task_id, published_at FROM {}.beat_ticks "
                                "ORDER BY entry, due").format(sql.Identifier(schema))).fetchall()


def _count(conn, schema: str, entry: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}.beat_ticks WHERE entry = %s")
                        .format(sql.Identifier(schema)), (entry,)).fetchone()[0]


def _check_each_tick_published_once(pg_conn, schema: str, task_log, steps: dict[str, timedelta]) -> list[tuple]:
    """Every tick's task ran exactly once, and the due times follow the schedule without
    a gap or a repeat."""
    ticks = _ticks(pg_conn, schema)
    wait_until(lambda: len(task_log("tick")) >= len(ticks), 60, "the worker to run every published tick")
    runs = sorted(row[1] for row in task_log("tick"))
    assert runs == sorted(entry for entry, *_ in ticks), "a tick published twice or lost"
    assert len({task_id for *_, task_id, _ in ticks}) == len(ticks)
    for entry, step in steps.items():
        dues = [due for name, due, *_ in ticks if name == entry]
        assert [b - a for a, b in zip(dues, dues[1:])] == [step] * (len(dues) - 1), entry
    return ticks


ENTRY_STEPS = {"every-1s": timedelta(seconds=1), "every-5s": timedelta(seconds=5),
               "cron-minute": timedelta(minutes=1)}


def _race(pg_conn, schema, worker_env, task_log, seconds: int) -> None:
    task_log()
    minimum = {"every-1s": seconds // 2, "every-5s": seconds // 10, "cron-minute": seconds // 60}
    entries = ",".join(ENTRY_STEPS)
    beats = [_beat(worker_env, entries) for _ in range(3)]
    try:
        with CeleryWorker("beat_app", worker_env).wait_ready() as worker:
            for beat in beats:
                beat.wait_for_line("beat: Starting...", 60)
            for entry, count in minimum.items():
                wait_until(lambda: _count(pg_conn, schema, entry) >= count, seconds * 3,
                           f"{count} ticks of {entry}", step=0.5)
            for beat in beats:
                beat.stop()
            try:
                ticks = _check_each_tick_published_once(pg_conn, schema, task_log, ENTRY_STEPS)
            except AssertionError:
                print(worker.output(), beats[0].output())
                raise
    finally:
        for beat in beats:
            beat.stop()
    assert all(beat.proc.returncode is not None for beat in beats)
    print("ticks per beat:", {b: sum(t[2] == b for t in ticks) for b in {t[2] for t in ticks}})


def test_three_beats_publish_each_tick_once(pg_conn, schema, worker_env, task_log):
    _race(pg_conn, schema, worker_env, task_log, 30)


@pytest.mark.slow
def test_three_beats_publish_each_tick_once_for_two_minutes(pg_conn, schema, worker_env, task_log):
    _race(pg_conn, schema, worker_env, task_log, 130)


def test_killed_beat_is_replaced_within_two_intervals(pg_conn, schema, worker_env, task_log):
    task_log()
    beats = [_beat(worker_env, "every-1s") for _ in range(2)]
    try:
        for beat in beats:
            beat.wait_for_line("beat: Starting...", 60)
        wait_until(lambda: _count(pg_conn, schema, "every-1s") >= 3, 60, "ticks", step=0.2)
        last = lambda: _ticks(pg_conn, schema)[-1]  # noqa: E731
        publisher = last()[2]
        victim = next(b for b in beats if publisher.endswith(f":{b.proc.pid}"))
        victim.kill(signal.SIGKILL)
        victim.proc.wait(10)
        killed_at = pg_conn.execute("SELECT now()").fetchone()[0]
        survivor = wait_until(lambda: (t := last())[2] != publisher and t, 30, "another beat to publish",
                              step=0.1)
        assert survivor[4] - killed_at <= timedelta(seconds=2), (survivor, killed_at)
        ticks = [t for t in _ticks(pg_conn, schema)]
        dues = [t[1] for t in ticks]
        assert [b - a for a, b in zip(dues, dues[1:])] == [timedelta(seconds=1)] * (len(dues) - 1)
    finally:
        for beat in beats:
            beat.stop()
