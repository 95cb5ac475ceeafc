"""Several client processes released together: consumers draining one queue, producers
publishing to it at the same time.

Processes, not threads: a Python client spends much of each message in the interpreter, so
threads would share one GIL and measure that instead of the broker.  They are spawned (a
fresh interpreter), not forked, so none inherits the bench's sockets, Kombu pools or probe
thread.  Each member connects and declares before the common start (:meth:`Fleet.go`), so
interpreter start-up, imports and connecting are outside every clock.

A member is a module-level function ``fn(gate, *args) -> dict`` (spawned children import
it by name); it calls ``gate.arrive()`` when ready and returns what it measured.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kombu import Consumer
from kombu.message import Message

import kombu_pg  # noqa: F401  registers postgresql:// with Kombu in each spawned member

from .brokers import Broker
from .fill import durable_queue, publish

if TYPE_CHECKING:
    from typing_extensions import Self

_MP = multiprocessing.get_context("spawn")
_READY_TIMEOUT_S = 120.0  # spawning 8 interpreters on a loaded 2-vCPU machine takes a while
_FINISH_TIMEOUT_S = 30.0
# How soon an idle member notices the stop; also its drain_events timeout, as in
# kombu_level (a kombu_pg drain_events claims again on every call: this is its poll).
_POLL_S = 1.0

Member = tuple[Callable[..., dict[str, float]], tuple[Any, ...]]


class Gate:
    """Shared by the bench process and the members of one fleet: a start, a stop and one
    counter (messages published or acked) that the bench watches for progress."""

    def __init__(self) -> None:
        self._arrived = _MP.Semaphore(0)
        self._go = _MP.Event()
        self._stop = _MP.Event()
        self._count = _MP.Value("q", 0)
        self._parent = os.getpid()

    # -- member side --------------------------------------------------------------------

    def arrive(self) -> None:
        """Ready: wait for the common start."""
        self._arrived.release()
        while not self._go.wait(_POLL_S):
            if self._orphaned():
                raise SystemExit("bench process gone")

    def add(self) -> int:
        """Count one operation; returns the fleet's total so far, this one included."""
        with self._count.get_lock():
            self._count.value += 1
            return int(self._count.value)

    @property
    def stopping(self) -> bool:
        # A killed bench process cannot stop its members: they stop themselves.
        return self._stop.is_set() or self._orphaned()

    def stop(self) -> None:
        self._stop.set()

    def _orphaned(self) -> bool:
        return os.getppid() != self._parent

    # -- bench side -----------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self._count.value)


