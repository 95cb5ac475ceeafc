"""Per-user ordering with serial keys: never two jobs of one user at once, and in order.

Run:  KOMBU_PG_URL=postgresql://... python examples/serial_per_user.py
(without KOMBU_PG_URL an embedded PostgreSQL is started).  It starts a worker with
4 threads, sends 3 jobs for each of 3 users, and prints the start/end of each job:
jobs of one user never overlap and run in the order sent, while users run in parallel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    from kombu_pg.embedded import database_url

    url, server = database_url()
    os.environ["KOMBU_PG_URL"] = url

import time

from celery import Celery

import kombu_pg  # noqa: F401
from kombu_pg.serial import SerialTask

app = Celery("serial_per_user", broker=os.environ["KOMBU_PG_URL"])
app.conf.broker_transport_options = {"schema": "serial_example"}


@app.task(base=SerialTask, serial_key=lambda user_id, step: f"user:{user_id}")
def sync_account(user_id: int, step: int) -> None:
    print(f"user {user_id} step {step} start {time.monotonic():.3f}", flush=True)
    time.sleep(0.2)  # pretend to call a slow external API
    print(f"user {user_id} step {step} end   {time.monotonic():.3f}", flush=True)


if __name__ == "__main__":
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "serial_per_user", "worker", "-P", "threads", "-c", "4",
         "-l", "warning"],
        cwd=HERE, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        for step in range(3):
            for user_id in (1, 2, 3):
                sync_account.delay(user_id, step)
        ends = 0
        for line in worker.stdout:
            print(line, end="")
            ends += " end " in line
            if ends == 9:
                break
    finally:
        worker.terminate()
        worker.wait(30)
        if server is not None:
            server.stop()
