"""DLQ admin over HTTP: a real wsgiref server on a free port, real PostgreSQL, and the ASGI adapter."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.client import HTTPConnection
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from celery_dlq.http import DLQAdmin, make_http_server, mount_asgi, mount_wsgi
from celery_dlq.store import DLQStore, Entry

from .dlq_app import make_app, setup_schema
from .test_dlq_store import kombu_message

XSS = '<script>window.__dlq_xss = 1</script><img src=x onerror="window.__dlq_xss = 2">'


class Env:
    def __init__(self, pg_url, schema, conn):
        self.url, self.schema, self.conn = pg_url, schema, conn
        self.store = DLQStore(conn, schema)
        self.app = make_app(pg_url, schema)

    def add(self, *, task="proj.a", reason="non_retryable", exc="ValueError", queue="celery", message="boom"):
        task_id = str(uuid.uuid4())
        row_id, _ = self.store.capture(Entry(
            message=kombu_message(task_id, task), reason=reason, source="signal", task_id=task_id,
            task_name=task, queue=queue, exchange="", routing_key=queue, exception_type=exc,
            exception_message=message))
        return row_id

    def queued(self, queue="celery") -> int:
        return self.conn.execute(sql.SQL("SELECT count(*) FROM {}.messages WHERE queue = %s")
                                 .format(sql.Identifier(self.schema)), (queue,)).fetchone()[0]


class Server:
    """A threaded wsgiref server on a free port, serving ``wsgi_app``."""

    def __init__(self, wsgi_app):
        self.httpd = make_http_server(wsgi_app, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def request(url, method="GET", body=None, *, token=None, raw=None, content_type="application/json",
            host=None):
    """(status, headers, decoded JSON or text) for one request; errors are returned too."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Host": host} if host else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if method == "POST" or data:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=data if data is not None else (b"" if method == "POST" else None),
                                 method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            status, hdrs, payload = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, payload = err.code, err.headers, err.read()
    text = payload.decode()
    if hdrs.get("Content-Type", "").startswith("application/json"):
        return status, hdrs, json.loads(text)
    return status, hdrs, text


@pytest.fixture
def env(pg_url, schema):
    setup_schema(pg_url, schema)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        e = Env(pg_url, schema, conn)
        yield e
        e.app._celery_dlq.close()


@pytest.fixture
def http(env):
    server = Server(DLQAdmin(env.app))
    yield server.base
    server.close()


def test_list_filters_total_and_cursor(env, http):
    a = [env.add(task="proj.a") for _ in range(5)]
    b = env.add(task="proj.b", exc="KeyError", reason="rejected", queue="other")
    status, headers, page = request(f"{http}/api/entries?task=proj.a&limit=2")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert page["total"] == 5 and [r["id"] for r in page["rows"]] == a[4:2:-1]
    _, _, page2 = request(f"{http}/api/entries?task=proj.a&limit=2&cursor={page['next_cursor']}")
    assert [r["id"] for r in page2["rows"]] == a[2:0:-1] and page2["total"] == 5
    _, _, page3 = request(f"{http}/api/entries?task=proj.a&limit=2&cursor={page2['next_cursor']}")
    assert [r["id"] for r in page3["rows"]] == a[:1] and page3["next_cursor"] is None
    for query, ids in [("exception=KeyError", [b]), ("reason=rejected", [b]), ("queue=other", [b]),
                       ("status=dead", [b] + a[::-1]), ("since=1h&until=2999-01-01", [b] + a[::-1]),
                       ("since=2999-01-01T00:00:00", [])]:
        _, _, got = request(f"{http}/api/entries?{query}")
        assert [r["id"] for r in got["rows"]] == ids and got["total"] == len(ids), query
    row = request(f"{http}/api/entries?limit=1")[2]["rows"][0]
    assert row["task_name"] == "proj.b" and row["failure_count"] == 1 and row["last_failed_at"].startswith("20")


