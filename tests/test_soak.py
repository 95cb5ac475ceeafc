"""The chaos soak (issue 16, item 17): every kind of message, every kind of fault, at once.

For ``KOMBU_PG_SOAK_SECONDS`` seconds (skipped when unset or 0), producer threads publish a
random mix through real Celery producers — plain, priority, delayed (countdown/eta, with
and without native delayed delivery), serial-keyed, job-keyed (``kombu_pg.jobs.enqueue``),
routed through named direct/topic/fanout exchanges, bulk (``send_many`` and Kombu's
``Producer.batch()``), and failing ones (to the DLQ) — into three real ``celery worker``s
(prefork and threads pools), while the fault loop SIGKILLs and restarts workers, ends
worker and producer sessions with ``pg_terminate_backend``, restarts the (private,
embedded) PostgreSQL server and requeues DLQ entries.  Then the faults stop and the
invariants of ``soak_support.check`` are checked; the report is printed (``-s``).

``KOMBU_PG_SOAK_SEED`` replays a run's choices (the schedule of faults and publishes;
timing still differs); ``KOMBU_PG_SOAK_WITHOUT=job,fail`` leaves kinds out.  Tasks log to
the test server, which is never restarted; every worker's output is saved for a failure.

    KOMBU_PG_SOAK_SECONDS=600 .venv/bin/python -m pytest tests/test_soak.py -s
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from psycopg import sql

import celery_dlq
from kombu_pg.bulk import send_many
from kombu_pg.embedded import EmbeddedPostgres
from kombu_pg.jobs import enqueue

from . import soak_support as soak
from .chaos_util import wait_until
from .test_chaos_restart import RETRY_POLICY, broker, log, server  # noqa: F401  (fixtures)
from .test_chaos_worker import with_app_name
from .worker import CeleryWorker

SECONDS = float(os.environ.get("KOMBU_PG_SOAK_SECONDS") or 0)
RECOVERY_INTERVAL = 1.0
MAX_DELAY = 3.0  # the longest countdown/eta published
BACKLOG = 300  # producers wait while more messages than this are queued: the drain stays short
MAX_DELIVERIES = 10  # kombu-pg's default, explicit: the soak reaps poison messages itself
# After the faults stop and every worker is ready: recovery passes run every
# RECOVERY_INTERVAL on each consuming connection, so no message may stay locked by a dead
# consumer for more than a few of them; the backlog (delays included) must drain by DRAIN_BOUND.
STALE_LOCK_BOUND = 10 * RECOVERY_INTERVAL
DRAIN_BOUND = MAX_DELAY + 60 * RECOVERY_INTERVAL
WORKERS = [  # (group, pool, concurrency, queues): the group letter starts the hostname
    ("a", "prefork", 2, soak.COMMON_QUEUES + ["soak.fan1"]),
    ("b", "threads", 3, soak.COMMON_QUEUES + ["soak.fan2"]),
    ("c", "threads", 2, soak.COMMON_QUEUES),
]
# What a publish may raise when its session ends or the server restarts: a caller can retry these.
CONNECTION_ERRORS = (KombuOperationalError, psycopg.OperationalError, ConnectionError)
KINDS = {  # kind: weight
    "plain": 6, "priority": 4, "countdown": 3, "eta": 2, "serial": 5, "job": 5, "direct": 2,
    "topic": 2, "fanout": 2, "send_many": 2, "kombu_batch": 2, "fail": 1,
}
# KOMBU_PG_SOAK_WITHOUT=job,fail leaves kinds out: to look past a known bug one kind triggers.
for _kind in filter(None, os.environ.get("KOMBU_PG_SOAK_WITHOUT", "").split(",")):
    del KINDS[_kind]


class Fleet:
    """The workers, supervised: a killed or crashed worker is replaced by a new incarnation
    (a new hostname, so every run names the process life it belongs to)."""

    def __init__(self, env: dict, broker_url: str, faults: list[soak.Fault]) -> None:
        self.env, self.broker_url, self.faults = env, broker_url, faults
        self.workers: dict[str, CeleryWorker] = {}
        self.every: list[tuple[str, CeleryWorker]] = []  # (hostname, worker) of every incarnation
        self.incarnation: dict[str, int] = {}
        self.crash_output: list[str] = []
        self.specs = {w[0]: w for w in WORKERS}
        for group in self.specs:
            self.start(group)

    def hostname(self, group: str) -> str:
        return f"{group}{self.incarnation[group]}@soak"

    def app_name(self, group: str) -> str:
        return f"soak_w_{group}{self.incarnation[group]}"

    def start(self, group: str) -> None:
        _, pool, concurrency, queues = self.specs[group]
        self.incarnation[group] = self.incarnation.get(group, 0) + 1
        env = {**self.env, "KOMBU_PG_URL": with_app_name(self.broker_url, self.app_name(group))}
        self.workers[group] = CeleryWorker("soak_app", env, pool=pool, concurrency=concurrency,
                                           hostname=self.hostname(group), args=["-Q", ",".join(queues)])
        self.every.append((self.hostname(group), self.workers[group]))

    def kill(self, group: str) -> None:
        worker = self.workers[group]
        self.faults.append(soak.Fault("kill", time.time(), frozenset({self.hostname(group)})))
        worker.kill(signal.SIGKILL)
        worker.stop(10)
        self.start(group)

    def replace_crashed(self) -> None:
        for group, worker in list(self.workers.items()):
            if worker.proc.poll() is not None:
                self.faults.append(soak.Fault("crash", time.time(), frozenset({self.hostname(group)})))
                self.crash_output.append(worker.output())
                self.start(group)

    def wait_ready(self) -> None:
        for worker in self.workers.values():
            worker.wait_ready(120)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.kill(signal.SIGKILL)
            worker.stop(10)

    def superseded(self) -> set[str]:
        """Task ids an unlock in some worker superseded (see soak.superseded_ids)."""
        return soak.superseded_ids(line for _, worker in self.every for line in worker.lines)

    def save_logs(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for hostname, worker in self.every:
            (directory / f"{hostname}.log").write_text("".join(worker.lines))


class Broker:
    """The soak's own session on the broker server, reopened after a restart or a failure."""

    def __init__(self, url: str, schema: str) -> None:
        self.url, self.schema = url, schema
        self.conn: psycopg.Connection | None = None
        self.lock = threading.Lock()

    def query(self, text: str, params: tuple = ()) -> list[tuple]:
        return [tuple(row.values()) for row in self.dicts(text, params)]

    def dicts(self, text: str, params: tuple = ()) -> list[dict]:
        """``text`` with ``{s}`` for the schema; an ended session is reopened on the next call."""
        with self.lock:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.url, autocommit=True, application_name="soak_monitor")
            try:
                cur = self.conn.execute(sql.SQL(text).format(s=sql.Identifier(self.schema)), params)
            except psycopg.OperationalError:
                self.conn.close()
                raise
            return [dict(zip([c.name for c in cur.description], row)) for row in cur] if cur.description else []


