"""The WSGI side: environ to :class:`Request`, :class:`Response` to ``start_response``,
mounting under a prefix, and the threaded ``wsgiref`` server of ``celery dlq serve``."""

from __future__ import annotations

import logging
import socketserver
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .messages import Request, Response

logger = logging.getLogger("celery_dlq.http")

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
            415: "Unsupported Media Type", 500: "Internal Server Error"}


def request_from_environ(environ: dict) -> Request:
    """The :class:`Request` in a WSGI environ; its body is read only when asked for."""
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
               if key.startswith("HTTP_") and key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH")}
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    try:
        length: int | None = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = None
    return Request(method=environ.get("REQUEST_METHOD", "GET").upper(), path=environ.get("PATH_INFO") or "/",
                   query=environ.get("QUERY_STRING") or "", headers=headers,
                   root=environ.get("SCRIPT_NAME", ""), length=length,
                   read=lambda: environ["wsgi.input"].read(length))


def serve_wsgi(handle: Callable[[Request], Response], environ: dict, start_response) -> list[bytes]:
    """Answer one WSGI call with ``handle``."""
    status, headers, body = response = handle(request_from_environ(environ))
    start_response(f"{status} {_REASONS.get(status, '')}".strip(), response.head())
    return [body]


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


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # an access log through logging, not stderr
        logger.info("%s %s", self.address_string(), format % args)


def make_http_server(admin: Callable, host: str = "127.0.0.1", port: int = 8088):
    """A threaded ``wsgiref`` server for ``admin`` (not started: call ``serve_forever``)."""
    return make_server(host, port, admin, server_class=_ThreadingServer, handler_class=_QuietHandler)
