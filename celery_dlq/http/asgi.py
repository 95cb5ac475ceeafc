"""The ASGI side: scope and body to :class:`Request`, :class:`Response` to ``send``.

The handler makes blocking database calls, so it runs in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .inputs import MAX_BODY
from .messages import Request, Response


def request_from_scope(scope: dict, body: bytes, size: int) -> Request:
    """The :class:`Request` for an HTTP ``scope`` whose body was ``size`` bytes, of which
    ``body`` holds what was kept (all of it, unless it was too large to keep)."""
    root = scope.get("root_path", "") or ""
    path = scope.get("path", "/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        # Names as a WSGI server would see them: "_" and "-" alike.
        name, value = raw_name.decode("latin-1").lower().replace("_", "-"), raw_value.decode("latin-1")
        if name == "content-length":  # the size received is the truth, not what was announced
            continue
        if name in headers and name != "content-type":
            value = f"{headers[name]},{value}"
        headers[name] = value
    return Request(method=scope.get("method", "GET").upper(), path=path or "/",
                   query=scope.get("query_string", b"").decode("latin-1"), headers=headers,
                   root=root, length=size, read=lambda: body)


class ASGIAdapter:
    """An ASGI 3 application answering with ``handle`` (buffered request and response)."""

    def __init__(self, handle: Callable[[Request], Response], max_body: int = MAX_BODY) -> None:
        self.handle = handle
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
            if size <= self.max_body:  # beyond it the handler answers 413 from the size alone
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        request = request_from_scope(scope, b"".join(chunks), size)
        response = await asyncio.get_running_loop().run_in_executor(None, self.handle, request)
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.head()]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})


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