MESSAGES = ("SELECT id, queue, delivery_count, locked_by, payload::json->'headers'->>'id' AS task_id"
            " FROM {s}.messages WHERE {where} ORDER BY id")
# Locked by a consumer whose registration or session is gone: only recovery unlocks it.
DEAD_LOCK = ("lock_token IS NOT NULL AND locked_by NOT IN (SELECT c.id FROM {s}.consumers c"
             " JOIN pg_stat_activity a ON a.pid = c.backend_pid)")
JOB_DUPLICATES = ("SELECT job_key, count(*) FROM {s}.messages WHERE job_key IS NOT NULL AND lock_token IS NULL"
                  " GROUP BY job_key HAVING count(*) > 1")
# The reaper moves a message with one DELETE ... INSERT: its id is never in both places.
REAPED_AND_QUEUED = ("SELECT d.id AS dlq_id, m.id AS message_id FROM {s}.dlq d"
                     " JOIN {s}.messages m ON m.id = d.broker_message_id WHERE d.source = 'reaper'")


def messages(db: Broker, where: str = "true", params: tuple = ()) -> list[dict]:
    return db.dicts(MESSAGES.replace("{where}", where), params)


class Producer(threading.Thread):
    """Publishes a random mix until stopped, recording each task id and what its publish said."""

    def __init__(self, index: int, broker_url: str, schema: str, seed: int, stop: threading.Event,
                 room: threading.Event) -> None:
        super().__init__(daemon=True, name=f"soak_p{index}")
        self.rng = random.Random(seed)
        self.stop, self.room = stop, room
        self.app = Celery(f"soak_p{index}", broker=with_app_name(broker_url, f"soak_p{index}"),
                          set_as_current=False)
        # Half the producers keep ETAs in the database, half hand them to worker memory.
        self.app.conf.broker_transport_options = {
            "schema": schema, "native_delayed_delivery": index % 2 == 0}
        self.app.conf.task_queues = soak.QUEUES
        self.published: list[soak.Publish] = []
        self.errors: Counter[str] = Counter()  # publish errors by kind and type
        self.unexpected: list[str] = []  # ... that are not connection errors: examples

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def run(self) -> None:
        kinds, weights = zip(*KINDS.items())
        n = 0
        while not self.stop.is_set():
            self.room.wait(1)  # backpressure (set by the sampler); a server restart blocks it
            kind = self.rng.choices(kinds, weights)[0]
            n += 1
            try:
                self.publish(kind, f"{self.name}-{n}")
            except Exception as exc:  # the outcome is recorded per task id
                self.errors[f"{kind} {type(exc).__name__}"] += 1
                if not isinstance(exc, CONNECTION_ERRORS) and len(self.unexpected) < 20:
                    self.unexpected.append(f"{kind}: {exc!r}")
            time.sleep(0.01)  # load shaping: a steady stream rather than a burst

    def seconds(self) -> float:
        return self.rng.choice([0, 0, 0.01, 0.05, 0.2])

    def record(self, ids: list[str], kind: str, started: float, committed: bool, **extra) -> None:
        done = time.time()
        self.published += [soak.Publish(i, kind, started, done, committed, **extra) for i in ids]

    def publish(self, kind: str, arg: str) -> None:
        rng, app = self.rng, self.app
        task_id = self.new_id()
        kwargs = {"seconds": self.seconds()}
        options: dict = {"task_id": task_id, "retry": True, "retry_policy": RETRY_POLICY, "declare": []}
        extra: dict = {}
        if kind == "priority":
            options["priority"] = rng.randint(0, 9)
        elif kind == "countdown":
            options["countdown"] = rng.uniform(0.1, MAX_DELAY)
        elif kind == "eta":
            options["eta"] = datetime.now(timezone.utc) + timedelta(seconds=rng.uniform(0.1, MAX_DELAY))
        elif kind == "serial":
            extra["serial_key"] = f"s{rng.randint(0, 5)}"
            options["headers"] = {"serial_key": extra["serial_key"]}
            # Some runs outlast a recovery pass, so a fault mid-run can hand the key on
            # while the old run goes on (the excused overlap) and the check sees real overlaps.
            kwargs["seconds"] = rng.choice([kwargs["seconds"], 1.5 * RECOVERY_INTERVAL])
        elif kind in ("direct", "topic", "fanout"):
            options["exchange"] = f"soak.{kind}"
            # Not empty for the fanout: Celery sends an empty key to the default queue instead.
            options["routing_key"] = {"direct": "direct", "topic": f"soak.{rng.randint(0, 3)}", "fanout": "any"}[kind]
            if kind == "fanout":
                extra["groups"] = tuple(sorted(soak.FANOUT_GROUPS.values()))
        elif kind == "fail":
            kwargs["fail"] = extra["fail"] = True
        elif kind == "job":
            return self.publish_job(task_id, arg, kwargs, options)
        elif kind in ("send_many", "kombu_batch"):
            return self.publish_bulk(kind, arg)
        started = time.time()
        committed = False
        try:
            app.send_task("soak.work", (arg,), kwargs, **options)
            committed = True
        finally:
            self.record([task_id], kind, started, committed, **extra)

    def publish_job(self, task_id: str, arg: str, kwargs: dict, options: dict) -> None:
        rng = self.rng
        key, mode = f"j{rng.randint(0, 7)}", rng.choice(["replace", "keep", "preserve_eta"])
        extra: dict = {"job_key": key, "job_mode": mode}
        if rng.random() < 0.5:
            options["countdown"] = rng.uniform(0.2, MAX_DELAY)  # so that it waits and gets replaced
        if rng.random() < 0.3:
            extra["serial_key"] = f"s{rng.randint(0, 5)}"
            options["headers"] = {"serial_key": extra["serial_key"]}
        started = time.time()
        committed = False
        try:
            result = enqueue(self.app.signature("soak.work", (arg,), kwargs), key, mode=mode, app=self.app,
                             **options)
            extra["outcome"] = result.outcome.value.lower()
            extra["replaced"] = result.replaced_task_id
            committed = True
        finally:
            self.record([task_id], "job", started, committed, **extra)

    def publish_bulk(self, kind: str, arg: str) -> None:
        rng, app = self.rng, self.app
        size = rng.randint(2, 10)
        # Per-message due times: send_many writes those through apply_async, in the same transaction.
        delay = {"countdown": rng.uniform(0.1, MAX_DELAY)} if rng.random() < 0.3 else {}
        ids = [self.new_id() for _ in range(size)]
        serial = [f"s{rng.randint(0, 5)}" if rng.random() < 0.2 else None for _ in ids]
        started = time.time()
        committed = False
        try:
            if kind == "send_many":
                send_many([app.signature("soak.work", (f"{arg}.{i}",), {"seconds": self.seconds()}, task_id=t,
                                         headers={"serial_key": s} if s else None)
                           for i, (t, s) in enumerate(zip(ids, serial))], app=app, **delay)
            else:
                with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
                    for i, (t, s) in enumerate(zip(ids, serial)):
                        # No publish retry: nothing reaches the database before the block exits.
                        app.send_task("soak.work", (f"{arg}.{i}",), {"seconds": self.seconds()}, task_id=t,
                                      producer=producer, declare=[], retry=False,
                                      headers={"serial_key": s} if s else None, **delay)
            committed = True
        finally:
            done = time.time()
            self.published += [soak.Publish(t, kind, started, done, committed, serial_key=s, batch=arg)
                               for t, s in zip(ids, serial)]


