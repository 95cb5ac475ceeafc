"""Prometheus metrics for kombu-pg: broker counters and histograms, database gauges.

Two kinds of numbers, kept apart on purpose:

* **Events** (messages published, delivered, acked, rejected, redelivered, poison deleted
  uncaptured; publish and claim latency) are counted where they happen, in the process
  they happen in: the transport calls :func:`published`, :func:`claimed`, :func:`acked`,
  :func:`rejected` and :func:`poison_deleted`.  Under Celery's prefork pool tasks
  publish from pool children while the main process claims and acks, so set
  ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) for the
  children's counts to reach the exporter; see docs/metrics.md.
* **State** (ready, in flight, delayed, poison messages and the oldest ready message
  per queue, serial keys in flight, consumers, results by state) is read from the
  database at scrape time by :class:`BrokerCollector` and :class:`ResultCollector`, so
  it is exact whichever process serves it.  The dead-letter queue's own collector
  (:class:`celery_dlq.metrics.DLQCollector`) is added when the app uses celery_dlq.

Labels are bounded: ``kind`` is ``parallel`` or ``serial`` (the message had a serial
key), ``requeue`` is ``true``/``false``, ``state`` a Celery state or ``other``.  Only the
scrape-time gauges carry ``queue``; temporary queues (auto-delete, exclusive or
x-expires: pidbox, reply and event queues) share the value ``(temporary)`` and queues
beyond ``max_queues`` share ``(other)``.  A task id, serial key or message text is never
a label.

Instrumentation is a no-op when prometheus_client is not installed or when
``KOMBU_PG_METRICS`` is ``0``/``false``/``off`` (or after :func:`set_enabled(False)`).

Serving::

    celery -A proj pg metrics --port 9808            # standalone exporter

    @worker_init.connect                               # or inside the worker
    def metrics(sender=None, **kwargs):
        kombu_pg.metrics.start_http_server(9808, app=sender.app)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import psycopg
from psycopg import sql

from .store import BrokerStore, connect
from .store.connect import ProcessConnection
from .store.broker import SERIAL_KEY_HEADER, Superseded

try:  # prometheus_client is a dependency, but the transport must work without it
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised only where the package is missing
    REGISTRY = CollectorRegistry = Counter = Histogram = GaugeMetricFamily = None  # type: ignore

logger = logging.getLogger(__name__)

KINDS = ("parallel", "serial")
#: What deleted poison messages uncaptured (:func:`poison_deleted`).
DELETIONS = ("expired", "purged", "queue_deleted")
TEMPORARY_QUEUE = "(temporary)"
OTHER_QUEUE = "(other)"
OTHER_STATE = "other"
DEFAULT_MAX_QUEUES = 100
#: Seconds a scrape's query may run (its session's statement_timeout): a scrape must
#: answer within Prometheus' own scrape_timeout (10 s by default), failed or not.
DEFAULT_SCRAPE_TIMEOUT = 5.0
#: Seconds a database reading is reused: however many scrapers (HA pairs, federation,
#: a curl loop), each part queries the database at most once per interval.
DEFAULT_MIN_INTERVAL = 10.0

#: Seconds: a publish or a claim is one statement, usually well under 10 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_enabled = Counter is not None and os.environ.get("KOMBU_PG_METRICS", "1").lower() not in (
    "0", "false", "off", "no")


def _define() -> None:
    global PUBLISHED, DELIVERED, ACKED, REJECTED, REDELIVERED, SUPERSEDED, PUBLISH_SECONDS, CLAIM_SECONDS
    global POISON_DELETED, _published, _delivered, _acked, _redelivered, _superseded, _rejected
    PUBLISHED = Counter("kombu_pg_messages_published", "Messages written to a queue by this "
                        "transport (a routed publish counts once per queue it reached).", ("kind",))
    DELIVERED = Counter("kombu_pg_messages_delivered", "Messages claimed and handed to a consumer.",
                        ("kind",))
    ACKED = Counter("kombu_pg_messages_acked", "Deliveries acknowledged (no-ack deliveries count "
                    "when delivered).", ("kind",))
    REJECTED = Counter("kombu_pg_messages_rejected", "Deliveries rejected, requeued or not.",
                       ("kind", "requeue"))
    REDELIVERED = Counter("kombu_pg_messages_redelivered", "Deliveries of a message delivered "
                          "before (requeued, or recovered from a dead consumer).", ("kind",))
    SUPERSEDED = Counter("kombu_pg_messages_superseded", "Delivered messages deleted when their "
                         "delivery ended without an ack while a message with their job key was "
                         "waiting (docs/job-keys.md).", ("kind",))
    POISON_DELETED = Counter("kombu_pg_poison_messages_deleted", "Poison messages (delivered "
                             "max_deliveries times) deleted without reaching a dead-letter queue "
                             "(celery_dlq not installed), by what deleted them: expired, purged, "
                             "queue_deleted.", ("reason",))
    PUBLISH_SECONDS = Histogram("kombu_pg_publish_duration_seconds",
                                "Time of one publish statement (insert, route, notify).",
                                buckets=LATENCY_BUCKETS)
    CLAIM_SECONDS = Histogram("kombu_pg_claim_duration_seconds",
                              "Time of one claim statement (empty claims included).",
                              buckets=LATENCY_BUCKETS)
    # Children resolved once: the hot paths index a tuple by a bool, no label lookup.
    _published = (PUBLISHED.labels("parallel"), PUBLISHED.labels("serial"))
    _delivered = (DELIVERED.labels("parallel"), DELIVERED.labels("serial"))
    _acked = (ACKED.labels("parallel"), ACKED.labels("serial"))
    _redelivered = (REDELIVERED.labels("parallel"), REDELIVERED.labels("serial"))
    _superseded = (SUPERSEDED.labels("parallel"), SUPERSEDED.labels("serial"))
    _rejected = {(serial, requeue): REJECTED.labels(KINDS[serial], "true" if requeue else "false")
                 for serial in (False, True) for requeue in (False, True)}


if Counter is not None:
    try:
        _define()
    except Exception as exc:  # e.g. PROMETHEUS_MULTIPROC_DIR names a missing directory
        logger.warning("kombu-pg metrics disabled: %s", exc)
        Counter = None  # type: ignore  # noqa: F811
        _enabled = False


def enabled() -> bool:
    return _enabled


def set_enabled(value: bool) -> None:
    """Turn the instrumentation on or off for this process (no-op without prometheus_client)."""
    global _enabled
    _enabled = bool(value) and Counter is not None


def _is_serial(headers: Any) -> bool:
    # Same rule as the transport's: a serial key header that is None or "" is no key.
    return bool(headers) and headers.get(SERIAL_KEY_HEADER) not in (None, "")


# -- instrumentation (called by kombu_pg.transport) ----------------------------------------


def published(serial: bool, seconds: float, count: int = 1) -> None:
    """One publish statement took ``seconds`` and wrote ``count`` messages."""
    if not _enabled:
        return
    if count:
        _published[serial].inc(count)
    PUBLISH_SECONDS.observe(seconds)


def claimed(messages: Sequence[dict], seconds: float, no_ack: bool = False) -> None:
    """One claim statement took ``seconds`` and delivered ``messages`` (Kombu payloads)."""
    if not _enabled:
        return
    CLAIM_SECONDS.observe(seconds)
    if not messages:
        return
    counts = [0, 0]
    again = [0, 0]
    for message in messages:
        serial = _is_serial(message.get("headers"))
        counts[serial] += 1
        if message["properties"]["delivery_info"].get("redelivered"):
            again[serial] += 1
    for serial in (0, 1):
        if counts[serial]:
            _delivered[serial].inc(counts[serial])
            if no_ack:
                _acked[serial].inc(counts[serial])
        if again[serial]:
            _redelivered[serial].inc(again[serial])


def acked(message: Any) -> None:
    """A delivery was acknowledged (``message``: the Kombu message, None if unknown)."""
    if _enabled:
        _acked[_is_serial(getattr(message, "headers", None))].inc()


def rejected(message: Any, requeue: bool) -> None:
    """A delivery was rejected; ``requeue`` says whether it went back to its queue."""
    if _enabled:
        _rejected[_is_serial(getattr(message, "headers", None)), bool(requeue)].inc()


def superseded(messages: Sequence[Superseded]) -> None:
    """Unlocks (in this process) deleted ``messages``: a newer one with their job key waits."""
    if _enabled:
        for message in messages:
            _superseded[message.serial].inc()


def poison_deleted(reason: str, count: int) -> None:
    """``count`` poison messages were deleted uncaptured by ``reason`` (one of DELETIONS)."""
    if _enabled:
        POISON_DELETED.labels(reason).inc(count)


# -- scrape-time collectors -----------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One database reading of a collector: its value, or the error that ended it."""

    at: float  # time.monotonic() when the query started
    seconds: float
    value: Any = None
    error: BaseException | None = None


