"""The request and response that the WSGI and ASGI adapters translate to and from.

Both adapters build a :class:`Request` from their native input and send back the
:class:`Response` that :meth:`DLQAdmin.handle <celery_dlq.http.DLQAdmin.handle>` returns, so
the admin's behaviour lives in one place and neither protocol is emulated through the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Request:
    """One buffered-or-readable HTTP request, as the handler sees it."""

    method: str
    #: The path below the mount point (``/`` at least).
    path: str
    #: The raw query string, undecoded.
    query: str = ""
    #: Header names in lower case; a repeated header's values joined by ``,``.  The body
    #: size is :attr:`length`, never a ``content-length`` entry here.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Where the admin is mounted (``SCRIPT_NAME`` in WSGI, ``root_path`` in ASGI).
    root: str = ""
    #: The body size in bytes; None when the client sent a malformed ``Content-Length``.
    length: int | None = 0
    #: Returns the body (``length`` bytes).  Called only once the handler has decided to
    #: parse it, so a 401 or a 413 never waits for a body that is not coming.
    read: Callable[[], bytes] = field(default=lambda: b"", compare=False, repr=False)

    @classmethod
    def of(cls, method: str, path: str, *, query: str = "", headers: Mapping[str, str] | None = None,
           body: bytes = b"", root: str = "") -> Request:
        """A request whose whole body is already in memory."""
        return cls(method.upper(), path or "/", query, dict(headers or {}), root, len(body), lambda: body)


class Response(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def head(self) -> list[tuple[str, str]]:
        """The headers to send, ``Content-Length`` included (every body is buffered)."""
        return self.headers + [("Content-Length", str(len(self.body)))]


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = (),
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)
        #: More fields for the error body (a refused requeue's ``result``).
        self.extra = extra or {}


def bad(message: str) -> HTTPError:
    return HTTPError(400, message)


_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 500: "internal"}

COMMON_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                  ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY")]


def _default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def dumps(data: Any) -> str:
    """JSON that is also safe inside HTML: ``<``, ``>`` and ``&`` only ever appear escaped."""
    text = json.dumps(data, default=_default, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def json_response(status: int, data: Any) -> Response:
    return Response(status, [("Content-Type", "application/json; charset=utf-8")] + COMMON_HEADERS,
                    dumps(data).encode())


def error_response(exc: HTTPError) -> Response:
    """Every error has one shape: ``{"error": code, "message": text, "status": n}``."""
    status, headers, body = json_response(exc.status, {
        **exc.extra, "error": _CODES.get(exc.status, "error"), "message": exc.message, "status": exc.status})
    return Response(status, headers + exc.headers, body)