def declare_topology(broker_url: str, schema: str) -> None:
    """Every queue and binding exists before the first publish (a fanout copy for a queue
    that is not bound yet would be dropped, by design)."""
    app = Celery("soak_declare", broker=broker_url, set_as_current=False)
    app.conf.broker_transport_options = {"schema": schema}
    with app.connection_for_write() as conn:
        for queue in soak.QUEUES:
            queue(conn.default_channel).declare()
    app.close()


def run_faults(rng: random.Random, until: float, fleet: Fleet, db: Broker, embedded: EmbeddedPostgres,
               producers: list[Producer], dlq: celery_dlq.DLQ, faults: list[soak.Fault], requeued: list[str]) -> None:
    actions = {"kill": 4, "terminate_worker": 3, "terminate_producer": 2, "restart": 1, "requeue_dlq": 2}
    names, weights = zip(*actions.items())
    while time.time() < until:
        time.sleep(rng.uniform(1.0, 4.0))  # the fault schedule itself, not a synchronisation
        fleet.replace_crashed()
        action = rng.choices(names, weights)[0]
        try:
            if action == "kill":
                fleet.kill(rng.choice(sorted(fleet.workers)))
            elif action == "terminate_worker":
                group = rng.choice(sorted(fleet.workers))
                faults.append(soak.Fault("terminate", time.time(), frozenset({fleet.hostname(group)})))
                db.query("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = %s",
                         (fleet.app_name(group),))
            elif action == "terminate_producer":
                name = rng.choice(producers).name
                faults.append(soak.Fault("terminate_producer", time.time(), frozenset()))
                db.query("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = %s",
                         (name,))
            elif action == "restart":
                faults.append(soak.Fault("restart", time.time()))
                embedded.restart()
            else:
                dead = [r[0] for r in db.query("SELECT id FROM {s}.dlq WHERE status = 'dead' ORDER BY id")]
                if dead:
                    target = rng.choice(dead)
                    requeued += [r[0] for r in db.query("SELECT task_id FROM {s}.dlq WHERE id = %s", (target,))]
                    dlq.requeue(ids=[target], note="soak")
        except Exception as exc:  # a fault during a fault (e.g. the server is restarting)
            faults.append(soak.Fault(f"error in {action}: {type(exc).__name__}", time.time(), frozenset()))


