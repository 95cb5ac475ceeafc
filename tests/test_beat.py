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


# --- runtime changes through `pg schedule` ------------------------------------------------

def _cli(app: Celery, *args: str) -> str:
    from celery.bin.base import CLIContext
    from click.testing import CliRunner

    from kombu_pg.cli import pg

    result = CliRunner().invoke(pg, ["schedule", *args], catch_exceptions=False,
                                obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
    assert result.exit_code == 0, result.output
    return result.output


def test_runtime_changes_reach_a_running_beat(pg_conn, pg_url, schema, worker_env, task_log):
    task_log()
    app = _app(url=pg_url, schema=schema)
    count = lambda entry: _count(pg_conn, schema, entry)  # noqa: E731
    with _beat(worker_env, "") as beat:
        beat.wait_for_line("beat: Starting...", 60)
        _cli(app, "add", "dyn", "beat_app.tick", "--every", "1", "--args", '["dyn"]', "--queue", "q1",
             "--priority", "7", "--expires", "300", "--header", "serial_key=k1")
        wait_until(lambda: count("dyn") >= 2, 60, "ticks of the added entry", step=0.2)
        queue, priority, serial_key, expires = pg_conn.execute(sql.SQL(
            "SELECT queue, priority, serial_key, expires_at - created_at FROM {}.messages ORDER BY id LIMIT 1")
            .format(sql.Identifier(schema))).fetchone()
        assert (queue, priority, serial_key) == ("q1", 7, "k1")
        assert timedelta(seconds=290) < expires <= timedelta(seconds=300)

        _cli(app, "disable", "dyn")
        disabled_at = count("dyn")
        # Another entry's ticks show the beat kept running while "dyn" published nothing.
        _cli(app, "add", "marker", "beat_app.tick", "--every", "1", "--args", '["marker"]')
        wait_until(lambda: count("marker") >= 2, 60, "ticks of the marker", step=0.2)
        assert count("dyn") == disabled_at

        task_id = _cli(app, "run", "dyn").strip()
        beat_of = pg_conn.execute(sql.SQL("SELECT beat FROM {}.beat_ticks WHERE task_id = %s")
                                  .format(sql.Identifier(schema)), (task_id,)).fetchone()[0]
        assert beat_of.startswith("run-now:")
        listing = _cli(app, "list")
        assert "dyn" in listing and task_id in listing and "run-now:" in listing

        _cli(app, "enable", "dyn")
        wait_until(lambda: count("dyn") >= disabled_at + 3, 60, "ticks after enable", step=0.2)
        _cli(app, "change", "dyn", "--cron", "0 4 * * *", "--missed", "skip")
        with Entries(app) as entries:
            row = entries.get("dyn")
        assert row["schedule"]["type"] == "crontab" and row["missed"] == "skip"
        assert row["next_due"].astimezone(UTC).hour == 4 and row["options"]["queue"] == "q1"
        _cli(app, "remove", "dyn")
        assert "dyn" not in _cli(app, "list")
        assert "Traceback" not in beat.output()  # no error logged by the beat


def _ticks_metric(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("kombu_pg_beat_ticks_total", {"outcome": outcome}) or 0.0


def test_missed_ticks_policy_after_downtime(pg_conn, pg_url, schema, task_log):
    task_log()
    app = _app(url=pg_url, schema=schema)
    with Entries(app) as entries:
        for policy in ("skip", "once", "catchup"):
            entries.add(policy, "beat_app.tick", 10, missed=policy)
        # As if no beat ran for a minute: each entry was due 67 s ago, its latest due time
        # 7 s ago is later than late_after.
        pg_conn.execute(sql.SQL("UPDATE {}.beat_entries SET next_due = now() - interval '67 s'")
                        .format(sql.Identifier(schema)))
        before = {outcome: _ticks_metric(outcome) for outcome in ("published", "skipped")}
        assert entries.publish_due("test", late_after=5) == 0 + 1 + 7
        # skip: 7 skipped; once: 1 published, 6 skipped; catchup: 7 published.
        assert {o: _ticks_metric(o) - before[o] for o in before} == {"published": 8, "skipped": 13}
        assert {name: count for name, count in pg_conn.execute(sql.SQL(
            "SELECT entry, count(*) FROM {}.beat_ticks GROUP BY entry").format(sql.Identifier(schema)))} == {
            "once": 1, "catchup": 7}
        # Every entry now waits for its next due time: a second pass publishes nothing.
        assert entries.publish_due("test", late_after=5) == 0
        assert all(timedelta(0) < row["next_due"] - row["last_run_at"] <= timedelta(seconds=10)
                   for row in entries.list() if row["last_run_at"])


def test_an_entry_that_cannot_publish_does_not_hold_up_the_others(pg_conn, pg_url, schema, task_log):
    task_log()
    app = _app(url=pg_url, schema=schema)
    with Entries(app) as entries:
        # beat_app.tick takes one argument: Celery refuses this publish before sending.
        @app.task(name="beat_app.tick", shared=False)
        def tick(name):
            pass

        entries.add("broken", "beat_app.tick", 10)
        entries.add("fine", "beat_app.tick", 10, args=["fine"])
        pg_conn.execute(sql.SQL("UPDATE {}.beat_entries SET next_due = now() - interval '1 s' - "
                                "CASE name WHEN 'broken' THEN interval '1 s' ELSE interval '0 s' END")
                        .format(sql.Identifier(schema)))
        assert entries.publish_due("test", late_after=5) == 1
        assert [row[0] for row in _ticks(pg_conn, schema)] == ["fine"]
        assert entries.get("broken")["next_due"] > pg_conn.execute("SELECT now()").fetchone()[0]


# --- celery_dlq's reaper ------------------------------------------------------------------

@pytest.mark.parametrize("setting", [{}, {"dlq_reap_interval": 15}, {"dlq_reap_interval": None}])
def test_dlq_reaping_is_scheduled_without_setup(pg_url, schema, setting):
    import celery_dlq
    from kombu_pg.beat import Scheduler

    app = _app(url=pg_url, schema=schema)
    app.conf.update(setting)
    celery_dlq.install(app)
    app.finalize()
    scheduler = Scheduler(app)
    try:
        rows = {row["name"]: row for row in scheduler.entries.list()}
        entries = scheduler.schedule  # Celery's view: ScheduleEntry objects rebuilt from the rows
    finally:
        scheduler.close()
    interval = setting.get("dlq_reap_interval", 60)
    if interval is None:
        assert celery_dlq.REAP_TASK not in rows
    else:
        row = rows[celery_dlq.REAP_TASK]
        assert row["task"] == celery_dlq.REAP_TASK and row["schedule"]["seconds"] == interval
        assert row["options"]["expires"] == interval
        assert entries[celery_dlq.REAP_TASK].schedule.run_every == timedelta(seconds=interval)


def test_old_tick_records_are_pruned(pg_conn, pg_url, schema, task_log):
    task_log()
    app = _app(url=pg_url, schema=schema)
    app.conf.beat_pg_ticks_kept = 3600
    with Entries(app) as entries:
        entries.add("e", "beat_app.tick", 10, args=["e"])
        pg_conn.execute(sql.SQL(
            "INSERT INTO {0}.beat_ticks (entry, due, beat, task_id) VALUES "
            "('e', now() - interval '2 h', 'old', 'a'), ('e', now() - interval '30 min', 'recent', 'b');"
            "UPDATE {0}.beat_entries SET next_due = now() - interval '1 s'").format(sql.Identifier(schema)))
        assert entries.publish_due("test", late_after=5) == 1
    assert [row[2] for row in _ticks(pg_conn, schema)] == ["recent", "test"]
