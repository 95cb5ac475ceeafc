"""The seam between the HTTP adapters and the admin: WSGI and ASGI build the same Request,
and the handler answers a Request directly (real PostgreSQL, no server, no socket)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
import threading

import pytest

from celery_dlq.http import DLQAdmin, Request, Response
from celery_dlq.http.asgi import ASGIAdapter, request_from_scope
from celery_dlq.http.wsgi import request_from_environ

from .test_dlq_http import env  # noqa: F401  (env is a fixture)

TOKEN = "seam-token"


def environ(method, path, *, query="", headers=(), body=b"", root=""):
    env = {"REQUEST_METHOD": method, "SCRIPT_NAME": root, "PATH_INFO": path, "QUERY_STRING": query,
           "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr}
    for name, value in headers:
        key = name.upper().replace("-", "_")
        env[key if key == "CONTENT_TYPE" else "HTTP_" + key] = value
    return env


def scope(method, path, *, query="", headers=(), root=""):
    return {"type": "http", "method": method, "path": root + path, "root_path": root,
            "query_string": query.encode("latin-1"),
            "headers": [(n.lower().encode(), v.encode("latin-1")) for n, v in headers]}


SAME = [
    ("GET", "/", {}),
    ("GET", "/api/entries", {"query": "task=proj.a&limit=5", "headers": [("Authorization", "Bearer x")]}),
    ("POST", "/api/entries/7/requeue", {"headers": [("Content-Type", "application/json; charset=utf-8"),
                                                    ("Host", "localhost:8088")],
                                        "body": b'{"note": "n"}', "root": "/ops/dlq"}),
    ("DELETE", "/api/entries/7", {"headers": [("X-Forwarded-For", "10.0.0.1")]}),
]


@pytest.mark.parametrize("method,path,kw", SAME)
def test_wsgi_and_asgi_build_the_same_request(method, path, kw):
    body = kw.get("body", b"")
    from_wsgi = request_from_environ(environ(method, path, **kw))
    asgi_kw = {k: v for k, v in kw.items() if k != "body"}
    from_asgi = request_from_scope(scope(method, path, **asgi_kw), body, len(body))
    assert from_wsgi == from_asgi
    assert from_wsgi.read() == from_asgi.read() == body
    headers = {n.lower(): v for n, v in kw.get("headers", [])}
    assert from_wsgi == Request.of(method, path, query=kw.get("query", ""), headers=headers, body=body,
                                   root=kw.get("root", ""))


def test_asgi_size_is_what_arrived_not_what_was_announced():
    request = request_from_scope(scope("POST", "/api/delete", headers=[("Content-Length", "3")]), b"{}", 2)
    assert request.length == 2 and "content-length" not in request.headers


def test_asgi_joins_repeated_headers_and_keeps_the_last_content_type():
    headers = [("Accept", "a"), ("Accept", "b"),
               ("Content-Type", "text/plain"), ("Content-Type", "application/json")]
    request = request_from_scope(scope("POST", "/api/delete", headers=headers), b"", 0)
    assert request.headers == {"accept": "a,b", "content-type": "application/json"}


def test_a_malformed_wsgi_content_length_is_none():
    env = environ("POST", "/api/delete")
    env["CONTENT_LENGTH"] = "twelve"
    assert request_from_environ(env).length is None


def test_the_asgi_adapter_runs_the_handler_off_the_event_loop():
    seen = {}

    def handle(request):
        seen["thread"], seen["request"] = threading.get_ident(), request
        return Response(204, [("X-Seen", request.path)], b"")

    sent = []
    incoming = [{"type": "http.request", "body": b'{"a"', "more_body": True},
                {"type": "http.request", "body": b": 1}", "more_body": False}]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    async def run():
        seen["loop"] = threading.get_ident()
        post = scope("POST", "/x", headers=[("Content-Type", "application/json")])
        await ASGIAdapter(handle)(post, receive, send)

    asyncio.run(run())
    assert seen["thread"] != seen["loop"]
    assert seen["request"].read() == b'{"a": 1}' and seen["request"].length == 8
    assert sent[0]["status"] == 204
    assert sent[0]["headers"] == [(b"x-seen", b"/x"), (b"content-length", b"0")]
    assert sent[1] == {"type": "http.response.body", "body": b""}


# -- the handler, called with a Request ---------------------------------------------------------


def test_the_handler_answers_a_request_directly(env):  # noqa: F811
    row_id = env.add(task="proj.seam")
    admin = DLQAdmin(env.app, token=TOKEN)
    auth = {"authorization": f"Bearer {TOKEN}"}

    listing = Request.of("GET", "/api/entries", query="task=proj.seam", headers=auth)
    status, headers, body = admin.handle(listing)
    assert status == 200 and dict(headers)["Content-Type"].startswith("application/json")
    assert [r["id"] for r in json.loads(body)["rows"]] == [row_id]

    assert admin.handle(Request.of("GET", "/api/entries")).status == 401
    assert admin.handle(Request.of("PUT", "/api/entries", headers=auth)).status == 405
    assert admin.handle(Request.of("GET", "/api/entries/999999", headers=auth)).status == 404

    status, _, body = admin.handle(Request.of(
        "POST", f"/api/entries/{row_id}/requeue", headers={**auth, "content-type": "application/json"},
        body=b'{"note": "direct"}'))
    assert status == 200 and json.loads(body)["requeued"] is True
    assert env.queued() == 1 and env.store.get(row_id)["notes"] == ["direct"]


def test_a_body_is_not_read_when_the_answer_does_not_need_it(env):  # noqa: F811
    """A GET's body, and any body of a request refused before it is parsed, is never read:
    over a socket the client might never send the bytes its Content-Length promised."""
    admin = DLQAdmin(env.app, token=TOKEN)

    def unread():
        raise AssertionError("the body was read")

    auth = {"authorization": f"Bearer {TOKEN}"}
    get = Request("GET", "/api/stats", headers=auth, length=1000, read=unread)
    assert admin.handle(get).status == 200
    json_type = {"content-type": "application/json"}
    no_token = Request("POST", "/api/delete", headers=json_type, length=10, read=unread)
    assert admin.handle(no_token).status == 401
    too_big = Request("POST", "/api/delete", headers={**auth, **json_type}, length=(1 << 20) + 1, read=unread)
    assert admin.handle(too_big).status == 413


def test_the_page_slots_are_filled_in_one_pass(env):  # noqa: F811
    """Text put into one slot of the page is never read as another slot: a mount path that
    happens to contain ``__INITIAL__`` stays the mount path, not the rows' JSON."""
    env.add(task="proj.slot")
    root = "/ops__INITIAL____NONCE__"
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"] = status

    page = b"".join(DLQAdmin(env.app)(environ("GET", "/", root=root), start_response)).decode()
    assert seen["status"] == "200 OK"
    assert re.search(r'<body data-base="([^"]*)">', page)[1] == root