class _Session:
    """One lazily opened autocommit connection, shared by scrapes (serialised), reopened
    after an error.  A scrape never holds a transaction open.

    Bounded cost: every statement is cut at ``timeout`` seconds (statement_timeout), and a
    reading, failed or not, is reused for ``min_interval`` seconds.
    """

    def __init__(self, conninfo: str, part: str, *, timeout: float | None = DEFAULT_SCRAPE_TIMEOUT,
                 min_interval: float = DEFAULT_MIN_INTERVAL) -> None:
        self.conninfo = conninfo
        self.part = part
        self.timeout = timeout
        self.min_interval = min_interval
        self.lock = threading.Lock()
        self._connection = ProcessConnection(self._open)
        self._last: Reading | None = None

    def _open(self) -> psycopg.Connection:
        conn = connect(self.conninfo)
        if self.timeout:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{int(self.timeout * 1000)}ms",))
        return conn

    def read(self, query: Callable[[psycopg.Connection], Any]) -> Reading:
        """``query(conn)``, or the last reading if it is younger than ``min_interval``."""
        with self.lock:
            last = self._last
            if last is not None and time.monotonic() - last.at < self.min_interval:
                return last
            start = time.monotonic()
            try:
                value, error = query(self._connection.get()), None
            except Exception as exc:
                self._connection.reset()
                value, error = None, exc
                logger.error("kombu-pg metrics: %s query failed: %s", self.part, exc)
            self._last = Reading(start, time.monotonic() - start, value, error)
            return self._last

    def status(self, reading: Reading):
        """The scrape's own gauges for this part: ok, duration and age of the reading."""
        part = [self.part]
        ok = GaugeMetricFamily("kombu_pg_scrape_ok", "1 if the database could be read for this part "
                               "(0: query failed or took longer than the scrape timeout).", labels=("part",))
        ok.add_metric(part, 0 if reading.error else 1)
        took = GaugeMetricFamily("kombu_pg_scrape_duration_seconds",
                                 "Time the part's database reading took.", labels=("part",))
        took.add_metric(part, reading.seconds)
        age = GaugeMetricFamily("kombu_pg_scrape_age_seconds", "Age of the reading served (readings are "
                                "reused for the exporter's minimum interval).", labels=("part",))
        age.add_metric(part, time.monotonic() - reading.at)
        return [ok, took, age]


