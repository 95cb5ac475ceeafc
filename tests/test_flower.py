"""Flower against kombu-pg: a real worker and a real ``celery flower`` subprocess.

Flower shows workers through remote control (pidbox) and tasks through events; both
cross processes through the database.  Checked through Flower's HTTP API.  The Broker tab
(queue lengths) comes from kombu_pg.contrib.flower: tests/test_ecosystem_flower.py.
"""

from __future__ import annotations

import html
import json
import socket
import time
import urllib.error
import urllib.request
import uuid

import psycopg
import pytest
from psycopg import sql

from tests.monitor_app import CeleryProcess, process_env, start_worker

# Flower is not a kombu-pg dependency; without it there is nothing to test here.
pytest.importorskip("flower", reason="Flower is not installed (pip install flower)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Flower:
    def __init__(self, base: str, proc: CeleryProcess) -> None:
        self.base = base
        self.proc = proc

    def request(self, path: str, data: dict | None = None, timeout: float = 10) -> tuple[int, str]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.base + path, data=body, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def json(self, path: str, data: dict | None = None):
        status, text = self.request(path, data)
        assert status == 200, f"{path} -> {status}: {text[:500]}"
        return json.loads(text)

    def poll(self, path: str, accept, timeout: float, what: str):
        """GET ``path`` until ``accept(json)``: Flower offers no push to wait on."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            status, text = self.request(path)
            if status == 200:
                last = json.loads(text)
                if accept(last):
                    return last
            else:
                last = (status, text[:200])
            if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} at {path}; last: {last!r}\n"
                    f"flower output:\n{self.proc.output_tail()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def fschema(pg_url):
    name = f"flw_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def worker(pg_url, fschema):
    proc, node = start_worker(pg_url, fschema, events=True)
    proc.node = node
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def flower(pg_url, fschema, worker):
    port = free_port()
    env = process_env(pg_url, fschema, FLOWER_UNAUTHENTICATED_API="true")
    proc = CeleryProcess(["-A", "tests.monitor_app", "flower", f"--port={port}",
                          "--address=127.0.0.1"], env, name="flower").start()
    try:
        client = Flower(f"http://127.0.0.1:{port}", proc)
        # Ready when it serves HTTP (bounded poll: the listening socket has no event).
        _wait_healthy(client, timeout=30)
        yield client
    finally:
        proc.stop()


def _wait_healthy(client: Flower, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, text = client.request("/healthcheck", timeout=2)
            if status == 200 and text == "OK":
                return
        except (urllib.error.URLError, ConnectionError, socket.timeout):
            pass  # not listening yet
        if time.monotonic() > deadline or client.proc.proc.poll() is not None:
            raise AssertionError(f"flower not serving after {timeout}s:\n{client.proc.output_tail()}")
        time.sleep(0.2)


def test_flower_lists_the_worker(flower, worker):
    # Alive according to events (heartbeats through the topic exchange celeryev).
    status = flower.poll("/api/workers?status=true", lambda s: s.get(worker.node) is True,
                         timeout=20, what="the worker to be alive in Flower's event state")
    assert status[worker.node] is True
    # Details through remote control (inspect over pidbox, replies to Flower's queue).
    workers = flower.json(f"/api/workers?refresh=true&workername={worker.node}")
    info = workers[worker.node]
    assert {q["name"] for q in info["active_queues"]} >= {"celery"}
    assert info["stats"]["broker"]["transport"] == "postgresql"
    assert "monitor_app.add" in {t.split(" ", 1)[0] for t in info["registered"]}


def test_flower_shows_finished_tasks(flower, worker):
    # Flower's event receiver must be up before the task runs, or it misses its events.
    flower.poll("/api/workers?status=true", lambda s: s.get(worker.node) is True,
                timeout=20, what="Flower to receive the worker's events")
    ok = flower.json("/api/task/async-apply/monitor_app.add", {"args": [2, 3]})
    bad = flower.json("/api/task/async-apply/monitor_app.fail", {"args": ["from flower"]})
    ok_id, bad_id = ok["task-id"], bad["task-id"]

    info = flower.poll(f"/api/task/info/{ok_id}", lambda t: t.get("state") == "SUCCESS",
                       timeout=20, what=f"task {ok_id} to succeed")
    assert info["name"] == "monitor_app.add"
    assert info["result"] == "5"
    assert info["worker"] == worker.node
    info = flower.poll(f"/api/task/info/{bad_id}", lambda t: t.get("state") == "FAILURE",
                       timeout=20, what=f"task {bad_id} to fail")
    assert "from flower" in info["exception"]

    tasks = flower.json("/api/tasks")
    assert tasks[ok_id]["state"] == "SUCCESS"
    assert tasks[bad_id]["state"] == "FAILURE"


def test_flower_broker_tab_lists_the_queues(flower):
    """Flower has clients for amqp/redis only; kombu_pg registers one for postgresql://."""
    status, text = flower.request("/broker")
    assert status == 200, html.unescape(text)[:500]
    assert '<tr id="celery">' in text
