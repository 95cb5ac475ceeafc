"""The moving parts of ``python -m bench.churn``: paced Kombu producers, acking Kombu
consumers (each in its own process) and the claim-latency probe (a thread of the parent).

Children are started with the ``spawn`` method: a forked child would inherit the parent's
database sessions.  They report through one multiprocessing queue, about once a second,
so the parent can cut the run into sampling windows without asking them anything.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from queue import Queue as ThreadQueue
from typing import Any, Protocol

import psycopg

#: Children report at least this often (seconds).
REPORT_EVERY = 1.0
#: A producer that falls this far behind its schedule drops the backlog instead of
#: publishing it in a burst: the run is about a steady rate, not catching up.
MAX_LAG = 1.0


class Outbox(Protocol):
    def put(self, item: Any) -> None: ...


@dataclass(frozen=True)
class WorkerConfig:
    url: str
    schema: str
    queue: str
    producers: int
    payload_bytes: int = 200
    prefetch: int = 100

    def transport_options(self) -> dict[str, Any]:
        return {"schema": self.schema}


def entities(cfg: WorkerConfig):
    """The durable direct exchange and queue every producer and consumer uses."""
    from kombu import Exchange, Queue

    exchange = Exchange(cfg.queue, "direct", durable=True)
    return exchange, Queue(cfg.queue, exchange, routing_key=cfg.queue, durable=True)


def connection(cfg: WorkerConfig):
    from kombu import Connection

    import kombu_pg  # noqa: F401  registers the postgresql:// scheme with Kombu

    return Connection(cfg.url, transport_options=cfg.transport_options(), connect_timeout=10)


class Pacer:
    """Spaces calls ``1/rate`` seconds apart on a fixed schedule, the rate read each call."""

    def __init__(self) -> None:
        self._next = time.monotonic()
        self._rate = -1.0

    def wait(self, rate: Synchronized, stop: Event) -> bool:
        """Sleep until the next slot; False when ``stop`` was set meanwhile.

        ``rate.value``: messages/s; 0 pauses, infinity publishes flat out (calibration).
        """
        while rate.value <= 0:
            if stop.wait(0.05):
                return False
        now = time.monotonic()
        if rate.value != self._rate or self._next < now - MAX_LAG:
            self._rate, self._next = rate.value, now  # new rate or hopelessly late: restart
        if math.isinf(self._rate):
            return not stop.is_set()
        delay = self._next - now
        self._next += 1.0 / self._rate
        # Event.wait sleeps and still reacts to stop within the slot.
        return not (stop.wait(delay) if delay > 0 else stop.is_set())


def run_producer(cfg: WorkerConfig, index: int, rate: Synchronized, stop: Event, out: Outbox) -> None:
    """Publish through Kombu at ``rate.value`` messages/s (this producer's share) until ``stop``.

    Each message carries its publish time, so consumers can measure end-to-end latency.
    """
    pad = "x" * cfg.payload_bytes
    exchange, queue = entities(cfg)
    with connection(cfg) as conn:
        producer = conn.Producer(serializer="json")
        queue(producer.channel).declare()
        out.put(("ready", "producer", index))
        pacer, sent, last = Pacer(), 0, time.monotonic()
        while pacer.wait(rate, stop):
            producer.publish({"t": time.time(), "pad": pad}, exchange=exchange,
                             routing_key=queue.routing_key, delivery_mode=2)
            sent += 1
            if time.monotonic() - last >= REPORT_EVERY:
                out.put(("published", index, sent))
                sent, last = 0, time.monotonic()
        out.put(("published", index, sent))


def _time_claims(durations: list[float]) -> None:
    """Record how long each claim statement of this process takes (a bench-only wrapper
    around BrokerStore.claim, the one call every Kombu fetch makes)."""
    from kombu_pg.store.broker import BrokerStore

    original = BrokerStore.claim

    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)

    BrokerStore.claim = timed  # type: ignore[method-assign]


def run_consumer(cfg: WorkerConfig, index: int, stop: Event, out: Outbox) -> None:
    """Drain the queue with a Kombu Consumer (prefetch, ack each) until ``stop``."""
    from kombu import Consumer

    claims: list[float] = []
    _time_claims(claims)
    latencies: list[float] = []
    _, queue = entities(cfg)

    def on_message(body: dict, message) -> None:
        message.ack()
        latencies.append(time.time() - body["t"])

    def report() -> None:
        out.put(("consumed", index, list(latencies), list(claims)))
        latencies.clear()
        claims.clear()

    with connection(cfg) as conn:
        channel = conn.channel()
        channel.basic_qos(0, cfg.prefetch, False)  # positional: see bench/kombu_level.py
        with Consumer(channel, [queue], callbacks=[on_message], accept=["json"]):
            out.put(("ready", "consumer", index))
            last = time.monotonic()
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    pass
                if time.monotonic() - last >= REPORT_EVERY:
                    report()
                    last = time.monotonic()
        report()


@dataclass
class ProbeResult:
    at: float  # time.monotonic() when the claim started
    seconds: float  # claim + ack (when a message came), one round trip each
    claimed: bool


@dataclass
class Probe:
    """A dedicated consumer on its own session: every ``interval`` seconds one claim of at
    most one message (and its ack), timed.  It sees what any consumer's claim costs."""

    url: str
    schema: str
    queue: str
    interval: float = 0.1
    results: ThreadQueue = field(default_factory=ThreadQueue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="claim-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        from kombu_pg.store.broker import BrokerStore

        with psycopg.connect(self.url, autocommit=True, application_name="bench_churn_probe") as conn:
            store = BrokerStore(conn, self.schema)
            consumer = store.register_consumer()
            while not self._stop.wait(self.interval):
                started, t0 = time.monotonic(), time.perf_counter()
                rows = store.claim(self.queue, 1, consumer, max_deliveries=10)
                store.ack([r.token for r in rows if r.token])
                self.results.put(ProbeResult(started, time.perf_counter() - t0, bool(rows)))
            store.unregister_consumer(consumer)

    def drain(self) -> list[ProbeResult]:
        out = []
        while not self.results.empty():
            out.append(self.results.get_nowait())
        return out
