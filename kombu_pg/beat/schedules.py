"""Celery schedules as JSON (their parameters, never a pickle) and their due times.

Due times are computed from a given instant (the database's ``now()``), never from this
host's clock, so beats on hosts with skewed clocks agree.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.schedules import BaseSchedule, crontab, maybe_schedule, schedule, solar

_CRON_FIELDS = ("minute", "hour", "day_of_week", "day_of_month", "month_of_year")


def to_json(value: Any, app: Celery, *, relative: bool = False) -> dict[str, Any]:
    """The JSON form of a beat_schedule ``schedule`` (seconds, timedelta, schedule,
    crontab or solar)."""
    value = maybe_schedule(value, relative, app=app)
    if isinstance(value, crontab):
        return {"type": "crontab", **{f: _cron_spec(getattr(value, f"_orig_{f}")) for f in _CRON_FIELDS}}
    if isinstance(value, solar):
        return {"type": "solar", "event": value.event, "lat": value.lat, "lon": value.lon}
    if type(value) is schedule:
        return {"type": "interval", "seconds": value.run_every.total_seconds(), "relative": value.relative}
    raise TypeError(f"cannot store a {type(value).__name__} schedule: use seconds, timedelta, "
                    "schedule, crontab or solar")


def _cron_spec(spec: Any) -> Any:
    # crontab keeps what it was given: a string, a number or a set of numbers.
    if isinstance(spec, (str, int)):
        return spec
    return sorted(spec)


def from_json(data: dict[str, Any], app: Celery) -> BaseSchedule:
    """The schedule ``data`` describes; raises ValueError for anything else."""
    kind = data.get("type")
    if kind == "interval":
        return schedule(timedelta(seconds=float(data["seconds"])), bool(data.get("relative")), app=app)
    if kind == "crontab":
        return crontab(**{f: data[f] for f in _CRON_FIELDS}, app=app)
    if kind == "solar":
        return solar(str(data["event"]), float(data["lat"]), float(data["lon"]), app=app)
    raise ValueError(f"unknown schedule type {kind!r}")


def next_due(sched: BaseSchedule, after: datetime) -> datetime:
    """The first due time of ``sched`` strictly after ``after`` (an aware datetime)."""
    sched.nowfun = lambda: after
    due = after + sched.remaining_estimate(after)
    if due <= after:
        raise ValueError(f"{sched!r} has no due time after {after.isoformat()}")
    return due


def describe(data: dict[str, Any]) -> str:
    """A short human form for listings: ``every 5s``, ``cron */5 * * * *``, ``solar sunset``."""
    kind = data.get("type")
    if kind == "interval":
        return f"every {data['seconds']:g}s" + (" (relative)" if data.get("relative") else "")
    if kind == "crontab":
        return "cron " + " ".join(_cron_text(data[f]) for f in ("minute", "hour", "day_of_month",
                                                                "month_of_year", "day_of_week"))
    return f"solar {data.get('event')} {data.get('lat')},{data.get('lon')}"


def _cron_text(spec: Any) -> str:
    return ",".join(map(str, spec)) if isinstance(spec, list) else str(spec)