class Sampler(threading.Thread):
    """Samples the job-key and reaper invariants in SQL while the soak runs, and opens
    ``room`` for the producers while the backlog is under BACKLOG."""

    def __init__(self, db: Broker, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.db, self.stop = db, stop
        self.room = threading.Event()
        self.job: list[tuple[float, str, int]] = []
        self.reaped: list[tuple[float, int, int]] = []
        self.samples = self.failed = 0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                at = time.time()
                self.job += [(at, k, n) for k, n in self.db.query(JOB_DUPLICATES)]
                self.reaped += [(at, d, m) for d, m in self.db.query(REAPED_AND_QUEUED)]
                if self.db.query("SELECT count(*) FROM {s}.messages")[0][0] < BACKLOG:
                    self.room.set()
                else:
                    self.room.clear()
                self.samples += 1
            except psycopg.Error:
                self.failed += 1  # the server is restarting: nothing to sample


def soak_seed() -> int:
    return int(os.environ.get("KOMBU_PG_SOAK_SEED") or random.SystemRandom().randrange(2**32))


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 600)  # the soak, then at most a few minutes of drain and checks
@pytest.mark.skipif(not SECONDS, reason="the chaos soak runs only with KOMBU_PG_SOAK_SECONDS > 0 "
                                        "(e.g. KOMBU_PG_SOAK_SECONDS=600 for ten minutes)")