class BrokerCollector:
    """Per-queue gauges from one ``queue_stats`` query, plus consumers and invalid messages.

    Queue labels: declared task queues keep their names (operators choose them); temporary
    queues are summed as ``(temporary)``; beyond ``max_queues`` names (busiest kept),
    the rest are summed as ``(other)``.
    """

    QUEUE_GAUGES = (
        ("ready", "kombu_pg_queue_ready_messages", "Messages a consumer could claim now."),
        ("in_flight", "kombu_pg_queue_in_flight_messages", "Messages claimed and not yet acked."),
        ("delayed", "kombu_pg_queue_delayed_messages", "Messages waiting for their ETA (native delayed delivery)."),
        ("poison", "kombu_pg_queue_poison_messages", "Messages that reached max_deliveries (never claimed again)."),
        ("keys_in_flight", "kombu_pg_queue_serial_keys_in_flight", "Serial keys with a message in flight."),
        ("keys_waiting", "kombu_pg_queue_serial_keys_waiting", "Serial keys with messages waiting."),
        ("consumers_holding", "kombu_pg_queue_consumers_holding", "Consumers holding a message of the queue."),
    )

    def __init__(self, conninfo: str, schema: str, *, max_deliveries: int | None = 10,
                 max_queues: int = DEFAULT_MAX_QUEUES, scrape_timeout: float | None = DEFAULT_SCRAPE_TIMEOUT,
                 min_interval: float = DEFAULT_MIN_INTERVAL) -> None:
        self.schema = schema
        self.max_deliveries = max_deliveries
        self.max_queues = max_queues
        self._session = _Session(conninfo, "broker", timeout=scrape_timeout, min_interval=min_interval)

    @classmethod
    def for_app(cls, app, *, conninfo: str | None = None, **kwargs) -> "BrokerCollector":
        """The app's broker, read at ``conninfo`` (a replica) when given."""
        from .transport import Transport

        transport = app.connection_for_write().transport
        if not isinstance(transport, Transport):
            raise TypeError(f"the app's broker is {transport.driver_type!r}, not kombu-pg")
        kwargs.setdefault("max_deliveries", transport.options.max_deliveries)
        return cls(conninfo or transport.conninfo, transport.options.schema, **kwargs)

    def _query(self, conn: psycopg.Connection) -> tuple[list[dict], int, int]:
        """queue_stats rows, consumer count, invalid message count (one session)."""
        store = BrokerStore(conn, self.schema)
        return store.queue_stats(self.max_deliveries), len(store.consumers()), store.invalid_count()

    def group(self, rows: Iterable[dict]) -> dict[str, dict]:
        """Rows by bounded queue label; grouped rows are summed (ages: the maximum)."""
        rows = list(rows)
        named = [r for r in rows if not r["temporary"]]
        keep = {r["queue"] for r in sorted(named, key=lambda r: (-(r["ready"] + r["in_flight"]), r["queue"]))
                [:self.max_queues]}
        grouped: dict[str, dict] = {}
        for row in rows:
            label = TEMPORARY_QUEUE if row["temporary"] else row["queue"] if row["queue"] in keep else OTHER_QUEUE
            entry = grouped.setdefault(label, {name: 0 for name, _, _ in self.QUEUE_GAUGES} | {"age": 0.0})
            for name, _, _ in self.QUEUE_GAUGES:
                entry[name] += row[name]
            entry["age"] = max(entry["age"], float(row["oldest_ready_age"] or 0.0))
        return grouped

    def collect(self):
        reading = self._session.read(self._query)
        if reading.error is not None:
            yield from self._session.status(reading)
            return
        rows, consumers, invalid = reading.value
        families = [(name, GaugeMetricFamily(metric, doc, labels=("queue",)))
                    for name, metric, doc in self.QUEUE_GAUGES]
        age = GaugeMetricFamily("kombu_pg_queue_oldest_ready_age_seconds",
                                "Age of the oldest message a consumer could claim now (0: none).",
                                labels=("queue",))
        for label, entry in sorted(self.group(rows).items()):
            for name, family in families:
                family.add_metric([label], entry[name])
            age.add_metric([label], entry["age"])
        yield from (family for _, family in families)
        yield age
        yield GaugeMetricFamily("kombu_pg_consumers", "Registered consumer sessions (workers, monitors).",
                                value=consumers)
        yield GaugeMetricFamily("kombu_pg_invalid_messages", "Messages set aside as undecodable.",
                                value=invalid)
        yield from self._session.status(reading)

    def describe(self):
        return []


