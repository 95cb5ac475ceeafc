"""Fuzzing the DLQ admin (celery_dlq.http): every bad input is a 4xx in the API's error
shape, never a 500 and never a dropped connection.

Requests are generated for every endpoint and parameter (methods, path ids, query strings,
JSON bodies, raw bodies, Content-Type/Length, Authorization, Host) and sent three ways: to
the WSGI callable, to the ASGI adapter, and over a socket to the real threaded server.
The database is real and up, so a 500 is always a bug.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from http.client import HTTPConnection
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from celery_dlq.http import FILTERS, DLQAdmin

from .test_dlq_http import Server, env  # noqa: F401  (env is a fixture)

TOKEN = "fuzz-token"
EXPECTED = {200, 400, 401, 404, 405, 409, 413, 415}
FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

NASTY = st.one_of(
    st.text(max_size=24),  # NUL, lone surrogates, controls
    st.sampled_from([
        "99999999999w", "1e999s", "9" * 400 + "s", "0.0000001s", "2h", "7d", "yesterday",
        "0001-01-01", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2024-02-30",
        "dead", "requeued", "non_retryable", "proj.a", "celery", "\x00", "a\x00b", "\ud800",
        "-1", "0", "00", "1", "9" * 19, "9" * 20, "1.5", "nan", "inf", "true", "", " ",
    ]),
    st.integers().map(str),
)
PARAM_NAMES = st.sampled_from(FILTERS + ("limit", "cursor", "ids", "note", "bogus", "")) | st.text(max_size=8)
IDS = st.one_of(st.integers(min_value=-5, max_value=2**70), st.sampled_from(["abc", "1e3", "", "0x1", "١"]))
PATHS = st.one_of(
    st.sampled_from(["/", "/api/entries", "/api/requeue", "/api/delete", "/api/stats", "/api", "//",
                     "/api/entries/", "/api/stats/", "/%00", "/api/entries/1/requeue/x"]),
    IDS.map(lambda i: f"/api/entries/{i}"),
    IDS.map(lambda i: f"/api/entries/{i}/requeue"),
    st.text(max_size=20).map(lambda t: "/" + t),
)
METHODS = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "get", "FOO"])

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                      st.floats(), NASTY)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
BODY_DOC = st.dictionaries(PARAM_NAMES | st.sampled_from(["force", "dry_run"]), JSON_VALUE | IDS.map(lambda i: [i]),
                           max_size=5)


def encode_json(doc) -> bytes:
    # allow_nan: Infinity/NaN are what a careless client sends; surrogates stay escaped.
    return json.dumps(doc).encode()


BODIES = st.one_of(
    st.just(b""),
    BODY_DOC.map(encode_json),
    JSON_VALUE.map(encode_json),
    st.binary(max_size=64),
    st.sampled_from([b"[" * 100_000, b"{" * 50_000, b'{"ids": [' + b"1," * 20_000 + b"1]}",
                     b'{"note": "' + b"x" * 20_000 + b'"}', b"\xff\xfe", b'"\\ud800"', b"1" * 5000]),
)
AUTH = st.one_of(st.just(f"Bearer {TOKEN}"), st.just(f"Bearer {TOKEN}"), st.none(),
                 st.sampled_from(["Bearer", "Bearer ", "Basic x", f"bearer {TOKEN} ", "Bearer \x00"]),
                 st.text(max_size=20))
CONTENT_TYPES = st.one_of(st.just("application/json"), st.none(),
                          st.sampled_from(["text/plain", "application/json; charset=latin-1", "APPLICATION/JSON",
                                           "multipart/form-data"]), st.text(max_size=12))


def query_string(pairs) -> str:
    # Percent-encode the UTF-8 bytes (surrogates included, as a broken client would).
    return "&".join(quote_from_bytes(k.encode("utf-8", "surrogatepass")) + "="
                    + quote_from_bytes(v.encode("utf-8", "surrogatepass")) for k, v in pairs)


QUERIES = st.one_of(
    st.lists(st.tuples(PARAM_NAMES, NASTY), max_size=4).map(query_string),
    st.text(alphabet=st.characters(max_codepoint=255), max_size=30),  # raw, as WSGI gives latin-1
    st.sampled_from(["since=99999999999w", "until=1e999s", "task=%00", "a=1&a=2", "&&", "=", "%",
                     "limit=0", "cursor=99999999999999999999", "&".join(f"f{i}=1" for i in range(200))]),
)


@st.composite
def requests(draw):
    body = draw(BODIES)
    length = draw(st.one_of(st.just(str(len(body))), st.sampled_from(["", "-1", "abc", "99999999999", "0"]),
                            st.integers(min_value=0, max_value=2 * len(body) + 2).map(str)))
    return {"method": draw(METHODS), "path": draw(PATHS), "query": draw(QUERIES), "body": body,
            "length": length, "auth": draw(AUTH), "ctype": draw(CONTENT_TYPES),
            "host": draw(st.one_of(st.just("localhost"), st.text(max_size=12)))}


def check(status: int, headers: dict, body: bytes, request: dict) -> None:
    assert status in EXPECTED, (status, body[:500], request)
    ctype = headers.get("content-type", "")
    if ctype.startswith("text/html"):
        assert request["path"] == "/" and status in (200, 401)
        return
    doc = json.loads(body)
    if status >= 400:
        # A refused single-entry requeue (409) also carries the requeue's result.
        extra = {"result"} if status == 409 else set()
        assert {"error", "message", "status"} <= set(doc) <= {"error", "message", "status", *extra}, doc
        assert doc["status"] == status, doc


@pytest.fixture
def admin(env):  # noqa: F811  (the fixture imported above)
    for task in ("proj.a", "proj.b"):
        for _ in range(3):
            env.add(task=task)
    return DLQAdmin(env.app, token=TOKEN, allowed_hosts=None)


def wsgi_environ(req: dict) -> dict:
    environ = {"REQUEST_METHOD": req["method"], "PATH_INFO": req["path"], "QUERY_STRING": req["query"],
               "CONTENT_LENGTH": req["length"], "wsgi.input": io.BytesIO(req["body"]), "SCRIPT_NAME": "",
               "HTTP_HOST": req["host"], "wsgi.errors": sys.stderr}
    if req["auth"] is not None:
        environ["HTTP_AUTHORIZATION"] = req["auth"]
    if req["ctype"] is not None:
        environ["CONTENT_TYPE"] = req["ctype"]
    return environ


def call_wsgi(admin, req: dict):
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = int(status.split()[0]), {k.lower(): v for k, v in headers}

    body = b"".join(admin(wsgi_environ(req), start_response))
    return seen["status"], seen["headers"], body


def request(method: str, path: str, query: str = "", body: bytes = b"") -> dict:
    return {"method": method, "path": path, "query": query, "body": body, "length": str(len(body)),
            "auth": f"Bearer {TOKEN}", "ctype": "application/json" if body else None, "host": "localhost"}


#: Inputs that answered 500 before they were checked at the edge.
KNOWN = [
    request("GET", "/api/entries", "since=99999999999w"),  # OverflowError in timedelta
    request("GET", "/api/entries", "until=" + "9" * 400 + "s"),  # float inf
    request("GET", "/api/entries", "task=a%00b"),  # PostgreSQL: text cannot contain NUL
    request("POST", "/api/requeue", body=b'{"task": "\\ud800"}'),  # lone surrogate: not UTF-8
    request("POST", "/api/delete", body=b"[" * 100_000),  # RecursionError in json.loads
    request("POST", "/api/entries/1/requeue", body=b'{"note": "a\\u0000"}'),
]


def known_crashes(test):
    for req in KNOWN:
        test = example(req=req)(test)
    return test


@FUZZ
@given(req=requests())
@known_crashes
def test_wsgi_never_answers_500(admin, req):
    check(*call_wsgi(admin, req), req)


async def call_asgi(admin, req: dict):
    headers = [(b"host", req["host"].encode("utf-8", "surrogatepass"))]
    for name, value in (("authorization", req["auth"]), ("content-type", req["ctype"]),
                        ("content-length", req["length"])):
        if value is not None:
            headers.append((name.encode(), value.encode("utf-8", "surrogatepass")))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req["method"],
             "scheme": "http", "path": req["path"], "root_path": "", "headers": headers,
             "query_string": req["query"].encode("utf-8", "surrogatepass"), "server": ("test", 80),
             "client": ("127.0.0.1", 1)}
    incoming = [{"type": "http.request", "body": req["body"], "more_body": False}]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    await admin.asgi(scope, receive, send)
    start, body = sent
    return start["status"], {k.decode(): v.decode("latin-1") for k, v in start["headers"]}, body["body"]


@settings(FUZZ, max_examples=120)
@given(req=requests())
@known_crashes
def test_asgi_never_answers_500(admin, req):
    check(*asyncio.run(call_asgi(admin, req)), req)


@pytest.fixture
def server(admin):
    srv = Server(admin)
    yield srv
    srv.close()


@settings(FUZZ, max_examples=120)
@given(req=requests())
@known_crashes
def test_the_server_answers_every_request(server, req):
    """Over a real socket (Content-Length always true: a short body would only be waited
    for): a whole response, never a reset connection."""
    port = int(server.base.rsplit(":", 1)[1])
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    path = quote_from_bytes(req["path"].encode("utf-8", "surrogatepass"), safe="/%")
    query = req["query"].encode("latin-1", "replace").decode("latin-1")
    target = path + ("?" + quote_from_bytes(query.encode("latin-1"), safe="=&%") if query else "")
    method = req["method"].upper() if req["method"].isalpha() else "GET"
    headers = {"Host": "localhost", "Content-Length": str(len(req["body"]))}
    for name, value in (("Authorization", req["auth"]), ("Content-Type", req["ctype"])):
        if value is not None and value.isprintable() and value.isascii():
            headers[name] = value
    try:
        conn.request(method, target, body=req["body"], headers=headers)
        response = conn.getresponse()
        body = response.read()
        if method == "HEAD":  # the status line and headers are the whole answer
            assert response.status in EXPECTED, (response.status, req)
            return
        check(response.status, {k.lower(): v for k, v in response.getheaders()}, body,
              dict(req, path="/" if target.split("?")[0] == "/" else req["path"]))
    finally:
        conn.close()
