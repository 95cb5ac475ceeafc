"""kombu-pg demo: start a worker on PostgreSQL, send tasks, show what happened.

Run it with ``scripts/demo``.  With ``KOMBU_PG_URL`` unset it starts an embedded
PostgreSQL in a temporary directory and stops it at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    from kombu_pg.embedded import database_url

    url, server = database_url()
    print(f"database: {'embedded server' if server else url}")
    os.environ["KOMBU_PG_URL"] = url
    from demo_app import add, app, stamp, unreliable

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "demo_app", "worker", "-l", "info", "-P", "threads", "-c", "4"],
        cwd=HERE, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in worker.stdout:
            if " ready." in line:
                print("worker ready")
                break
        started = time.monotonic()
        for i in range(10):
            add.delay(i, i)
        unreliable.delay(3)
        stamp.apply_async(("countdown=1s",), countdown=1)
        stamp.apply_async(("urgent",), priority=9)
        print("sent 13 tasks; waiting for the worker to finish them...")
        done = 0
        for line in worker.stdout:
            if "succeeded in" in line:
                done += 1
                print("  " + line.split("] ", 1)[-1].strip())
            elif "retry:" in line:
                print("  " + line.split("] ", 1)[-1].strip())
            if done == 13:
                break
        print(f"all 13 tasks done in {time.monotonic() - started:.2f}s")
        # Acks are batched (flushed within milliseconds); a warm shutdown flushes the last.
        worker.terminate()
        worker.wait(30)
        with psycopg.connect(url) as conn:
            left = conn.execute("SELECT count(*) FROM kombu_pg.messages").fetchone()[0]
        print(f"messages left in kombu_pg.messages: {left}")
        return 0
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(30)
        app.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