def test_chaos_soak(server, broker, log, pg_url, schema):  # noqa: F811  (fixtures)
    seed = soak_seed()
    print(f"\nchaos soak: {SECONDS:.0f} s, KOMBU_PG_SOAK_SEED={seed}")
    rng = random.Random(seed)
    broker_url, broker_schema = broker
    declare_topology(broker_url, broker_schema)
    faults: list[soak.Fault] = []
    requeued: list[str] = []
    env = {"KOMBU_PG_SCHEMA": broker_schema, "CHAOS_LOG_URL": pg_url, "CHAOS_LOG_SCHEMA": schema,
           "RECOVERY_INTERVAL": str(RECOVERY_INTERVAL), "MAX_DELIVERIES": str(MAX_DELIVERIES),
           "PREFETCH_MULTIPLIER": "2"}
    db = Broker(broker_url, broker_schema)
    stop = threading.Event()
    sampler = Sampler(db, stop)
    producers = [Producer(i, broker_url, broker_schema, rng.randrange(2**32), stop, sampler.room) for i in range(2)]
    dlq_app = Celery("soak_dlq", broker=with_app_name(broker_url, "soak_dlq"), set_as_current=False)
    dlq_app.conf.broker_transport_options = {"schema": broker_schema, "max_deliveries": MAX_DELIVERIES}
    dlq = celery_dlq.DLQ(dlq_app)
    fleet = Fleet(env, broker_url, faults)
    try:
        fleet.wait_ready()
        for thread in [*producers, sampler]:
            thread.start()
        run_faults(rng, time.time() + SECONDS, fleet, db, server, producers, dlq, faults, requeued)
        stop.set()
        for thread in [*producers, sampler]:
            thread.join(120)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        published = [p for producer in producers for p in producer.published]
        required, _, _ = soak.required_ids(published)
        fleet.replace_crashed()
        fleet.wait_ready()

        # Recovery never stalls: stale locks go within STALE_LOCK_BOUND, the backlog drains by DRAIN_BOUND.
        ready = time.time()
        stale: list[dict] = []
        try:
            wait_until(lambda: not messages(db, DEAD_LOCK), timeout=STALE_LOCK_BOUND, what="stale locks")
        except AssertionError:
            stale = messages(db, DEAD_LOCK)

        timeline: list[str] = []  # what was left, every few seconds of the drain

        def drained() -> bool:
            fleet.replace_crashed()
            if messages(db, "lock_token IS NULL AND delivery_count >= %s", (MAX_DELIVERIES,)):
                dlq.reap()  # poison from repeated kills: the reaper's job, done here at once
            left = messages(db)
            missing = required - fleet.superseded() - {row.task_id for row in log.rows(phase="end")}
            at = time.time() - ready
            if at >= 5 * len(timeline):
                timeline.append(f"+{at:.0f}s: {len(left)} queued ({sum(m['locked_by'] is not None for m in left)}"
                                f" locked), {len(missing)} not run")
            return not left and not missing

        try:
            wait_until(drained, timeout=DRAIN_BOUND - (time.time() - ready), what="the drain", step=0.5)
            leftover = []
        except AssertionError:
            leftover = messages(db) or [{"id": None, "task_id": None, "queue": None, "delivery_count": None,
                                         "locked_by": None}]  # drained, but too late
        drain_seconds = time.time() - ready
    finally:
        stop.set()
        fleet.stop()
        dlq.close()
        for producer in producers:
            producer.app.close()

    runs = soak.pair_runs((r.task_id, r.phase, r.hostname, r.pid, r.at)
                          for r in log.rows() if r.task == "work")
    dlq_rows = db.dicts("SELECT task_id, status, reason, requeue_count, failure_count FROM {s}.dlq")
    report = soak.check(published, runs, faults, job_samples=sampler.job, reaper_samples=sampler.reaped,
                        dlq_rows=dlq_rows, leftover=leftover, stale_locks=stale, requeued=requeued,
                        superseded=fleet.superseded())
    report.lines.append(f"recovery: drained {drain_seconds:.1f} s after the faults stopped and every "
                        f"worker was ready; worker crashes (exited by themselves) {len(fleet.crash_output)}; "
                        f"SQL samples {sampler.samples} ({sampler.failed} failed during faults); "
                        f"drain: {'; '.join(timeline)}")
    for producer in producers:
        if producer.errors:
            report.lines.append(f"{producer.name} publish errors: {dict(producer.errors)}")
        for example in producer.unexpected:
            report.violate("publish raised a non-connection error", example)
    for output in fleet.crash_output[:2]:
        report.lines.append("crashed worker output (tail):\n" + output[-3000:])
    logs = Path(tempfile.gettempdir()) / f"kombu-pg-soak-{seed}"
    fleet.save_logs(logs)
    print(report.text() + f"\nworker logs: {logs}\nreplay: KOMBU_PG_SOAK_SEED={seed}")
    assert not report.violations, report.text()


