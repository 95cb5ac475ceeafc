"""Checking what a client sends: query string, JSON body and each field, before any query.

Time values go through :func:`celery_dlq.values.parse_time`, the parser the CLI uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from ..store import REASONS, STATUSES
from ..values import check_text, parse_time
from .messages import HTTPError, Request, bad

FILTERS = ("task", "queue", "job_key", "reason", "exception", "status", "since", "until")
MAX_BODY = 1 << 20
MAX_IDS = 10_000
MAX_ID = 2**63 - 1


def filter_value(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise bad(f"{name} must be a string")
    if not value.strip():
        raise bad(f"{name} is empty")
    check_text(name, value)
    if name == "reason" and value not in REASONS:
        raise bad(f"unknown reason {value!r}; use one of {', '.join(REASONS)}")
    if name == "status" and value not in STATUSES:
        raise bad(f"unknown status {value!r}; use one of {', '.join(STATUSES)}")
    if name in ("since", "until"):
        return parse_time(name, value)
    return value


def filters(source: dict) -> dict:
    return {k: filter_value(k, source[k]) for k in FILTERS if k in source}


def integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"\d{1,19}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(f"{name} must be an integer from {lo} to {hi}")
    return value


def ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise bad("ids must be a non-empty list of entry ids")
    if len(value) > MAX_IDS:
        raise bad(f"at most {MAX_IDS} ids per request")
    found = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_ID:
            raise bad("ids must be positive integers")
        found.append(v)
    return list(dict.fromkeys(found))


def check_fields(doc: dict, allowed: Iterable[str]) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def no_query(query: dict) -> None:
    if query:
        raise bad(f"unknown query parameter(s) {', '.join(sorted(query))}")


def flag(doc: dict, name: str) -> bool:
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false")
    return value


#: Requeue body fields that keep a stored value the requeue would otherwise reset.
REQUEUE_KEEPS = ("keep_retries", "keep_expires")


def requeue_keeps(doc: dict) -> dict[str, bool]:
    return {name: flag(doc, name) for name in REQUEUE_KEEPS}


def note(doc: dict) -> str | None:
    text = doc.get("note")
    if text is not None and (not isinstance(text, str) or len(text) > 10_000):
        raise bad("note must be a string of at most 10000 characters")
    return check_text("note", text) if text else None


def query(request: Request) -> dict[str, str]:
    """The query parameters, each given at most once."""
    raw = request.query
    try:
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=100)
    except ValueError as exc:
        raise bad(f"malformed query string: {exc}") from None
    repeated = sorted(k for k, v in parsed.items() if len(v) > 1)
    if repeated:
        raise bad(f"query parameter(s) given more than once: {', '.join(repeated)}")
    return {k: v[0] for k, v in parsed.items()}


def body(request: Request) -> dict:
    """The JSON object in the body (``{}`` for none); a GET's body is never read."""
    length = request.length
    if length is None:
        raise bad("bad Content-Length")
    if length > MAX_BODY:
        raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
    if request.method == "GET":
        return {}
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # Every POST must say JSON, even an empty one: a cross-site form cannot, so no CSRF.
    if (request.method == "POST" or length > 0) and ctype != "application/json":
        raise HTTPError(415, "send the request as application/json")
    if length <= 0:
        return {}
    try:
        doc = json.loads(request.read())
    except ValueError as exc:
        raise bad(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the interpreter's recursion limit
        raise bad("request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise bad("request body must be a JSON object")
    return doc
