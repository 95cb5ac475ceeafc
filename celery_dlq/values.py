"""Parsers for the values a person types (CLI options, HTTP query strings and bodies).

One parser per kind of value, shared by ``cli`` and ``http``, so both refuse the same
input with the same message, before anything reaches the database.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from .store import UsageError

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
TIME_HELP = "an ISO 8601 time or an age like 30m, 2h, 7d"


def parse_time(name: str, value: object) -> datetime:
    """An ISO 8601 time (naive means UTC) or an age such as 30m, 2h, 7d (that long ago)."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{name} must be {TIME_HELP}")
    value = value.strip()
    match = _AGE.match(value)
    if match:
        try:
            return datetime.now(timezone.utc) - timedelta(**{_UNITS[match[2]]: float(match[1])})
        except (OverflowError, ValueError):  # beyond year 1, or float('1e999') == inf
            raise UsageError(f"{name}: age {value!r} reaches before year 1") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{name}: {value!r} is neither an ISO 8601 time nor an age like 30m, 2h, 7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def check_text(name: str, value: str) -> str:
    """``value`` if PostgreSQL can store and compare it: no NUL, valid UTF-8 throughout."""
    if "\x00" in value:
        raise UsageError(f"{name} cannot contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from JSON "\ud800"
        raise UsageError(f"{name} is not valid Unicode text") from None
    return value
