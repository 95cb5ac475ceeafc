"""Timestamps from worker processes to the bench process, over loopback UDP.

Tasks run in a separate ``celery worker`` process (and, with prefork, in its children), so
they report when they ran by sending one small datagram to the bench process.  A datagram
costs a few microseconds in the task, against hundreds for Celery's own per-task work, the
same for every broker, so it does not tilt the comparison.  Both ends read ``time.time()``
on the same machine, so the clocks agree.

Datagram formats (ASCII, space separated):

* ``<phase> task <seq> <t_start> <t_end>`` -- one per task execution;
* ``<token> ready <t>`` -- the worker's event loop is about to start consuming.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

#: Environment variable carrying ``host:port`` of the bench process's probe.
PROBE_ENV = "BENCH_PROBE"

# Large enough that a burst of thousands of datagrams during a drain is never dropped on
# loopback while the receiving thread waits for the GIL (the kernel may cap it lower).
_RCVBUF = 16 * 1024 * 1024


class Probe:
    """Receives datagrams on 127.0.0.1 in a background thread and keeps them by phase."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._cond = threading.Condition()
        self._tasks: dict[str, dict[int, tuple[float, float]]] = {}
        self._ready: dict[str, float] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="bench-probe", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()
        return f"{host}:{port}"

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self._sock.close()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(256)
            except TimeoutError:
                continue
            except OSError:
                return
            self._record(data.decode("ascii", "replace").split())

    def _record(self, fields: list[str]) -> None:
        with self._cond:
            if len(fields) == 5 and fields[1] == "task":
                # setdefault: a redelivered task keeps its first execution's times.
                self._tasks.setdefault(fields[0], {}).setdefault(
                    int(fields[2]), (float(fields[3]), float(fields[4]))
                )
            elif len(fields) == 3 and fields[1] == "ready":
                self._ready.setdefault(fields[0], float(fields[2]))
            self._cond.notify_all()

    def dropped(self) -> int | None:
        """Datagrams the kernel dropped for want of buffer space (Linux), else None."""
        port = f"{self._sock.getsockname()[1]:04X}"
        try:
            with open("/proc/net/udp") as table:
                for line in table.readlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(":" + port):
                        return int(fields[-1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    # -- reading -------------------------------------------------------------

    def tasks(self, phase: str) -> dict[int, tuple[float, float]]:
        """``seq -> (t_start, t_end)`` of the tasks of ``phase`` seen so far (a copy)."""
        with self._cond:
            return dict(self._tasks.get(phase, {}))

    def task(self, phase: str, seq: int, timeout: float) -> tuple[float, float] | None:
        """Wait for one task's times; None when it did not report within ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: seq in self._tasks.get(phase, {}), timeout)
            return self._tasks.get(phase, {}).get(seq)

    def ready(self, token: str, timeout: float, alive: Callable[[], bool]) -> float | None:
        """Wait for a worker's ready datagram while ``alive()``; its time, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while token not in self._ready and alive() and time.monotonic() < deadline:
                self._cond.wait(0.2)
            return self._ready.get(token)

    def wait_count(
        self, phase: str, n: int, stall_timeout: float, alive: Callable[[], bool]
    ) -> int:
        """Wait until ``n`` tasks of ``phase`` reported, giving up once no new report came
        for ``stall_timeout`` seconds or ``alive()`` turns false; returns the count seen."""
        last_count, last_progress = -1, time.monotonic()
        with self._cond:
            while True:
                count = len(self._tasks.get(phase, {}))
                if count >= n:
                    return count
                now = time.monotonic()
                if count != last_count:
                    last_count, last_progress = count, now
                elif now - last_progress > stall_timeout or not alive():
                    return count
                self._cond.wait(0.2)


# -- sending (runs inside the worker) -------------------------------------------

_sender: tuple[socket.socket, tuple[str, int]] | None = None
_sender_pid: int | None = None


def send(*fields: object) -> None:
    """Send one datagram to the bench process named by ``$BENCH_PROBE`` (no-op if unset)."""
    global _sender, _sender_pid
    if _sender is None or _sender_pid != os.getpid():  # a prefork child needs its own socket
        target = os.environ.get(PROBE_ENV)
        if not target:
            return
        host, port = target.rsplit(":", 1)
        _sender = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM), (host, int(port)))
        _sender_pid = os.getpid()
    sock, addr = _sender
    sock.sendto(" ".join(map(str, fields)).encode("ascii"), addr)