_RESULTS_SQL = """
SELECT status, count(*), count(*) FILTER (WHERE expires_at <= now())
FROM {schema}.results GROUP BY status
"""
_CHORDS_SQL = "SELECT count(*) FROM {schema}.chords WHERE fired_at IS NULL"


class ResultCollector:
    """Result-backend gauges: stored results by state, expired rows awaiting cleanup, chords
    not yet fired.  Counting reads the whole results table; pass ``results=False`` to the
    exporter when that table is very large."""

    def __init__(self, conninfo: str, schema: str, *, scrape_timeout: float | None = DEFAULT_SCRAPE_TIMEOUT,
                 min_interval: float = DEFAULT_MIN_INTERVAL) -> None:
        from celery import states

        self.schema = schema
        self._states = frozenset(states.ALL_STATES)
        self._session = _Session(conninfo, "results", timeout=scrape_timeout, min_interval=min_interval)
        ident = sql.Identifier(schema)
        self._results = sql.SQL(_RESULTS_SQL).format(schema=ident).as_string(None)
        self._chords = sql.SQL(_CHORDS_SQL).format(schema=ident).as_string(None)

    @classmethod
    def for_app(cls, app, *, conninfo: str | None = None, **kwargs) -> "ResultCollector | None":
        """The app's kombu-pg result backend, read at ``conninfo`` (a replica) when given."""
        from .backend import PostgresBackend

        backend = app.backend
        if not isinstance(backend, PostgresBackend):
            return None
        return cls(conninfo or backend.conninfo, backend.schema, **kwargs)

    def _query(self, conn: psycopg.Connection) -> tuple[list[tuple], int] | None:
        exists = conn.execute("SELECT to_regclass(format('%%I.results', %s::text)) IS NOT NULL",
                              (self.schema,)).fetchone()[0]
        if not exists:
            return None
        return conn.execute(self._results).fetchall(), conn.execute(self._chords).fetchone()[0]

    def collect(self):
        reading = self._session.read(self._query)
        if reading.error is not None:
            yield from self._session.status(reading)
            return
        if reading.value is None:  # no result tables in this schema: nothing to report
            return
        rows, chords = reading.value
        by_state: dict[str, list[int]] = {}
        for status, count, expired in rows:
            entry = by_state.setdefault(status if status in self._states else OTHER_STATE, [0, 0])
            entry[0] += count
            entry[1] += expired
        stored = GaugeMetricFamily("kombu_pg_results", "Task results stored, by state.", labels=("state",))
        expired = GaugeMetricFamily("kombu_pg_results_expired",
                                    "Results past their expiry, not yet deleted by backend_cleanup.")
        for state, (count, _) in sorted(by_state.items()):
            stored.add_metric([state], count)
        expired.add_metric([], sum(e for _, e in by_state.values()))
        yield stored
        yield expired
        yield GaugeMetricFamily("kombu_pg_chords_pending", "Chords whose body has not been sent yet.",
                                value=chords)
        yield from self._session.status(reading)

    def describe(self):
        return []


