"""Turning a Celery failure into a DLQ entry: classification and the message to keep."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from typing import Any

from celery.exceptions import MaxRetriesExceededError, Reject
from kombu.serialization import dumps as kombu_dumps

from kombu_pg.bulk import TEMPLATE_SAFE
from kombu_pg.store.broker import JOB_KEY_HEADER

from .config import Settings
from .store import Entry


class NonRetryable(Exception):
    """Base class for errors that retrying cannot fix: never retried, dead-lettered at once.

    Raise a subclass (or list your own classes in ``dlq_non_retryable_exceptions``); the
    decision is made on the exception *type*, never on its message.
    """


#: The kombu-pg message header naming a serial key (kombu_pg.transport.SERIAL_KEY_HEADER).
SERIAL_KEY_HEADER = "serial_key"
#: The time a message was first published, set by ``install()``'s ``before_task_publish``
#: handler; Celery's retries and celery_dlq's requeues carry the headers, so it stays.
PUBLISHED_HEADER = "dlq_published_at"

# Protocol 2 header names (celery.app.amqp.as_task_v2); everything else is custom.
CELERY_HEADERS = (
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "replaced_task_nesting", "stamped_headers", "stamps",
)


def is_non_retryable(exc: BaseException, settings: Settings) -> bool:
    return isinstance(exc, NonRetryable) or (bool(settings.non_retryable) and isinstance(exc, settings.non_retryable))


def classify(task, exc: BaseException, retries: int, settings: Settings) -> str | None:
    """The DLQ reason for a final failure reported by ``task_failure``, or None to skip.

    ``task_failure`` only fires once Celery will not run the task again (a retry raises
    ``Retry`` instead), so this labels the failure rather than deciding its fate.
    """
    if isinstance(exc, Reject):
        return "rejected" if not exc.requeue else None
    if isinstance(exc, MaxRetriesExceededError):
        return "retries_exhausted"
    if is_non_retryable(exc, settings):
        return "non_retryable"
    limit = retry_limit(task)
    autoretry = tuple(getattr(task, "autoretry_for", ()) or ())
    if limit is not None and retries >= limit and (retries > 0 or (autoretry and isinstance(exc, autoretry))):
        return "retries_exhausted"
    return "non_retryable" if settings.capture_unclassified else None


def retry_limit(task) -> int | None:
    """The retry limit in force for the current run (autoretry's override included)."""
    return getattr(task, "override_max_retries", getattr(task, "max_retries", None))


def stamp_published(headers: dict | None = None, **kwargs) -> None:
    """``before_task_publish``: remember when the message was first published."""
    if isinstance(headers, dict):
        headers.setdefault(PUBLISHED_HEADER, datetime.now(timezone.utc).isoformat())


# One publish time for a whole send_many batch is right (its messages commit together), so
# kombu-pg's bulk templates stay on with celery_dlq installed.
setattr(stamp_published, TEMPLATE_SAFE, True)


def published_at(headers: dict) -> datetime | None:
    value = headers.get(PUBLISHED_HEADER)
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def exception_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"


def exception_text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # pragma: no cover - a broken __str__
        return repr(exc)


def message_from_kombu(message) -> dict:
    """The Kombu message the worker received, as the virtual transports store it."""
    body = message.body
    if isinstance(body, str):
        body = body.encode(message.content_encoding or "utf-8")
    properties = dict(message.properties or {})
    delivery_info = dict(message.delivery_info or properties.get("delivery_info") or {})
    properties["delivery_info"] = {
        "exchange": delivery_info.get("exchange"), "routing_key": delivery_info.get("routing_key"),
    }
    properties["body_encoding"] = "base64"
    return {
        "body": base64.b64encode(body or b"").decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": dict(message.headers or {}),
        "properties": properties,
    }


def message_from_context(task, request, args, kwargs) -> dict:
    """Rebuild the protocol 2 message from the task's request context (pool child path)."""
    values = vars(request)
    headers = {key: values.get(key) for key in CELERY_HEADERS if key in values}
    headers.setdefault("task", task.name)
    headers.setdefault("lang", "py")
    headers["id"] = request.id
    headers["retries"] = request.retries or 0
    headers.update(request.headers or {})
    embed = {"callbacks": request.callbacks, "errbacks": request.errbacks,
             "chain": request.chain, "chord": request.chord}
    args = list(request.args if args is None else args)
    kwargs = dict(request.kwargs if kwargs is None else kwargs)
    content_type, content_encoding, data = kombu_dumps((args, kwargs, embed), serializer=task.serializer)
    if isinstance(data, str):
        data = data.encode(content_encoding or "utf-8")
    properties = dict(request.properties or {})
    delivery_info = request.delivery_info or {}
    properties["delivery_info"] = {
        "exchange": delivery_info.get("exchange"), "routing_key": delivery_info.get("routing_key"),
    }
    properties["body_encoding"] = "base64"
    if delivery_info.get("priority") is not None:
        properties.setdefault("priority", delivery_info.get("priority"))
    return {
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": properties,
    }


def entry_from_message(doc: dict, *, reason: str, source: str, exc: BaseException | None,
                       traceback: str | None, worker: str | None, serial_key: str | None = None,
                       retries: int | None = None, max_retries: int | None = None) -> Entry:
    headers = doc.get("headers") or {}
    props = doc.get("properties") or {}
    info = props.get("delivery_info") or {}
    return Entry(
        message=json.dumps(doc, default=str),
        reason=reason,
        source=source,
        task_id=headers.get("id"),
        task_name=headers.get("shadow") or headers.get("task"),
        queue=info.get("routing_key"),
        exchange=info.get("exchange"),
        routing_key=info.get("routing_key"),
        priority=_int(props.get("priority")),
        serial_key=serial_key or _text(headers.get(SERIAL_KEY_HEADER)),
        exception_type=exception_type(exc) if exc is not None else None,
        exception_message=exception_text(exc) if exc is not None else None,
        traceback=traceback,
        retries=retries if retries is not None else _int(headers.get("retries")),
        worker=worker,
        max_retries=max_retries,
        published_at=published_at(headers),
        job_key=_text(headers.get(JOB_KEY_HEADER)),
    )


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