def test_show_and_unknown_ids(env, http):
    row_id = env.add()
    status, _, entry = request(f"{http}/api/entries/{row_id}")
    assert status == 200 and entry["id"] == row_id and entry["call"]["args"] == [1, 2]
    assert entry["exception_message"] == "boom"
    for url in ("/api/entries/999999", f"/api/entries/{2**63}", "/api/entries/99999999999999999999"):
        status, _, err = request(http + url)
        assert status == 404 and err["error"] == "not_found" and err["status"] == 404, url
    status, _, err = request(f"{http}/api/entries/999999/requeue", "POST", {})
    assert status == 404 and "999999" in err["message"]
    assert request(f"{http}/api/nothing")[0] == 404


def test_requeue_puts_the_message_back_on_its_queue(env, http):
    row_id = env.add(queue="celery")
    status, _, result = request(f"{http}/api/entries/{row_id}/requeue", "POST", {"note": "fixed in #1"})
    assert status == 200, result
    assert result == {"id": row_id, "requeued": True, "detail": "requeued", "queues": ["celery"],
                      "refused": None, "job_outcome": None, "waiting_task_id": None, "replaced_task_id": None}
    assert env.queued("celery") == 1
    stored = env.store.get(row_id)
    assert stored["status"] == "requeued" and stored["notes"] == ["fixed in #1"]
    message = env.conn.execute(sql.SQL("SELECT payload FROM {}.messages").format(
        sql.Identifier(env.schema))).fetchone()[0]
    assert json.loads(message)["headers"]["dlq_id"] == row_id
    # Requeueing it again is a conflict unless forced.
    status, _, err = request(f"{http}/api/entries/{row_id}/requeue", "POST", {})
    assert status == 409 and err["error"] == "conflict" and "already requeued" in err["message"]
    assert err["result"]["refused"] == "status" and "force=true" in err["message"]
    assert env.queued("celery") == 1
    assert request(f"{http}/api/entries/{row_id}/requeue", "POST", {"force": True})[0] == 200
    assert env.queued("celery") == 2


def test_delete_true_then_404(env, http):
    row_id = env.add()
    status, _, body = request(f"{http}/api/entries/{row_id}", "DELETE")
    assert (status, body) == (200, {"deleted": [row_id]})
    status, _, err = request(f"{http}/api/entries/{row_id}", "DELETE")
    assert status == 404 and err["error"] == "not_found"
    assert request(f"{http}/api/entries/{row_id}")[0] == 404


def test_bulk_requeue_and_delete(env, http):
    a = [env.add(task="proj.a") for _ in range(3)]
    b = env.add(task="proj.b")
    status, _, dry = request(f"{http}/api/requeue", "POST", {"task": "proj.a", "dry_run": True})
    assert status == 200 and [r["detail"] for r in dry["results"]] == ["would requeue"] * 3
    assert env.queued() == 0
    status, _, done = request(f"{http}/api/requeue", "POST", {"task": "proj.a", "note": "deploy 42"})
    assert status == 200 and done["requeued"] == 3 and env.queued() == 3
    # Explicit ids that do not all exist: 404 naming them, nothing changed.
    status, _, err = request(f"{http}/api/delete", "POST", {"ids": [b, 999999]})
    assert status == 404 and "999999" in err["message"] and env.store.count() == 4
    status, _, dry = request(f"{http}/api/delete", "POST", {"status": "requeued", "dry_run": True})
    assert dry == {"dry_run": True, "deleted": a} and env.store.count() == 4
    assert request(f"{http}/api/delete", "POST", {"ids": [b]})[2] == {"dry_run": False, "deleted": [b]}
    assert request(f"{http}/api/delete", "POST", {"status": "requeued"})[2]["deleted"] == a
    assert env.store.count() == 0


def test_stats(env, http):
    status, _, stats = request(f"{http}/api/stats")
    assert status == 200 and (stats["total"], stats["by_task"]) == (0, {})
    env.add(task="proj.a")
    env.add(task="proj.a", reason="rejected")
    stats = request(f"{http}/api/stats")[2]
    assert stats["total"] == 2 and stats["dead"] == 2
    assert stats["by_task"] == {"proj.a": {"entries": 2, "failures": 2}}
    assert set(stats["by_reason"]) == {"non_retryable", "rejected"}
    assert stats["oldest"] is not None


