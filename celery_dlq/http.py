"""DLQ admin over HTTP: a JSON API and a small HTML page, as a plain WSGI application.

    from celery_dlq.http import DLQAdmin
    admin = DLQAdmin(celery_app, token="s3cret")   # a WSGI callable
    admin.asgi                                     # the same app as an ASGI callable

Standard library only (``wsgiref`` for ``celery -A proj dlq serve``).  Every input is
checked: an unknown query parameter or JSON field is a 400, a bulk action needs explicit
ids or at least one filter, an unknown id is a 404.  With a token, every request without
``Authorization: Bearer <token>`` is a 401.  Errors are always
``{"error": code, "message": text, "status": n}``.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import io
import json
import logging
import re
import secrets
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable
from datetime import date, datetime
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from kombu_pg.config import ConfigurationError

from .api import DLQ
from .store import MAX_PAGE, REASONS, REFUSED_STATUS, STATUSES, DLQError, NotFound, UsageError
from .values import check_text, parse_time

logger = logging.getLogger("celery_dlq.http")

FILTERS = ("task", "queue", "reason", "exception", "status", "since", "until")
DEFAULT_PAGE = 50
MAX_BODY = 1 << 20
MAX_IDS = 10_000
_MAX_ID = 2**63 - 1
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            415: "Unsupported Media Type", 500: "Internal Server Error"}
_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 500: "internal"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = (),
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)
        #: More fields for the error body (a refused requeue's ``result``).
        self.extra = extra or {}


def _bad(message: str) -> HTTPError:
    return HTTPError(400, message)


# -- input checking -----------------------------------------------------------------------------


def _filter_value(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    if not value.strip():
        raise _bad(f"{name} is empty")
    check_text(name, value)
    if name == "reason" and value not in REASONS:
        raise _bad(f"unknown reason {value!r}; use one of {', '.join(REASONS)}")
    if name == "status" and value not in STATUSES:
        raise _bad(f"unknown status {value!r}; use one of {', '.join(STATUSES)}")
    if name in ("since", "until"):
        return parse_time(name, value)
    return value


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"\d{1,19}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"{name} must be an integer from {lo} to {hi}")
    return value


def _ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise _bad("ids must be a non-empty list of entry ids")
    if len(value) > MAX_IDS:
        raise _bad(f"at most {MAX_IDS} ids per request")
    ids = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_ID:
            raise _bad("ids must be positive integers")
        ids.append(v)
    return list(dict.fromkeys(ids))


def _check_fields(doc: dict, allowed: Iterable[str]) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _flag(doc: dict, name: str) -> bool:
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false")
    return value


def _note(doc: dict) -> str | None:
    note = doc.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > 10_000):
        raise _bad("note must be a string of at most 10000 characters")
    return check_text("note", note) if note else None


# -- output -------------------------------------------------------------------------------------


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


_COMMON_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                   ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY")]


class DLQAdmin:
    """The WSGI application: ``GET /`` the page, ``/api/...`` the JSON API.

    ``app`` is the Celery app (a :class:`celery_dlq.DLQ` is built for it) or pass ``dlq=``.
    Calls into the DLQ are serialized (one database connection), so it is safe under a
    threaded server.  Mount it anywhere: links and fetches follow ``SCRIPT_NAME``.
    """

    def __init__(self, app=None, *, dlq: DLQ | None = None, token: str | None = None,
                 max_page: int = MAX_PAGE, allowed_hosts: Iterable[str] | None = None) -> None:
        if dlq is None:
            if app is None:
                raise TypeError("DLQAdmin needs a Celery app or dlq=DLQ(app)")
            dlq = DLQ(app)
        self.dlq = dlq
        self.token = token or None
        self.max_page = max_page
        #: Host header names accepted (any when None): on a loopback address this stops a
        #: DNS-rebinding page from reaching an admin that has no token.
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts is not None else None
        self._lock = threading.Lock()
        self.asgi = ASGIAdapter(self)
        self._routes: list[tuple[re.Pattern, dict[str, Callable]]] = [
            (re.compile(r"/"), {"GET": self.page}),
            (re.compile(r"/api/entries"), {"GET": self.list_entries}),
            (re.compile(r"/api/entries/(\d{1,19})"), {"GET": self.show, "DELETE": self.delete_one}),
            (re.compile(r"/api/entries/(\d{1,19})/requeue"), {"POST": self.requeue_one}),
            (re.compile(r"/api/requeue"), {"POST": self.requeue_many}),
            (re.compile(r"/api/delete"), {"POST": self.delete_many}),
            (re.compile(r"/api/stats"), {"GET": self.stats}),
        ]

    # -- WSGI -------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        try:
            status, headers, body = self.handle(environ)
        except Exception:  # never let a bug become a half-written response
            logger.exception("celery_dlq.http: unhandled error")
            status, headers, body = self._error(HTTPError(500, "internal error (see the server log)"))
        start_response(f"{status} {_REASONS.get(status, '')}".strip(),
                       headers + [("Content-Length", str(len(body)))])
        return [body]

    def handle(self, environ) -> tuple[int, list[tuple[str, str]], bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            self._check_host(environ)
            handler, args = self._route(method, path)
            authorized = self._authorized(environ)
            if handler == self.page:
                if environ.get("QUERY_STRING"):
                    raise _bad("the page takes no query parameters")
                return self.page(environ, authorized)
            if not authorized:
                raise HTTPError(401, "missing or wrong bearer token",
                                [("WWW-Authenticate", 'Bearer realm="celery_dlq"')])
            query = self._query(environ)
            body = self._body(environ, method)
            return self._json(*handler(query, body, *args))
        except HTTPError as exc:
            return self._error(exc)
        except NotFound as exc:
            return self._error(HTTPError(404, str(exc)))
        except UsageError as exc:
            return self._error(HTTPError(400, str(exc)))
        except (DLQError, ConfigurationError) as exc:
            return self._error(HTTPError(500, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # database down, permissions...
            logger.exception("celery_dlq.http: %s %s failed", method, path)
            self.dlq.runtime.reset_connection()
            return self._error(HTTPError(500, f"{type(exc).__name__}: {exc}"))

    def _route(self, method: str, path: str):
        for pattern, methods in self._routes:
            match = pattern.fullmatch(path)
            if match:
                if method not in methods:
                    raise HTTPError(405, f"{method} is not allowed on {path}",
                                    [("Allow", ", ".join(sorted(methods)))])
                args = [int(g) for g in match.groups()]
                if any(a > _MAX_ID for a in args):
                    raise HTTPError(404, f"no DLQ entry with id {args[0]}")
                return methods[method], args
        raise HTTPError(404, f"no such endpoint: {path}")

    def _check_host(self, environ) -> None:
        if self.allowed_hosts is None:
            return
        host = (environ.get("HTTP_HOST") or "").strip().lower()
        if host.startswith("["):  # [::1]:8088
            name = host[1:].partition("]")[0]
        elif host.count(":") == 1:  # name:port
            name = host.partition(":")[0]
        else:  # a name without a port, or a bare IPv6 address
            name = host
        if name not in self.allowed_hosts:
            raise _bad(f"Host {host!r} is not served here")

    def _authorized(self, environ) -> bool:
        if self.token is None:
            return True
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    @staticmethod
    def _query(environ) -> dict[str, str]:
        raw = environ.get("QUERY_STRING", "")
        try:
            parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=100)
        except ValueError as exc:
            raise _bad(f"malformed query string: {exc}") from None
        repeated = sorted(k for k, v in parsed.items() if len(v) > 1)
        if repeated:
            raise _bad(f"query parameter(s) given more than once: {', '.join(repeated)}")
        return {k: v[0] for k, v in parsed.items()}

    @staticmethod
    def _body(environ, method: str) -> dict:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise _bad("bad Content-Length") from None
        if length > MAX_BODY:
            raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
        if method == "GET":
            return {}
        ctype = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        # Every POST must say JSON, even an empty one: a cross-site form cannot, so no CSRF.
        if (method == "POST" or length > 0) and ctype != "application/json":
            raise HTTPError(415, "send the request as application/json")
        if length <= 0:
            return {}
        raw = environ["wsgi.input"].read(length)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise _bad(f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # nesting deeper than the interpreter's recursion limit
            raise _bad("request body is nested too deeply") from None
        if not isinstance(doc, dict):
            raise _bad("request body must be a JSON object")
        return doc

    @staticmethod
    def _json(status: int, data: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        return status, [("Content-Type", "application/json; charset=utf-8")] + _COMMON_HEADERS, \
            dumps(data).encode()

    def _error(self, exc: HTTPError) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers, body = self._json(exc.status, {
            **exc.extra, "error": _CODES.get(exc.status, "error"), "message": exc.message,
            "status": exc.status})
        return status, headers + exc.headers, body

    # -- endpoints ------------------------------------------------------------------------------

    @staticmethod
    def _no_input(query: dict, body: dict) -> None:
        if query:
            raise _bad(f"unknown query parameter(s) {', '.join(sorted(query))}")
        _check_fields(body, ())

    def _filters(self, source: dict) -> dict:
        return {k: _filter_value(k, source[k]) for k in FILTERS if k in source}

    def list_entries(self, query: dict, body: dict):
        unknown = sorted(set(query) - set(FILTERS) - {"limit", "cursor"})
        if unknown:
            raise _bad(f"unknown query parameter(s) {', '.join(unknown)}; "
                       f"allowed: {', '.join(FILTERS + ('limit', 'cursor'))}")
        _check_fields(body, ())
        limit = _int("limit", query["limit"], 1, self.max_page) if "limit" in query else DEFAULT_PAGE
        cursor = _int("cursor", query["cursor"], 1, _MAX_ID) if "cursor" in query else None
        filters = self._filters(query)
        with self._lock:
            page = self.dlq.list(limit=limit, cursor=cursor, **filters)
        return 200, {"total": page.total, "next_cursor": page.next_cursor, "limit": limit, "rows": page.rows}

    def show(self, query: dict, body: dict, dlq_id: int):
        self._no_input(query, body)
        with self._lock:
            return 200, self.dlq.show(dlq_id)

    def stats(self, query: dict, body: dict):
        self._no_input(query, body)
        with self._lock:
            return 200, self.dlq.stats()

    def requeue_one(self, query: dict, body: dict, dlq_id: int):
        if query:
            raise _bad(f"unknown query parameter(s) {', '.join(sorted(query))}")
        _check_fields(body, ("note", "force"))
        note, force = _note(body), _flag(body, "force")
        with self._lock:
            result = self.dlq.requeue([dlq_id], note=note, force=force)[0]
        if result.detail == "not found":
            raise NotFound(f"no DLQ entry with id {dlq_id}")
        if result.detail.startswith("error:"):
            raise HTTPError(500, result.detail)
        if not result.requeued:
            hint = "; pass force=true to requeue it anyway" if result.refused == REFUSED_STATUS else ""
            raise HTTPError(409, f"entry {dlq_id} not requeued: {result.detail}{hint}",
                            extra={"result": result.__dict__})
        return 200, result.__dict__

    def delete_one(self, query: dict, body: dict, dlq_id: int):
        self._no_input(query, body)
        with self._lock:
            deleted = self.dlq.delete([dlq_id])
        if not deleted:
            raise NotFound(f"no DLQ entry with id {dlq_id}")
        return 200, {"deleted": deleted}

    def _bulk_targets(self, body: dict, extra: tuple[str, ...]) -> tuple[list[int] | None, dict]:
        _check_fields(body, ("ids",) + FILTERS + extra)
        ids = _ids(body["ids"]) if "ids" in body else None
        filters = self._filters(body)
        if ids and filters:
            raise _bad("give either ids or filters, not both")
        if not ids and not filters:
            raise _bad("a bulk action needs explicit ids or at least one filter "
                       f"({', '.join(FILTERS)})")
        return ids, filters

    def _missing(self, ids: list[int] | None) -> None:
        """Explicit ids must all exist: a 404 naming the missing ones, nothing changed."""
        if ids:
            missing = sorted(set(ids) - set(self.dlq.delete(ids, dry_run=True)))
            if missing:
                raise HTTPError(404, f"no DLQ entry with id(s) {', '.join(map(str, missing))}")

    def requeue_many(self, query: dict, body: dict):
        if query:
            raise _bad(f"unknown query parameter(s) {', '.join(sorted(query))}")
        ids, filters = self._bulk_targets(body, ("note", "force", "dry_run"))
        note, force, dry_run = _note(body), _flag(body, "force"), _flag(body, "dry_run")
        with self._lock:
            self._missing(ids)
            results = self.dlq.requeue(ids, filters=filters or None, note=note, force=force, dry_run=dry_run)
        return 200, {"dry_run": dry_run, "requeued": sum(r.requeued for r in results),
                     "results": [r.__dict__ for r in results]}

    def delete_many(self, query: dict, body: dict):
        if query:
            raise _bad(f"unknown query parameter(s) {', '.join(sorted(query))}")
        ids, filters = self._bulk_targets(body, ("dry_run",))
        dry_run = _flag(body, "dry_run")
        with self._lock:
            self._missing(ids)
            deleted = self.dlq.delete(ids, filters=filters or None, dry_run=dry_run)
        return 200, {"dry_run": dry_run, "deleted": deleted}

    # -- the page -------------------------------------------------------------------------------

    def page(self, environ, authorized: bool):
        """The page; with a token and no (or a wrong) Authorization it is still served, as a
        401 with no data in it: its script asks for the token and sends it with every fetch."""
        initial = None
        if authorized:
            with self._lock:
                try:
                    page = self.dlq.list(limit=DEFAULT_PAGE)
                    initial = {"total": page.total, "next_cursor": page.next_cursor, "rows": page.rows}
                except Exception as exc:  # the page still loads; its script reports the error
                    logger.warning("celery_dlq.http: initial list failed: %s", exc)
                    self.dlq.runtime.reset_connection()
        nonce = secrets.token_urlsafe(16)
        body = (_PAGE.replace("__NONCE__", nonce)
                .replace("__BASE__", html.escape(environ.get("SCRIPT_NAME", "").rstrip("/"), quote=True))
                .replace("__REASONS__", "".join(f'<option value="{r}">{r}</option>' for r in REASONS))
                .replace("__STATUSES__", "".join(f'<option value="{s}">{s}</option>' for s in STATUSES))
                .replace("__INITIAL__", dumps(initial)))
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Security-Policy", csp)]
        headers += _COMMON_HEADERS
        if not authorized:
            headers.append(("WWW-Authenticate", 'Bearer realm="celery_dlq"'))
        return (200 if authorized else 401), headers, body.encode()


# -- ASGI ---------------------------------------------------------------------------------------


class ASGIAdapter:
    """Runs a WSGI app (buffered request and response) as an ASGI 3 app, in a thread."""

    def __init__(self, wsgi_app, max_body: int = MAX_BODY) -> None:
        self.wsgi_app = wsgi_app
        self.max_body = max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            raise RuntimeError(f"celery_dlq.http serves HTTP only, not {scope['type']!r}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        environ = self.environ(scope, b"".join(chunks), size)
        loop = asyncio.get_running_loop()
        status, headers, body = await loop.run_in_executor(None, _call_wsgi, self.wsgi_app, environ)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def environ(scope, body: bytes, size: int) -> dict:
        root = scope.get("root_path", "") or ""
        path = scope.get("path", "/")
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root):]
        server = scope.get("server") or ("localhost", 80)
        client = scope.get("client") or ("", 0)
        environ = {
            "REQUEST_METHOD": scope.get("method", "GET"), "SCRIPT_NAME": root,
            "PATH_INFO": path or "/", "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
            "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1] or 80),
            "REMOTE_ADDR": str(client[0]), "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
            "CONTENT_LENGTH": str(size), "wsgi.version": (1, 0), "wsgi.url_scheme": scope.get("scheme", "http"),
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": True, "wsgi.run_once": False,
        }
        for name, value in scope.get("headers", []):
            key = name.decode("latin-1").upper().replace("-", "_")
            value = value.decode("latin-1")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                if key == "CONTENT_TYPE":
                    environ[key] = value
                continue
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ


def _call_wsgi(app, environ) -> tuple[int, list[tuple[str, str]], bytes]:
    response: dict = {}

    def start_response(status, headers, exc_info=None):
        response["status"], response["headers"] = int(status.split(" ", 1)[0]), list(headers)

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return response["status"], response["headers"], body


# -- mounting and serving -----------------------------------------------------------------------


def mount_wsgi(prefix: str, admin, other):
    """A WSGI app sending ``prefix`` and below to ``admin`` and everything else to ``other``."""
    prefix = "/" + prefix.strip("/")

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == prefix or path.startswith(prefix + "/"):
            environ = dict(environ, SCRIPT_NAME=environ.get("SCRIPT_NAME", "") + prefix,
                           PATH_INFO=path[len(prefix):] or "/")
            return admin(environ, start_response)
        return other(environ, start_response)

    return dispatch


def mount_asgi(prefix: str, admin, other):
    """The ASGI counterpart of :func:`mount_wsgi` (``admin`` is ``DLQAdmin(...).asgi``)."""
    prefix = "/" + prefix.strip("/")

    async def dispatch(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == prefix or path.startswith(prefix + "/")):
            root = scope.get("root_path", "") + prefix
            scope = dict(scope, root_path=root, path=root + (path[len(prefix):] or "/"))
            return await admin(scope, receive, send)
        return await other(scope, receive, send)

    return dispatch


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # an access log through logging, not stderr
        logger.info("%s %s", self.address_string(), format % args)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def make_http_server(admin: DLQAdmin, host: str = "127.0.0.1", port: int = 8088):
    """A threaded ``wsgiref`` server for ``admin`` (not started: call ``serve_forever``)."""
    return make_server(host, port, admin, server_class=_ThreadingServer, handler_class=_QuietHandler)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Dead letters</title>
<style nonce="__NONCE__">
body{font:14px/1.4 system-ui,sans-serif;margin:1rem 2rem;color:#222}
h1{font-size:1.3rem;margin:0 0 .5rem}
form{margin:.5rem 0;display:flex;gap:.4rem;flex-wrap:wrap}
input,select,button{font:inherit;padding:.2rem .4rem}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.3rem .4rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}
td.exc{max-width:40rem;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:12px}
td.num{text-align:right}
#message{min-height:1.4em;color:#064}
#message.error{color:#a00}
.status-dead{color:#a00}.status-requeued{color:#a60}.status-resolved{color:#064}
</style></head>
<body data-base="__BASE__">
<h1>Dead letters</h1>
<form id="login" hidden><input id="token" type="password" autocomplete="off" placeholder="bearer token">
<button type="submit">Sign in</button></form>
<form id="filters">
<input name="task" placeholder="task">
<input name="queue" placeholder="queue">
<select name="reason"><option value="">any reason</option>__REASONS__</select>
<input name="exception" placeholder="exception type">
<select name="status"><option value="">any status</option>__STATUSES__</select>
<input name="since" placeholder="since (2h, 7d, ISO)">
<button type="submit" id="apply">Filter</button><button type="reset" id="clear">Clear</button>
</form>
<p id="message" role="status" aria-live="polite"></p>
<p id="total"></p>
<table id="entries"><thead><tr><th>ID</th><th>Task</th><th>Queue</th><th>Reason</th><th>Exception</th>
<th>Failures</th><th>Last failed</th><th>Status</th><th>Actions</th></tr></thead><tbody></tbody></table>
<p><button id="more" type="button" hidden>Load more</button></p>
<script id="initial" type="application/json">__INITIAL__</script>
<script nonce="__NONCE__">
"use strict";
(function () {
  var base = document.body.dataset.base || "";
  var tbody = document.querySelector("#entries tbody");
  var message = document.getElementById("message");
  var filterForm = document.getElementById("filters");
  var loginForm = document.getElementById("login");
  var more = document.getElementById("more");
  var token = sessionStorage.getItem("celery_dlq_token") || "";
  var cursor = null;

  function say(text, isError) {
    message.textContent = text;
    message.className = isError ? "error" : "";
  }

  function api(method, path, body) {
    var headers = {"Accept": "application/json"};
    if (token) headers["Authorization"] = "Bearer " + token;
    var init = {method: method, headers: headers, credentials: "same-origin"};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(base + path, init).then(function (resp) {
      return resp.json().catch(function () { return null; }).then(function (data) {
        if (resp.status === 401) loginForm.hidden = false;
        if (!resp.ok) throw new Error((data && data.message) || ("HTTP " + resp.status));
        return data;
      });
    });
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function button(label, name, handler) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.className = name;
    b.addEventListener("click", function () { handler(b); });
    return b;
  }

  function when(value) {
    return value ? String(value).replace("T", " ").replace(/\\.\\d+/, "") : "";
  }

  function row(entry) {
    var tr = document.createElement("tr");
    tr.dataset.id = String(entry.id);
    cell(tr, entry.id, "num");
    cell(tr, entry.task_name, "task");
    cell(tr, entry.queue, "queue");
    cell(tr, entry.reason, "reason");
    var exc = (entry.exception_type || "") + (entry.exception_message ? ": " + entry.exception_message : "");
    var td = cell(tr, exc.length > 300 ? exc.slice(0, 300) + "\\u2026" : exc, "exc");
    td.title = exc;
    cell(tr, entry.failure_count, "num failures");
    cell(tr, when(entry.last_failed_at), "when");
    cell(tr, entry.status, "status status-" + entry.status);
    var actions = cell(tr, "", "actions");
    actions.appendChild(button("Requeue", "requeue", function (b) { requeue(entry.id, b); }));
    actions.appendChild(document.createTextNode(" "));
    actions.appendChild(button("Delete", "delete", function (b) { remove(entry.id, b); }));
    return tr;
  }

  function render(page, append) {
    if (!append) tbody.replaceChildren();
    page.rows.forEach(function (entry) { tbody.appendChild(row(entry)); });
    document.getElementById("total").textContent =
      page.total + (page.total === 1 ? " entry matches" : " entries match");
    cursor = page.next_cursor;
    more.hidden = cursor === null || cursor === undefined;
  }

  function query(withCursor) {
    var params = new URLSearchParams();
    Array.prototype.forEach.call(filterForm.elements, function (el) {
      if (el.name && el.value.trim()) params.set(el.name, el.value.trim());
    });
    if (withCursor && cursor) params.set("cursor", String(cursor));
    var text = params.toString();
    return "/api/entries" + (text ? "?" + text : "");
  }

  function load(append) {
    return api("GET", query(append)).then(function (page) {
      render(page, append);
    }).catch(function (err) { say(err.message, true); });
  }

  function requeue(id, b) {
    b.disabled = true;
    api("POST", "/api/entries/" + id + "/requeue", {}).then(function (result) {
      say("Entry " + id + " requeued to " + (result.queues || []).join(", "));
      return load(false);
    }).catch(function (err) { b.disabled = false; say("Entry " + id + ": " + err.message, true); });
  }

  function remove(id, b) {
    if (b.dataset.armed !== "1") {
      b.dataset.armed = "1";
      b.textContent = "Confirm delete";
      return;
    }
    b.disabled = true;
    api("DELETE", "/api/entries/" + id).then(function () {
      say("Entry " + id + " deleted");
      return load(false);
    }).catch(function (err) { b.disabled = false; say("Entry " + id + ": " + err.message, true); });
  }

  filterForm.addEventListener("submit", function (ev) { ev.preventDefault(); say(""); load(false); });
  filterForm.addEventListener("reset", function () { setTimeout(function () { load(false); }, 0); });
  more.addEventListener("click", function () { load(true); });
  loginForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    token = document.getElementById("token").value;
    sessionStorage.setItem("celery_dlq_token", token);
    loginForm.hidden = true;
    say("");
    load(false);
  });

  var initial = JSON.parse(document.getElementById("initial").textContent);
  if (initial) render(initial, false); else load(false);
})();
</script>
</body></html>
"""
