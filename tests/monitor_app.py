"""The Celery app of the monitoring tests, and helpers to run real Celery processes.

A worker, ``celery inspect`` or Flower started with ``-A tests.monitor_app`` reads the
broker URL and the schema from the environment (``KOMBU_PG_TEST_URL``,
``KOMBU_PG_TEST_SCHEMA``); the test process builds the same app with :func:`make_app`.

:class:`CeleryProcess` runs ``python -m celery ...`` as a subprocess (:class:`ManagedProcess`
any other command), reads its merged output in a thread and lets a test wait for a line
(``ready.``) instead of sleeping.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from celery import Celery

import kombu_pg  # noqa: F401  (registers postgresql://)

URL_ENV = "KOMBU_PG_TEST_URL"
SCHEMA_ENV = "KOMBU_PG_TEST_SCHEMA"
#: Optional: Celery's control_queue_expires (seconds) for this process.
CONTROL_EXPIRES_ENV = "KOMBU_PG_TEST_CONTROL_QUEUE_EXPIRES"
#: The test process's pid: a subprocess exits when that process is gone.
PARENT_ENV = "KOMBU_PG_TEST_PARENT_PID"
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Transport options of every process in these tests: quick safety polls and recovery
#: passes, so expiry and clean-up happen within a test's deadline.
TRANSPORT_OPTIONS = {"polling_interval": 0.5, "recovery_interval": 1.0}


def make_app(url: str, schema: str, name: str = "monitor_app") -> Celery:
    app = Celery(name, broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"schema": schema, **TRANSPORT_OPTIONS},
        broker_connection_retry_on_startup=False,
        task_send_sent_event=True,
        task_track_started=True,
        worker_prefetch_multiplier=2,
        worker_redirect_stdouts=True,
        # Gossip and mingle are off for driver_type 'postgresql' anyway (Celery enables
        # them for amqp/redis only); saying so keeps the logs honest.
        worker_enable_remote_control=True,
        result_backend=None,
        task_ignore_result=True,
    )
    if os.environ.get(CONTROL_EXPIRES_ENV):
        app.conf.control_queue_expires = float(os.environ[CONTROL_EXPIRES_ENV])

    @app.task(name="monitor_app.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="monitor_app.fail", shared=False)
    def fail(message="boom"):
        raise ValueError(message)

    @app.task(name="monitor_app.wait_for_file", shared=False)
    def wait_for_file(path, timeout=30.0):
        """Block until ``path`` exists: lets a test hold a task 'active' deterministically."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(path)
            time.sleep(0.05)  # the workload itself, not test synchronisation
        return path

    return app


def _app_from_env() -> Celery:
    return make_app(os.environ.get(URL_ENV, "postgresql://"), os.environ.get(SCHEMA_ENV, "kombu_pg"))


def _exit_with_test_process() -> None:
    """A safety net on a shared machine: if pytest dies without its teardown (SIGKILL),
    workers and Flower it started exit instead of running on forever."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-test-process", daemon=True).start()


app = _app_from_env()
_exit_with_test_process()


# -- real Celery processes ----------------------------------------------------------


def process_env(url: str, schema: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({URL_ENV: url, SCHEMA_ENV: schema, PARENT_ENV: str(os.getpid()),
                "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class ManagedProcess:
    """A subprocess whose merged output is collected line by line in a thread."""

    def __init__(self, argv: Iterable[str], env: dict[str, str], name: str) -> None:
        self.args = list(argv)
        self.env = env
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "ManagedProcess":
        self.proc = subprocess.Popen(
            self.args, env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()  # EOF: the process is gone, waiters must give up

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, match: str | Callable[[str], bool], timeout: float) -> str:
        """Return the first output line matching ``match`` (a regex or a predicate)."""
        pred = (lambda line: re.search(match, line) is not None) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                eof = self._reader is not None and not self._reader.is_alive()
                remaining = deadline - time.monotonic()
                if eof or remaining <= 0:
                    state = f"exited with {self.proc.poll()}" if eof else "still running"
                    raise AssertionError(
                        f"{self.name} ({state}) printed no line matching {match!r} within "
                        f"{timeout}s; output:\n{self.output_tail()}")
                self._cond.wait(remaining)

    def output_tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
        finally:
            if self._reader is not None:
                self._reader.join(5)

    def kill(self) -> None:
        """SIGKILL the process group: no shutdown code runs, sessions just drop."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> "ManagedProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CeleryProcess(ManagedProcess):
    """``python -m celery <args>`` (worker, flower, inspect...)."""

    def __init__(self, args: Iterable[str], env: dict[str, str], name: str = "celery") -> None:
        super().__init__([sys.executable, "-m", "celery", *args], env, name)


def start_worker(url: str, schema: str, *, events: bool = True, queues: str | None = None,
                 timeout: float = 45.0, extra_args: Iterable[str] = (),
                 extra_env: dict[str, str] | None = None, pool: str = "threads") -> tuple[CeleryProcess, str]:
    """Start ``celery worker -P threads -c 2`` (or another ``pool``) and wait for its ``ready.`` line.

    Returns the process and the worker's node name (``w<random>@localhost``).
    """
    node = f"w{uuid.uuid4().hex[:8]}@localhost"
    args = ["-A", "tests.monitor_app", "worker", "-P", pool, "-c", "2", "-l", "info",
            "-n", node, *(["-E"] if events else []), *extra_args]
    if queues:
        args += ["-Q", queues]
    worker = CeleryProcess(args, process_env(url, schema, **(extra_env or {})),
                           name=f"worker {node}").start()
    try:
        worker.wait_for_line(r"\bready\.$", timeout)
    except BaseException:
        worker.stop()
        raise
    return worker, node