class _Parts:
    """The broker and result collectors as one: the exposition format allows one family
    per name, and both report ``kombu_pg_scrape_*`` (one sample per part)."""

    def __init__(self, collectors: Sequence[Any]) -> None:
        self.collectors = collectors

    def collect(self):
        merged: dict[str, Any] = {}
        for collector in self.collectors:
            for family in collector.collect():
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    def describe(self):
        return []


# -- registries and serving ---------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess directory, when multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def build_registry(app=None, *, conninfo: str | None = None, schema: str | None = None,
                   max_deliveries: int | None = 10, results: bool = True, dlq: bool | None = None,
                   max_queues: int = DEFAULT_MAX_QUEUES, events: bool = True,
                   scrape_timeout: float | None = DEFAULT_SCRAPE_TIMEOUT,
                   min_interval: float = DEFAULT_MIN_INTERVAL,
                   replica_conninfo: str | None = None) -> "CollectorRegistry":
    """A registry with everything kombu-pg knows, for one exporter.

    * events (counters, histograms): in multiprocess mode every process's, merged by
      prometheus_client's MultiProcessCollector; otherwise this process's (the default
      registry, so your own metrics are served too);
    * the broker gauges of ``app``'s broker, or of ``conninfo``/``schema``;
    * the result gauges of ``app``'s result backend when it is kombu-pg's (without an
      app: the broker's database and schema, if it has result tables), unless
      ``results=False``;
    * the DLQ collector when ``app`` uses celery_dlq (``dlq=None``), or when ``dlq=True``.

    Each database part's statements stop at ``scrape_timeout`` seconds (None: no limit),
    and its reading is reused for ``min_interval`` seconds.  With ``replica_conninfo`` (a
    streaming replica of the same database) the broker and result gauges are read there;
    the exporter only reads, so nothing is written to either server.
    """
    if CollectorRegistry is None:
        raise RuntimeError("kombu_pg.metrics needs prometheus_client: pip install prometheus-client")
    registry = CollectorRegistry()
    if events:
        if multiprocess_dir():
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry)
        else:
            registry.register(REGISTRY)
    bounds = {"scrape_timeout": scrape_timeout, "min_interval": min_interval}
    if conninfo is None and app is not None:
        broker = BrokerCollector.for_app(app, max_queues=max_queues, conninfo=replica_conninfo, **bounds)
    elif conninfo is not None:
        broker = BrokerCollector(replica_conninfo or conninfo, schema or "kombu_pg", max_deliveries=max_deliveries,
                                 max_queues=max_queues, **bounds)
    else:
        broker = None
    parts = [broker] if broker is not None else []
    if results:
        if app is not None:
            parts.append(ResultCollector.for_app(app, conninfo=replica_conninfo, **bounds))
        elif broker is not None:
            parts.append(ResultCollector(broker._session.conninfo, broker.schema, **bounds))
    registry.register(_Parts([part for part in parts if part is not None]))
    if app is not None and (dlq or (dlq is None and getattr(app, "_celery_dlq", None) is not None)):
        from celery_dlq.metrics import DLQCollector

        registry.register(DLQCollector(app))
    return registry


def start_http_server(port: int = 9808, addr: str = "127.0.0.1", *, app=None, registry=None, **kwargs):
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns (server, thread).

    ``/metrics`` has no authentication, so the default address is the loopback one: pass
    ``addr="0.0.0.0"`` (or a specific interface) to let a remote Prometheus in.

    ``registry`` defaults to :func:`build_registry(app, **kwargs) <build_registry>`.  From a
    worker, connect it to ``worker_init`` (the main process: one port per worker); under
    prefork set ``PROMETHEUS_MULTIPROC_DIR`` so the pool children's counts are included.
    """
    from prometheus_client import start_http_server as _start

    if registry is None:
        registry = build_registry(app, **kwargs)
    return _start(port, addr=addr, registry=registry)


__all__ = [
    "BrokerCollector",
    "KINDS",
    "ResultCollector",
    "acked",
    "build_registry",
    "claimed",
    "enabled",
    "multiprocess_dir",
    "published",
    "rejected",
    "set_enabled",
    "start_http_server",
]