# -- the checker can fail: crafted rows, one per invariant ------------------------------


def _pub(task_id: str, kind: str = "plain", at: float = 0.0, committed: bool = True, **extra) -> soak.Publish:
    return soak.Publish(task_id, kind, at, at + 0.01, committed, **extra)


def test_checker_finds_lost_and_unknown_runs_and_counts_duplicates():
    publishes = [_pub("ok"), _pub("lost"), _pub("interrupted"), _pub("raised", committed=False),
                 _pub("fan", "fanout", groups=("a", "b")), _pub("dup")]
    runs = [soak.Run("ok", "a1@soak", 1, 2), soak.Run("interrupted", "b1@soak", 1, None),
            soak.Run("fan", "a1@soak", 1, 2), soak.Run("fan", "c1@soak", 1, 2),
            soak.Run("dup", "a1@soak", 1, 2), soak.Run("dup", "b1@soak", 3, 4), soak.Run("ghost", "a1@soak", 1, 2)]
    report = soak.check(publishes, runs, [])
    assert sorted(report.violations) == ["lost", "run of an unknown task id"]
    assert [e.split()[1] for e in report.violations["lost"]] == ["fan", "interrupted", "lost"]
    assert "(no completed run on b)" in report.violations["lost"][0]
    assert report.violations["run of an unknown task id"] == ["ghost"]
    assert "duplicated task ids 1 (1 extra runs)" in report.text()  # "dup"; a fanout runs once per group
    runs += [soak.Run("fan", "b2@soak", 5, 6)] + [soak.Run(t, "a1@soak", 1, 2) for t in ("lost", "interrupted")]
    assert list(soak.check(publishes, runs, []).violations) == ["run of an unknown task id"]


