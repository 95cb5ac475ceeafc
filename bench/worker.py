"""A real ``celery worker`` subprocess, started and always stopped by the bench."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from . import probe
from .celery_app import CONFIG_ENV, TOKEN_ENV, AppConfig

# The repository root, so the subprocess imports this very ``bench`` package.
_ROOT = Path(__file__).resolve().parent.parent
_STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class Pool:
    name: str  # celery -P
    concurrency: int  # celery -c

    @property
    def label(self) -> str:
        return f"-P {self.name} -c {self.concurrency}"


class Worker:
    """``with Worker(...) as w:`` runs ``celery worker`` for the block, logs to a file.

    The worker gets a session (process group) of its own: a Ctrl-C in the terminal then
    reaches only the bench, whose cleanup stops the worker with a warm shutdown, and a
    prefork worker's children can be killed with it if they outstay the grace period.
    """

    def __init__(
        self, cfg: AppConfig, pool: Pool, token: str, probe_address: str, log_dir: Path
    ) -> None:
        self.cfg, self.pool, self.token = cfg, pool, token
        self.log_path = log_dir / f"{token}.log"
        self._probe_address = probe_address
        self._proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.time() when the process was started

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "bench.worker_app", "worker",
            "-P", self.pool.name, "-c", str(self.pool.concurrency),
            "--prefetch-multiplier", str(self.cfg.prefetch_multiplier),
            "-Q", self.cfg.queue,
            "-n", f"{self.token}@%h",
            # Same for every broker: Celery turns these on for amqp/redis only, and they
            # cost start-up time and background traffic the drain should not carry.
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "WARNING",
        ]  # fmt: skip

    def __enter__(self) -> Worker:
        env = dict(os.environ)
        env.update(
            {
                CONFIG_ENV: self.cfg.to_json(),
                TOKEN_ENV: self.token,
                probe.PROBE_ENV: self._probe_address,
            }
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        self.started = time.time()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.command(), cwd=_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the worker is not running")
        return self._proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the whole group after a grace period."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        if proc.returncode != 0:
            # Hung or crashed: kill the whole group (its id is the worker's pid, thanks to
            # start_new_session), which also takes prefork children an early exit orphaned.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