@pytest.mark.parametrize("method,path,body,fragment", [
    ("GET", "/api/entries?tsak=proj.a", None, "unknown query parameter(s) tsak"),
    ("GET", "/api/entries?task=a&task=b", None, "more than once"),
    ("GET", "/api/entries?task=", None, "task is empty"),
    ("GET", "/api/entries?reason=bogus", None, "unknown reason"),
    ("GET", "/api/entries?status=gone", None, "unknown status"),
    ("GET", "/api/entries?since=yesterday", None, "neither an ISO 8601 time"),
    ("GET", "/api/entries?limit=1001", None, "limit must be an integer from 1 to 1000"),
    ("GET", "/api/entries?limit=0", None, "limit must be"),
    ("GET", "/api/entries?cursor=-1", None, "cursor must be"),
    ("GET", "/api/stats?verbose=1", None, "unknown query parameter(s) verbose"),
    ("POST", "/api/requeue", {}, "needs explicit ids or at least one filter"),
    ("POST", "/api/delete", {"dry_run": True}, "needs explicit ids or at least one filter"),
    ("POST", "/api/delete", {"tsak": "proj.a"}, "unknown field(s) tsak"),
    ("POST", "/api/requeue", {"task": "proj.a", "priority": 9}, "unknown field(s) priority"),
    ("POST", "/api/delete", {"ids": [1], "task": "proj.a"}, "either ids or filters"),
    ("POST", "/api/delete", {"ids": []}, "non-empty list"),
    ("POST", "/api/delete", {"ids": ["1"]}, "positive integers"),
    ("POST", "/api/delete", {"ids": [True]}, "positive integers"),
    ("POST", "/api/requeue", {"task": "proj.a", "force": "yes"}, "force must be true or false"),
    ("POST", "/api/delete", {"task": 5}, "task must be a string"),
    ("POST", "/api/entries/1/requeue", {"nte": "x"}, "unknown field(s) nte"),
    ("POST", "/api/delete", [1, 2], "must be a JSON object"),
])
def test_validation_errors_are_400_with_a_message(env, http, method, path, body, fragment):
    env.add(task="proj.a")
    status, _, err = request(http + path, method, body)
    assert status == 400, err
    assert err["error"] == "bad_request" and err["status"] == 400 and fragment in err["message"], err
    assert env.store.count() == 1 and env.queued() == 0