def test_checker_pairs_runs_per_process_in_log_order():
    rows = [("t", "start", "a1", 1, 1.0), ("t", "start", "b1", 2, 1.5), ("t", "end", "b1", 2, 2.0),
            ("u", "start", "a1", 1, 3.0)]
    assert soak.pair_runs(rows) == [soak.Run("t", "a1", 1.0, None), soak.Run("t", "b1", 1.5, 2.0),
                                    soak.Run("u", "a1", 3.0, None)]


def test_checker_finds_serial_overlap_unless_a_fault_ended_the_first_runs_session():
    publishes = [_pub("x", "serial", serial_key="k"), _pub("y", "serial", serial_key="k"),
                 _pub("z", "serial", serial_key="other")]
    runs = [soak.Run("x", "a1@soak", 1, 5), soak.Run("y", "b1@soak", 4, 6), soak.Run("z", "b1@soak", 2, 3)]
    assert list(soak.check(publishes, runs, []).violations) == ["serial overlap"]
    # Its worker's sessions were terminated before the later run started: excused.
    terminated = soak.Fault("terminate", 3, frozenset({"a1@soak"}))
    assert not soak.check(publishes, runs, [terminated]).violations
    # ... but not a fault on another worker, nor one after the later run started.
    for fault in (soak.Fault("terminate", 3, frozenset({"c1@soak"})), soak.Fault("restart", 4.5)):
        assert list(soak.check(publishes, runs, [fault]).violations) == ["serial overlap"]
    # An interrupted run lasts until its worker was killed, or forever.
    runs[0] = soak.Run("x", "a1@soak", 1, None)
    runs.append(soak.Run("x", "c1@soak", 7, 8))
    assert list(soak.check(publishes, runs, []).violations) == ["serial overlap"]
    assert not soak.check(publishes, runs, [soak.Fault("kill", 3.5, frozenset({"a1@soak"}))]).violations


