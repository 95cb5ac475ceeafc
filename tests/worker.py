"""Run a real ``celery worker`` subprocess for a test and know when it is ready."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

TESTS_DIR = Path(__file__).resolve().parent


class CeleryWorker:
    """``celery -A <app> worker`` in a subprocess; ``ready`` is set by its "ready." log line.

    Output is collected in ``lines`` (and can be awaited with :meth:`wait_for_line`),
    so tests synchronise on what the worker says, never on sleeps.
    """

    def __init__(
        self,
        app: str,
        env: Mapping[str, str],
        *,
        pool: str = "threads",
        concurrency: int = 2,
        args: Sequence[str] = (),
        hostname: str | None = None,
        wrap: Callable[[list[str]], list[str]] = list,
    ) -> None:
        """``wrap`` turns the command into the one to run (e.g. inside a network namespace)."""
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "-l", "info",
               "-P", pool, "-c", str(concurrency), "--without-mingle", "--without-gossip"]
        if hostname:
            cmd += ["-n", hostname]
        cmd = wrap(cmd + list(args))
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), full_env.get("PYTHONPATH")]))
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=TESTS_DIR, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                if " ready." in line:
                    self.ready.set()
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_ready(self, timeout: float = 60) -> "CeleryWorker":
        if not self.ready.wait(timeout):
            raise AssertionError("worker did not become ready:\n" + self.output())
        return self

    def wait_for_line(self, text: str, timeout: float = 30, count: int = 1) -> None:
        """Block until ``text`` occurs in ``count`` output lines (or the worker exits)."""
        def found() -> bool:
            return sum(text in line for line in self.lines) >= count or self.proc.poll() is not None

        with self._changed:
            if not self._changed.wait_for(found, timeout) or sum(text in l for l in self.lines) < count:
                raise AssertionError(f"worker never printed {text!r} x{count}:\n" + self.output())

    def output(self) -> str:
        return "".join(self.lines[-200:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (pool children too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM to the main process), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> "CeleryWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", step: float = 0.05):
    """Return the first truthy ``predicate()``, polling with a deadline: for conditions
    (rows appearing, sessions ending) that have no event to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