def test_other_protocol_errors(env, http):
    status, headers, err = request(f"{http}/api/stats", "POST", {})
    assert status == 405 and headers["Allow"] == "GET" and err["error"] == "method_not_allowed"
    assert request(f"{http}/api/delete", "POST", raw=b"{nope")[2]["message"].startswith("request body is not")
    # A POST must say JSON (a cross-site form cannot): no CSRF when no token is set.
    status, _, err = request(f"{http}/api/delete", "POST", raw=b"task=proj.a",
                             content_type="application/x-www-form-urlencoded")
    assert status == 415 and err["error"] == "unsupported_media_type"
    # A body over 1 MiB is refused from its Content-Length, before it is read.
    conn = HTTPConnection(urllib.parse.urlsplit(http).netloc, timeout=15)
    conn.putrequest("POST", "/api/delete")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str((1 << 20) + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"] == "payload_too_large"
    conn.close()


def test_bearer_token(env):
    row_id = env.add(message=XSS)
    server = Server(DLQAdmin(env.app, token="s3cret"))
    try:
        for method, path, body in [("GET", "/api/entries", None), ("GET", f"/api/entries/{row_id}", None),
                                   ("GET", "/api/stats", None), ("POST", "/api/delete", {"ids": [row_id]}),
                                   ("DELETE", f"/api/entries/{row_id}", None),
                                   ("POST", f"/api/entries/{row_id}/requeue", {})]:
            for token in (None, "wrong", "s3cret2"):
                status, headers, err = request(server.base + path, method, body, token=token)
                assert status == 401 and err["error"] == "unauthorized", (path, token)
                assert headers["WWW-Authenticate"].startswith("Bearer")
        # The page too is a 401 without the token: served with no data, its script asks for it.
        status, _, page = request(server.base + "/")
        assert status == 401 and 'id="login"' in page and "window.__dlq_xss" not in page
        assert env.store.count() == 1 and env.queued() == 0
        assert request(server.base + "/api/entries", token="s3cret")[2]["total"] == 1
        status, _, page = request(server.base + "/", token="s3cret")
        assert status == 200 and "window.__dlq_xss" in page
        assert request(server.base + f"/api/entries/{row_id}", "DELETE", token="s3cret")[0] == 200
    finally:
        server.close()


def test_untrusted_text_is_escaped_in_the_page_and_the_api(env, http):
    env.add(message=XSS, task="proj.<b>bold</b>")
    status, headers, page = request(http + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "<script>window.__dlq_xss" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "\\u003cscript\\u003ewindow.__dlq_xss = 1\\u003c/script\\u003e" in page  # inert JSON data
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    # The JSON API never emits a raw "<" either (safe even if sniffed as HTML), yet decodes exactly.
    with urllib.request.urlopen(http + "/api/entries", timeout=15) as resp:
        raw = resp.read().decode()
    assert "<" not in raw and ">" not in raw
    assert json.loads(raw)["rows"][0]["exception_message"] == XSS


def test_database_down_is_a_json_500(env, schema):
    broken = make_app("postgresql://postgres@127.0.0.1:1/nope", schema)
    server = Server(DLQAdmin(broken))
    try:
        status, _, err = request(server.base + "/api/stats")
        assert status == 500 and err["error"] == "internal" and err["message"]
        assert request(server.base + "/")[0] == 200  # the page still loads and reports the error
    finally:
        server.close()
        broken._celery_dlq.close()


def test_mounted_under_a_prefix_in_another_wsgi_app(env):
    row_id = env.add()

    def other(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"the host app"]

    server = Server(mount_wsgi("/admin/dlq", DLQAdmin(env.app), other))
    try:
        assert request(server.base + "/somewhere")[2] == "the host app"
        assert request(server.base + "/admin/dlq/api/entries")[2]["rows"][0]["id"] == row_id
        assert 'data-base="/admin/dlq"' in request(server.base + "/admin/dlq/")[2]
    finally:
        server.close()


def test_asgi_adapter(env):
    row_id = env.add(task="proj.asgi")
    other_id = env.add(task="proj.other")
    admin = DLQAdmin(env.app)

    async def call(app, method, path, chunks=(b"",), root_path="", query=b"", headers=()):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "root_path": root_path, "query_string": query,
                 "headers": [(b"host", b"test"), *headers], "server": ("test", 80), "client": ("127.0.0.1", 1)}
        incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return incoming.pop(0)

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        start, body = sent
        assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
        return start["status"], dict(start["headers"]), body["body"]

    async def lifespan(app):
        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent = []

        async def receive():
            return incoming.pop(0)

        async def send(message):
            sent.append(message["type"])

        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        return sent

    async def scenario():
        assert await lifespan(admin.asgi) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        status, headers, body = await call(admin.asgi, "GET", "/api/entries", query=b"task=proj.asgi")
        assert status == 200 and headers[b"content-type"].startswith(b"application/json")
        assert [r["id"] for r in json.loads(body)["rows"]] == [row_id]
        # A JSON body in two chunks; the path below a root_path (how Starlette's Mount passes it).
        status, _, body = await call(admin.asgi, "POST", f"/dlq/api/entries/{row_id}/requeue",
                                     chunks=(b'{"note": ', b'"via asgi"}'), root_path="/dlq",
                                     headers=[(b"content-type", b"application/json")])
        assert status == 200 and json.loads(body)["requeued"] is True
        status, _, body = await call(admin.asgi, "GET", "/api/entries", query=b"bogus=1")
        assert status == 400 and json.loads(body)["error"] == "bad_request"
        status, _, body = await call(admin.asgi, "DELETE", f"/api/entries/{other_id}")
        assert status == 200
        status, _, body = await call(admin.asgi, "DELETE", f"/api/entries/{other_id}")
        assert status == 404
        # Mounted in another ASGI app.
        async def host_app(scope, receive, send):
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        mounted = mount_asgi("/ops/dlq", admin.asgi, host_app)
        status, _, page = await call(mounted, "GET", "/ops/dlq/")
        assert status == 200 and b'data-base="/ops/dlq"' in page
        assert (await call(mounted, "GET", "/elsewhere"))[0] == 204

    asyncio.run(scenario())
    assert env.queued() == 1 and env.store.get(row_id)["notes"] == ["via asgi"]


def test_the_serve_command(env):
    """`celery -A dlq_app dlq serve --port 0 --token T`: serves until SIGTERM, exit 0."""
    row_id = env.add()
    tests_dir = Path(__file__).resolve().parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery_dlq", "-A", "dlq_app", "dlq", "serve", "--port", "0"],
        cwd=tests_dir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "KOMBU_PG_URL": env.url, "DLQ_SCHEMA": env.schema, "PYTHONPATH": str(tests_dir),
             "CELERY_DLQ_TOKEN": "tok"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("celery_dlq admin on http://127.0.0.1:"), line
        base = line.split(" on ", 1)[1].strip().rstrip("/")
        assert request(base + "/api/entries")[0] == 401
        assert request(base + "/api/entries", token="tok")[2]["rows"][0]["id"] == row_id
        # On loopback only local Host names are answered (no DNS rebinding onto the admin).
        status, _, err = request(base + "/api/entries", token="tok", host="evil.example:8088")
        assert status == 400 and "evil.example" in err["message"]
        assert request(base + "/api/stats", token="tok", host="localhost")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    # An unreachable database: exit 1 at once, nothing served.
    proc = subprocess.run(
        [sys.executable, "-m", "celery_dlq", "-A", "dlq_app", "dlq", "serve", "--port", "0"],
        check=False, cwd=tests_dir, capture_output=True, text=True, timeout=60,
        env={**os.environ, "KOMBU_PG_URL": "postgresql://postgres@127.0.0.1:1/nope", "DLQ_SCHEMA": env.schema,
             "PYTHONPATH": str(tests_dir)})
    assert proc.returncode == 1 and "error:" in proc.stderr


def test_requeue_body_keeps_retries_and_expires_on_request(env, http):
    """The requeue body's keep_retries / keep_expires: without them the message goes back
    with retries 0 and no expires; with them, as stored."""
    expires = "2001-01-01T00:00:00+00:00"

    def add() -> int:
        task_id = str(uuid.uuid4())
        return env.store.capture(Entry(
            message=kombu_message(task_id, "proj.a", retries=3, extra_headers={"expires": expires}),
            reason="retries_exhausted", source="signal", task_id=task_id, task_name="proj.a", queue="celery",
            exchange="", routing_key="celery"))[0]

    fresh, kept = add(), add()
    assert request(f"{http}/api/entries/{fresh}/requeue", "POST", {})[0] == 200
    status, _, body = request(f"{http}/api/requeue", "POST",
                              {"ids": [kept], "keep_retries": True, "keep_expires": True})
    assert status == 200 and body["requeued"] == 1, body
    headers = {}
    for (payload,) in env.conn.execute(sql.SQL("SELECT payload FROM {}.messages").format(
            sql.Identifier(env.schema))):
        h = json.loads(payload)["headers"]
        headers[h["dlq_id"]] = h
    assert (headers[fresh]["retries"], "expires" in headers[fresh]) == (0, False)
    assert (headers[kept]["retries"], headers[kept]["expires"]) == (3, expires)
    assert request(f"{http}/api/entries/{fresh}/requeue", "POST", {"keep_retry": True})[0] == 400