class Fleet:
    """``with Fleet(members) as fleet:`` starts every member and waits until all arrived;
    ``go()`` releases them, ``wait()`` watches progress, ``finish()`` stops them and
    returns their results.  Leaving the block stops (and if need be kills) them all."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.gate = Gate()
        self._results: Any = _MP.Queue()
        self._procs: list[BaseProcess] = [
            _MP.Process(
                target=_member, args=(i, fn, args, self.gate, self._results), daemon=True
            )
            for i, (fn, args) in enumerate(members)
        ]

    def __enter__(self) -> Self:
        try:
            for proc in self._procs:
                proc.start()
            self._wait_arrivals()
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end()

    def go(self) -> float:
        """Release every member; returns ``time.time()`` just before (the clocks' start)."""
        started = time.time()
        self.gate._go.set()
        return started

    def wait(self, count: int, stall_timeout: float) -> int:
        """Until the members counted ``count`` operations, one of them stopped the fleet,
        the count did not move for ``stall_timeout`` seconds, or every member exited;
        returns the count."""
        last, moved = -1, time.monotonic()
        while True:
            now, seen = time.monotonic(), self.gate.count
            if seen >= count or self.gate._stop.is_set():
                return seen
            if seen != last:
                last, moved = seen, now
            elif now - moved > stall_timeout or not any(p.is_alive() for p in self._procs):
                return seen
            time.sleep(0.05)

    def finish(self) -> list[dict[str, float]]:
        """Stop every member; what each returned, in member order.  A member that failed
        fails the whole fleet (RuntimeError with its error)."""
        self.gate.stop()
        results: list[dict[str, float] | None] = [None] * len(self._procs)
        deadline = time.monotonic() + _FINISH_TIMEOUT_S
        for _ in self._procs:
            try:
                index, ok, value = self._results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise RuntimeError("a fleet member neither finished nor failed in time") from None
            if not ok:
                raise RuntimeError(f"fleet member {index} failed: {value}")
            results[index] = value
        return [r for r in results if r is not None]

    def _wait_arrivals(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        arrived = 0
        while arrived < len(self._procs):
            if self.gate._arrived.acquire(timeout=_POLL_S):
                arrived += 1
            elif any(p.exitcode is not None for p in self._procs):
                raise RuntimeError(f"a fleet member exited before the start: {self._first_error()}")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"fleet members not ready after {_READY_TIMEOUT_S:.0f} s")

    def _first_error(self) -> str:
        try:
            while True:
                _, ok, value = self._results.get(timeout=1.0)
                if not ok:
                    return str(value)
        except queue.Empty:
            return "no error reported"

    def _end(self) -> None:
        self.gate.stop()
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            if proc.pid is None:
                continue  # never started
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
        self._results.close()


def _member(
    index: int, fn: Callable[..., dict[str, float]], args: tuple[Any, ...], gate: Gate, results: Any
) -> None:
    try:
        results.put((index, True, fn(gate, *args)))
    except KeyboardInterrupt:
        pass  # Ctrl-C reaches the whole process group; the bench reports and cleans up
    except Exception as exc:  # noqa: BLE001  any failure is the bench's to report, not ours
        traceback.print_exc()
        results.put((index, False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))


# -- members -------------------------------------------------------------------------------


def consume(
    gate: Gate, broker: Broker, queue_name: str, prefetch: int, stop_after: int | None
) -> dict[str, float]:
    """One Kombu consumer, acking each message, from the start until the fleet stops.

    The member whose ack is the fleet's ``stop_after``-th stops the fleet and reports
    ``finished``: the time after its consumer was cancelled, which is when kombu_pg has
    flushed its buffered acks (the others' last ones follow within milliseconds).
    """
    acked = 0
    last = False

    def on_message(body: object, message: Message) -> None:
        nonlocal acked, last
        message.ack()
        acked += 1
        if gate.add() == stop_after:
            last = True
            gate.stop()

    with broker.connection() as conn:
        channel = conn.channel()
        # Positional: py-amqp and the virtual transports name the global flag differently.
        channel.basic_qos(0, prefetch, False)
        # Declares now; consuming starts at __enter__, after the start: a broker that
        # pushes messages (RabbitMQ) gives no member a head start.
        consumer = Consumer(channel, [durable_queue(queue_name)], callbacks=[on_message],
                            accept=["json"])  # fmt: skip
        gate.arrive()
        with consumer:
            while not gate.stopping:
                try:
                    conn.drain_events(timeout=_POLL_S)
                except TimeoutError:
                    pass
    return {"acked": acked, "finished": time.time() if last else 0.0}


def produce(gate: Gate, broker: Broker, queue_name: str, n: int, pad: str) -> dict[str, float]:
    """``n`` single persistent publishes (see :func:`bench.fill.publish`) from the start;
    ``finished`` is when the last one returned."""
    with broker.connection() as conn:
        producer = conn.Producer(serializer="json")
        durable_queue(queue_name)(producer.channel).declare()
        # Warm-up: connects, checks the schema, lets psycopg prepare the statement.
        publish(producer, queue_name, -1, pad)
        gate.arrive()
        for seq in range(n):
            publish(producer, queue_name, seq, pad)
            gate.add()
        return {"published": n, "finished": time.time()}
