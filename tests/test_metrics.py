"""Prometheus metrics (kombu_pg.metrics): counters from real Kombu traffic, gauges against
SQL truth, bounded labels, the `pg metrics` exporter, and prefork multiprocess mode."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from celery import Celery, states
from click.testing import CliRunner
from kombu import Connection, Consumer, Exchange, Producer, Queue
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from kombu_pg import metrics
from kombu_pg.cli import pg
from kombu_pg.metrics import KINDS, OTHER_QUEUE, OTHER_STATE, TEMPORARY_QUEUE, BrokerCollector, ResultCollector
from kombu_pg.store import BrokerStore, apply_migrations, connect

from .worker import TESTS_DIR, CeleryWorker, wait_until

COUNTERS = ("published", "delivered", "acked", "redelivered")

APP_MODULE = '''
import os

from celery import Celery

import kombu_pg  # noqa: F401
from kombu_pg.serial import serial_key_headers

URL = os.environ["KOMBU_PG_URL"]
SCHEMA = os.environ["KOMBU_PG_SCHEMA"]

app = Celery("metrics_app", broker=URL, backend=URL)
app.conf.broker_transport_options = {"schema": SCHEMA, "recovery_interval": 0.5}
app.conf.result_backend_transport_options = {"schema": SCHEMA}
if os.environ.get("METRICS_DLQ") == "1":
    import celery_dlq

    celery_dlq.install(app)


@app.task
def fan(parallel, serial):
    """Publish from the pool child that runs it: `parallel` plain and `serial` keyed sinks."""
    for i in range(parallel):
        sink.apply_async((i,), queue="sink")
    for i in range(serial):
        sink.apply_async((i,), queue="sink", headers=serial_key_headers(f"key-{i}"))
    return os.getpid()


@app.task
def sink(i):
    return i
'''


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(f"kombu_pg_messages_{name}_total", labels) or 0.0


def snapshot() -> dict:
    values = {(name, kind): counter(name, kind=kind) for name in COUNTERS for kind in KINDS}
    values.update({("rejected", kind, requeue): counter("rejected", kind=kind, requeue=requeue)
                   for kind in KINDS for requeue in ("true", "false")})
    for hist in ("publish", "claim"):
        values[hist] = REGISTRY.get_sample_value(f"kombu_pg_{hist}_duration_seconds_count") or 0.0
    return values


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def samples(registry_or_text) -> dict:
    """{(sample name, frozenset(labels)): value} from a registry or exposition text."""
    if isinstance(registry_or_text, str):
        families = text_string_to_metric_families(registry_or_text)
    else:
        families = registry_or_text.collect()
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


# -- counters from real Kombu traffic ------------------------------------------------------


def test_counters_move_with_publish_consume_ack_reject_requeue(pg_url, schema):
    queue = Queue("work", Exchange("work", "direct"), "work")
    fan = Exchange("fan", "fanout")
    fan_queues = [Queue(f"fan{i}", fan) for i in range(2)]
    handled: list[str] = []

    def on_message(body, message):
        handled.append(body)
        if body == "s-reject":
            message.reject()
        elif body == "s-requeue" and not message.delivery_info.get("redelivered"):
            message.requeue()
        else:
            message.ack()

    with Connection(pg_url, transport_options={"schema": schema, "polling_interval": 0.5}) as conn:
        conn.connect()
        producer = Producer(conn.default_channel)
        for q in fan_queues:
            q(conn.default_channel).declare()
        before = snapshot()
        for body in ("p1", "p2", "p3"):
            producer.publish(body, exchange=queue.exchange, routing_key="work", declare=[queue])
        producer.publish("s-reject", exchange=queue.exchange, routing_key="work", headers={"serial_key": "a"})
        producer.publish("s-requeue", exchange=queue.exchange, routing_key="work", headers={"serial_key": "b"})
        producer.publish("routed", exchange=fan, routing_key="")  # one statement, two queues
        published = delta(before, snapshot())
        assert published == {("published", "parallel"): 5, ("published", "serial"): 2, "publish": 6}

        deadline = time.monotonic() + 15
        with Consumer(conn, [queue], callbacks=[on_message]):
            while len(handled) < 6:  # 5 messages, one of them delivered twice
                assert time.monotonic() < deadline, handled
                try:
                    conn.drain_events(timeout=1)
                except socket.timeout:
                    pass
        changes = delta(before, snapshot())
        claims = changes.pop("claim")
        assert claims >= 2  # the requeued message needed a second claim
        assert changes == {
            ("published", "parallel"): 5, ("published", "serial"): 2, "publish": 6,
            ("delivered", "parallel"): 3, ("delivered", "serial"): 3,
            ("acked", "parallel"): 3, ("acked", "serial"): 1,
            ("rejected", "serial", "false"): 1, ("rejected", "serial", "true"): 1,
            ("redelivered", "serial"): 1,
        }

        # A no-ack delivery is acked as it is delivered; basic_get goes through the same path.
        before = snapshot()
        assert conn.default_channel.basic_get("fan0", no_ack=True) is not None
        changes = delta(before, snapshot())
        changes.pop("claim")
        assert changes == {("delivered", "parallel"): 1, ("acked", "parallel"): 1}

        # Turned off, the instrumentation does nothing.
        metrics.set_enabled(False)
        try:
            before = snapshot()
            producer.publish("quiet", exchange=queue.exchange, routing_key="work")
            assert conn.default_channel.basic_get("fan1", no_ack=True) is not None
            assert delta(before, snapshot()) == {}
        finally:
            metrics.set_enabled(True)


# -- scrape-time gauges against SQL truth -----------------------------------------------------


def truth(pg_conn, schema: str, max_deliveries: int) -> dict[str, dict]:
    """Per queue, straight from the messages table (independent of queue_stats)."""
    rows = pg_conn.execute(sql.SQL("""
        SELECT queue,
               count(*) FILTER (WHERE lock_token IS NULL AND visible_at IS NULL AND delivery_count < %(m)s),
               count(*) FILTER (WHERE lock_token IS NOT NULL),
               count(*) FILTER (WHERE lock_token IS NULL AND visible_at IS NOT NULL),
               count(*) FILTER (WHERE lock_token IS NULL AND delivery_count >= %(m)s),
               count(DISTINCT serial_key) FILTER (WHERE lock_token IS NOT NULL)
        FROM {}.messages GROUP BY queue""").format(sql.Identifier(schema)), {"m": max_deliveries}).fetchall()
    return {q: dict(zip(("ready", "in_flight", "delayed", "poison", "keys"), vals)) for q, *vals in rows}


def test_gauges_match_sql_truth(store, pg_conn, pg_url, schema):
    cid = store.register_consumer()
    for i in range(4):
        store.publish("tasks", f"plain{i}")
    for key in ("a", "a", "b"):
        store.publish("tasks", f"keyed-{key}", serial_key=key)
    in_flight = store.claim("tasks", 3, cid, max_deliveries=2)  # heads of a and b, one plain
    store.publish("tasks", "later", visible_at=datetime.now(timezone.utc) + timedelta(hours=1))
    store.publish("bad", "poison")
    [poison] = store.claim("bad", 1, cid, max_deliveries=2)
    store.requeue([poison.token])
    [poison] = store.claim("bad", 1, cid, max_deliveries=2)
    store.requeue([poison.token])  # delivered twice: poison at max_deliveries=2
    store.declare_queue("quiet")
    store.declare_queue("c1.reply.celery.pidbox", auto_delete=True, expires_ms=10_000)
    store.publish("c1.reply.celery.pidbox", "reply")
    store.declare_queue("celeryev.x", auto_delete=True, expires_ms=60_000)
    store.publish("celeryev.x", "event")

    registry = CollectorRegistry()
    registry.register(BrokerCollector(pg_url, schema, max_deliveries=2))
    found = samples(registry)
    expected = truth(pg_conn, schema, 2)
    assert (len(in_flight), expected["tasks"]) == (3, dict(ready=4, in_flight=3, delayed=1, poison=0, keys=2))
    assert expected["bad"] == dict(ready=0, in_flight=0, delayed=0, poison=1, keys=0)
    temporary = {k: expected["c1.reply.celery.pidbox"][k] + expected["celeryev.x"][k] for k in expected["bad"]}
    for label, want in [("tasks", expected["tasks"]), ("bad", expected["bad"]), (TEMPORARY_QUEUE, temporary),
                        ("quiet", dict(ready=0, in_flight=0, delayed=0, poison=0, keys=0))]:
        got = {name: value(found, f"kombu_pg_queue_{metric}", queue=label) for name, metric in [
            ("ready", "ready_messages"), ("in_flight", "in_flight_messages"), ("delayed", "delayed_messages"),
            ("poison", "poison_messages"), ("keys", "serial_keys_in_flight")]}
        assert got == want, label
    assert value(found, "kombu_pg_queue_serial_keys_waiting", queue="tasks") == 1  # a's second message
    assert value(found, "kombu_pg_queue_consumers_holding", queue="tasks") == 1
    assert {dict(labels)["queue"] for name, labels in found if name == "kombu_pg_queue_ready_messages"} == {
        "tasks", "bad", "quiet", TEMPORARY_QUEUE}

    oldest = pg_conn.execute(sql.SQL(
        "SELECT extract(epoch FROM now() - min(created_at)) FROM {}.messages WHERE queue = 'tasks'"
        " AND lock_token IS NULL AND visible_at IS NULL").format(sql.Identifier(schema))).fetchone()[0]
    assert 0 < value(found, "kombu_pg_queue_oldest_ready_age_seconds", queue="tasks") <= float(oldest)
    assert value(found, "kombu_pg_queue_oldest_ready_age_seconds", queue="bad") == 0  # only poison there
    consumers = pg_conn.execute(sql.SQL("SELECT count(*) FROM {}.consumers").format(sql.Identifier(schema))
                                ).fetchone()[0]
    assert value(found, "kombu_pg_consumers") == consumers == 1
    assert value(found, "kombu_pg_scrape_ok", part="broker") == 1

    # Past max_queues, the quietest queues are summed as (other); temporary ones stay apart.
    registry = CollectorRegistry()
    registry.register(BrokerCollector(pg_url, schema, max_deliveries=2, max_queues=1))
    found = samples(registry)
    assert {dict(labels)["queue"]: v for (name, labels), v in found.items()
            if name == "kombu_pg_queue_in_flight_messages"} == {"tasks": 3, OTHER_QUEUE: 0, TEMPORARY_QUEUE: 0}
    assert value(found, "kombu_pg_queue_poison_messages", queue=OTHER_QUEUE) == 1


def test_unreachable_database_reports_scrape_not_ok(schema):
    registry = CollectorRegistry()
    registry.register(BrokerCollector("postgresql://postgres@127.0.0.1:1/x?connect_timeout=2", schema))
    found = samples(registry)
    assert {name for name, _ in found} == {"kombu_pg_scrape_ok", "kombu_pg_scrape_duration_seconds",
                                          "kombu_pg_scrape_age_seconds"}
    assert value(found, "kombu_pg_scrape_ok", part="broker") == 0


def test_a_scrape_blocked_in_the_database_is_cut_at_the_scrape_timeout(pg_url, schema):
    """A scrape whose query cannot finish (here: the table is locked) answers by the
    timeout, with scrape_ok 0, instead of hanging the exporter (and Prometheus)."""
    conn = connect(pg_url)
    apply_migrations(conn, schema)
    BrokerStore(conn, schema).publish("q", "x")
    registry = CollectorRegistry()
    registry.register(BrokerCollector(pg_url, schema, scrape_timeout=0.5, min_interval=0))
    locker = psycopg.connect(pg_url)
    locker.execute(sql.SQL("LOCK TABLE {}.messages IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(schema)))
    done: list[dict] = []
    scrape = threading.Thread(target=lambda: done.append(samples(registry)), daemon=True)
    try:
        scrape.start()
        scrape.join(30)
        finished = not scrape.is_alive()
    finally:
        locker.rollback()  # lets a scrape without a timeout finish, so the test can fail
        locker.close()
        scrape.join(30)
    assert finished, "the scrape waited on the lock instead of timing out"
    assert value(done[0], "kombu_pg_scrape_ok", part="broker") == 0
    assert 0.5 <= value(done[0], "kombu_pg_scrape_duration_seconds", part="broker") < 30
    # The lock is gone: the next scrape reads the queue again on a fresh session.
    found = samples(registry)
    assert value(found, "kombu_pg_scrape_ok", part="broker") == 1
    assert value(found, "kombu_pg_queue_ready_messages", queue="q") == 1
    conn.close()


def test_readings_are_reused_for_the_minimum_interval(pg_url, schema):
    """However many scrapers, each part queries the database once per min_interval."""
    conn = connect(pg_url)
    apply_migrations(conn, schema)
    store = BrokerStore(conn, schema)
    store.publish("q", "x")
    cached, fresh = CollectorRegistry(), CollectorRegistry()
    cached.register(BrokerCollector(pg_url, schema, min_interval=3600))
    fresh.register(BrokerCollector(pg_url, schema, min_interval=0))
    assert value(samples(cached), "kombu_pg_queue_ready_messages", queue="q") == 1
    assert value(samples(fresh), "kombu_pg_queue_ready_messages", queue="q") == 1
    store.publish("q", "y")
    again = samples(cached)
    assert value(again, "kombu_pg_queue_ready_messages", queue="q") == 1  # the first reading
    assert value(again, "kombu_pg_scrape_age_seconds", part="broker") > 0
    assert value(samples(fresh), "kombu_pg_queue_ready_messages", queue="q") == 2
    conn.close()


def test_the_exporter_listens_on_loopback_unless_told_otherwise(pg_url, schema):
    server, _ = metrics.start_http_server(0, conninfo=pg_url, schema=schema, events=False)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    default = CliRunner().invoke(pg, ["metrics", "--help"])
    assert "--addr TEXT" in default.output and "[default: 127.0.0.1]" in default.output


def test_result_gauges_count_results_by_state(pg_url, pg_conn, schema):
    app = Celery("results", broker=pg_url, backend=pg_url, set_as_current=False)
    app.conf.result_backend_transport_options = {"schema": schema}
    backend = app.backend
    for i in range(3):
        backend.mark_as_done(f"ok-{i}", i)
    backend.mark_as_failure("bad-1", ValueError("boom"))
    backend.store_result("custom-1", {"done": 1}, "PROGRESS")  # a custom state: free text
    backend.store_result("started-1", None, states.STARTED)
    collector = ResultCollector.for_app(app)
    registry = CollectorRegistry()
    registry.register(collector)
    found = samples(registry)
    rows = dict(pg_conn.execute(sql.SQL("SELECT status, count(*) FROM {}.results GROUP BY status").format(
        sql.Identifier(schema))).fetchall())
    assert rows == {"SUCCESS": 3, "FAILURE": 1, "PROGRESS": 1, "STARTED": 1}
    assert {dict(labels)["state"]: v for (name, labels), v in found.items() if name == "kombu_pg_results"} == {
        states.SUCCESS: 3, states.FAILURE: 1, states.STARTED: 1, OTHER_STATE: 1}
    assert value(found, "kombu_pg_results_expired") == pg_conn.execute(sql.SQL(
        "SELECT count(*) FROM {}.results WHERE expires_at <= now()").format(sql.Identifier(schema))).fetchone()[0]
    assert value(found, "kombu_pg_chords_pending") == 0
    assert value(found, "kombu_pg_scrape_ok", part="results") == 1
    # Without an app (`kombu-pg --url ... metrics`), results are read from the broker's schema.
    found = samples(metrics.build_registry(conninfo=pg_url, schema=schema, events=False))
    assert value(found, "kombu_pg_results", state="SUCCESS") == 3
    assert value(found, "kombu_pg_scrape_ok", part="broker") == 1
    # Both parts report kombu_pg_scrape_*: one family each, as the exposition format wants.
    text = generate_latest(metrics.build_registry(conninfo=pg_url, schema=schema, events=False)).decode()
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), types
    assert value(samples(text), "kombu_pg_scrape_ok", part="results") == 1
    # Not a kombu-pg backend: nothing to collect.
    assert ResultCollector.for_app(Celery("x", backend="cache+memory://", set_as_current=False)) is None


def test_label_sets_are_bounded(pg_url, schema):
    """Every label name and value the registry can produce comes from a fixed set; serial
    keys, task ids and payloads never appear."""
    app = Celery("bounded", broker=pg_url, backend=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    app.conf.result_backend_transport_options = {"schema": schema}
    with app.connection_for_write() as conn:
        conn.connect()
        producer = Producer(conn.default_channel)
        queue = Queue("bounded", Exchange("bounded", "direct"), "bounded")
        producer.publish("secret-payload", exchange=queue.exchange, routing_key="bounded", declare=[queue],
                         headers={"serial_key": "secret-key"})
        app.backend.store_result("secret-task-id", 1, "SECRET-STATE")
        found = samples(metrics.build_registry(app))
    allowed_labels = {
        "kombu_pg_messages_published_total": {"kind"}, "kombu_pg_messages_delivered_total": {"kind"},
        "kombu_pg_messages_acked_total": {"kind"}, "kombu_pg_messages_redelivered_total": {"kind"},
        "kombu_pg_messages_superseded_total": {"kind"},
        "kombu_pg_messages_rejected_total": {"kind", "requeue"},
        "kombu_pg_results": {"state"}, "kombu_pg_scrape_ok": {"part"},
        "kombu_pg_scrape_duration_seconds": {"part"}, "kombu_pg_scrape_age_seconds": {"part"},
        "kombu_pg_poison_messages_deleted_total": {"reason"},
        "kombu_pg_beat_ticks_total": {"outcome"},
    }
    ours = {(name, labels): v for (name, labels), v in found.items() if name.startswith("kombu_pg_")}
    assert ("kombu_pg_queue_ready_messages", frozenset({("queue", "bounded")})) in ours
    for (name, labels), _ in ours.items():
        keys = {k for k, _ in labels}
        if name.startswith("kombu_pg_queue_"):
            assert keys == {"queue"}, name
        elif name.startswith(("kombu_pg_publish_duration", "kombu_pg_claim_duration")):
            assert keys <= {"le"}, name
        elif name.endswith("_created"):
            continue
        else:
            assert keys == allowed_labels.get(name, set()), name
    values = {(k, v) for _, labels in ours for k, v in labels}
    assert {v for k, v in values if k == "kind"} <= set(KINDS)
    assert {v for k, v in values if k == "requeue"} <= {"true", "false"}
    assert {v for k, v in values if k == "part"} <= {"broker", "results"}
    assert {v for k, v in values if k == "reason"} <= set(metrics.DELETIONS)
    assert {v for k, v in values if k == "state"} <= set(states.ALL_STATES) | {OTHER_STATE}
    assert {v for k, v in values if k == "queue"} == {"bounded"}
    text = repr(found)
    assert "secret" not in text.lower()


def test_start_http_server_in_process(pg_url, schema):
    """What a worker_init handler does: serve this process's counters and the gauges."""
    app = Celery("inproc", broker=pg_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    with app.connection_for_write() as conn:
        conn.connect()
        Producer(conn.default_channel).publish("x", routing_key="inproc", declare=[Queue("inproc")])
    server, thread = metrics.start_http_server(0, "127.0.0.1", app=app)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            found = samples(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    assert value(found, "kombu_pg_queue_ready_messages", queue="inproc") == 1
    assert value(found, "kombu_pg_messages_published_total", kind="parallel") == counter("published", kind="parallel")
    assert value(found, "kombu_pg_messages_published_total", kind="parallel") >= 1
    assert ("kombu_pg_results", frozenset({("state", "SUCCESS")})) not in found  # no kombu-pg backend


# -- the exporter command and prefork multiprocess mode ------------------------------------


class Exporter:
    """`celery -A metrics_app pg metrics --port 0` in a subprocess; knows its port."""

    def __init__(self, env: dict, *args: str) -> None:
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "metrics_app", "pg", "metrics", "--port", "0",
             "--addr", "127.0.0.1", *args],
            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=TESTS_DIR)
        self.lines: list[str] = []
        self.port: int | None = None
        self._serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._serving.wait(30) or self.port is None:
            self.stop()
            raise AssertionError("exporter did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "serving http://" in line:
                self.port = int(line.split("serving http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                self._serving.set()
        self._serving.set()

    def scrape(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            assert response.status == 200
            return samples(response.read().decode())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def app_env(tmp_path, pg_url, schema):
    (tmp_path / "metrics_app.py").write_text(APP_MODULE)
    return {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema, "PYTHONPATH": str(tmp_path)}


def test_exporter_command_serves_metrics_over_http(app_env, pg_url, pg_conn, schema):
    conn = connect(pg_url)
    apply_migrations(conn, schema)
    store = BrokerStore(conn, schema)
    for i in range(3):
        store.publish("reports", f"r{i}", serial_key="k" if i else None)
    cid = store.register_consumer()
    store.claim("reports", 1, cid)
    exporter = Exporter({**app_env, "METRICS_DLQ": "1"}, "--min-interval", "0")
    try:
        found = exporter.scrape()
        expected = truth(pg_conn, schema, 10)["reports"]
        assert value(found, "kombu_pg_queue_ready_messages", queue="reports") == expected["ready"] == 2
        assert value(found, "kombu_pg_queue_in_flight_messages", queue="reports") == expected["in_flight"] == 1
        assert value(found, "kombu_pg_consumers") == 1
        assert value(found, "kombu_pg_scrape_ok", part="broker") == 1
        assert value(found, "kombu_pg_scrape_ok", part="results") == 1  # the app's kombu-pg backend
        assert value(found, "celery_dlq_scrape_ok") == 1  # the app installs celery_dlq
        # With --min-interval 0, gauges are read at every scrape: a new message shows at once.
        store.publish("reports", "r3")
        assert value(exporter.scrape(), "kombu_pg_queue_ready_messages", queue="reports") == 3
    finally:
        assert exporter.stop() == 0, "".join(exporter.lines)
        conn.close()


def test_prefork_children_counters_reach_the_exporter(app_env, tmp_path, pg_url, pg_conn, schema):
    """Tasks publish from pool children; with PROMETHEUS_MULTIPROC_DIR the exporter (another
    process) serves exact totals: children's publishes plus the main process's claims/acks."""
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = {**app_env, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    apply_migrations(pg_conn, schema)
    client = Celery("client", broker=pg_url, backend=pg_url, set_as_current=False)
    client.conf.broker_transport_options = {"schema": schema}
    client.conf.result_backend_transport_options = {"schema": schema}
    roots, parallel, serial = 6, 3, 2
    with CeleryWorker("metrics_app", env, pool="prefork", concurrency=2) as worker:
        worker.wait_ready()
        results = [client.send_task("metrics_app.fan", (parallel, serial)) for _ in range(roots)]
        pids = {r.get(timeout=30) for r in results}
        assert worker.proc.pid not in pids  # the publishes happened in pool children
        sink = sql.SQL("SELECT count(*), count(serial_key) FROM {}.messages WHERE queue = 'sink'").format(
            sql.Identifier(schema))
        assert pg_conn.execute(sink).fetchone() == (roots * (parallel + serial), roots * serial)
        exporter = Exporter(env)
        try:
            # Acks are counted when the main process acks; results arrive first, so poll.
            wait_until(lambda: value(exporter.scrape(), "kombu_pg_messages_acked_total", kind="parallel") == roots,
                       10, "acks of the root tasks")
            found = exporter.scrape()
        finally:
            assert exporter.stop() == 0, "".join(exporter.lines)
    assert value(found, "kombu_pg_messages_published_total", kind="parallel") == roots * parallel
    assert value(found, "kombu_pg_messages_published_total", kind="serial") == roots * serial
    # Statements, not messages: the worker's heartbeat events (routed to no queue) add a few.
    assert value(found, "kombu_pg_publish_duration_seconds_count") >= roots * (parallel + serial)
    assert value(found, "kombu_pg_messages_delivered_total", kind="parallel") == roots
    assert value(found, "kombu_pg_messages_delivered_total", kind="serial") == 0
    assert value(found, "kombu_pg_queue_ready_messages", queue="sink") == roots * (parallel + serial)
    assert value(found, "kombu_pg_results", state="SUCCESS") == roots


def test_bad_multiprocess_dir_disables_metrics_instead_of_breaking_the_transport(tmp_path):
    code = ("import kombu_pg.transport, kombu_pg.metrics as m; "
            "m.published(False, 0.001); m.claimed([], 0.001); print('enabled', m.enabled())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "enabled False"
    assert "kombu-pg metrics disabled" in result.stderr