def test_checker_follows_job_outcomes():
    publishes = [_pub("old", "job", 1, job_key="j", job_mode="replace", outcome="enqueued"),
                 _pub("new", "job", 2, job_key="j", job_mode="replace", outcome="replaced", replaced="old"),
                 _pub("kept", "job", 3, job_key="j", job_mode="keep", outcome="dropped"),
                 _pub("other", "job", 1, job_key="k", job_mode="keep", outcome="enqueued")]
    runs = [soak.Run("new", "a1@soak", 3, 4)]
    required, never, uncertain = soak.required_ids(publishes)
    assert (required, never, uncertain) == ({"new", "other"}, {"kept"}, set())
    assert [e.split()[1] for e in soak.check(publishes, runs, []).violations["lost"]] == ["other"]
    runs += [soak.Run("other", "a1@soak", 3, 4), soak.Run("kept", "b1@soak", 5, 6)]
    assert list(soak.check(publishes, runs, []).violations) == ["dropped job ran"]
    # A replace that raised may have replaced "other"'s key mates committed before it returned.
    publishes.append(_pub("lost-reply", "job", 2, committed=False, job_key="k", job_mode="replace"))
    assert soak.required_ids(publishes)[2] == {"other"}
    # A delivered message unlocked while a newer one of its key waited is superseded by it.
    line = ("[...: WARNING/MainProcess] kombu-pg: task other (job key 'k', queue 'celery') was delivered and "
            "not acked while task w with the same job key was waiting: superseded by it and deleted")
    assert soak.superseded_ids(["unrelated", line]) == {"other"}
    assert "other" not in soak.required_ids(publishes[:-1], superseded={"other"})[0]
    assert not soak.check(publishes[:-1], runs[:1], [], superseded={"other"}).violations


def test_checker_finds_dlq_job_key_and_recovery_violations():
    publishes = [_pub("f", "fail", fail=True), _pub("g", "fail", fail=True), _pub("p"), _pub("poison")]
    runs = [soak.Run(t, "a1@soak", 1, 2) for t in ("f", "g", "p")]
    dlq = [{"task_id": "f", "status": "resolved", "reason": "non_retryable", "requeue_count": 1, "failure_count": 1},
           {"task_id": "poison", "status": "dead", "reason": "max_deliveries", "requeue_count": 0,
            "failure_count": 1}]
    assert list(soak.check(publishes, runs, [], dlq_rows=dlq).violations) == ["failure not in dlq"]
    dlq += [{"task_id": "g", "status": "requeued", "reason": "non_retryable", "requeue_count": 1, "failure_count": 1},
            {"task_id": "p", "status": "dead", "reason": "non_retryable", "requeue_count": 0, "failure_count": 1},
            {"task_id": "nobody", "status": "dead", "reason": "rejected", "requeue_count": 0, "failure_count": 1}]
    message = {"id": 7, "task_id": "p", "queue": "celery", "delivery_count": 3, "locked_by": 99}
    report = soak.check(publishes, runs, [], dlq_rows=dlq, job_samples=[(1.0, "j1", 2)],
                        reaper_samples=[(1.0, 5, 7)], leftover=[message], stale_locks=[message])
    assert sorted(report.violations) == [
        "dlq reason", "dlq row also queued", "dlq row of an unknown task id", "dlq status after drain",
        "locked by a dead consumer", "not drained", "two waiting per job key"]
    assert report.violations["dlq status after drain"] == ["g is requeued (requeues 1, failures 1)"]
    dlq[0]["requeue_count"] = 0  # resolved, but never requeued
    assert list(soak.check(publishes[:1], runs[:1], [], dlq_rows=dlq[:1]).violations) == ["dlq status after drain"]
    assert "VIOLATION not drained: 1, e.g. message 7 (p) queue celery deliveries 3 locked_by 99" in report.text()


def test_checker_finds_a_partial_bulk_publish():
    publishes = [_pub(t, "send_many", batch="b1") for t in ("x", "y")] + [
        _pub(t, "kombu_batch", committed=False, batch="b2") for t in ("u", "v")]
    runs = [soak.Run(t, "a1@soak", 1, 2) for t in ("x", "y", "u", "v")]
    assert not soak.check(publishes, runs, []).violations  # a raised batch that committed: all ran
    report = soak.check(publishes, runs[1:3], [])
    assert sorted(report.violations) == ["bulk publish not all-or-nothing", "lost"]
    assert report.violations["bulk publish not all-or-nothing"] == [
        "send_many b1: 1 of 2 ran (publish returned)", "kombu_batch b2: 1 of 2 ran (publish raised)"]
