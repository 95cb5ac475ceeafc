"""kombu-pg result backend example: results, groups and chords with push-based waiting.

    python examples/results_demo.py

With ``KOMBU_PG_URL`` unset an embedded PostgreSQL is started in a temporary directory;
``KOMBU_PG_SCHEMA`` picks the schema (default ``kombu_pg``).
A worker subprocess runs the tasks; every ``get()`` below sleeps on LISTEN and wakes on
the NOTIFY sent by the transaction that stores the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    from kombu_pg.embedded import database_url

    url, server = database_url()
    os.environ["KOMBU_PG_URL"] = url
    from celery import chain, chord, group

    from results_app import add, app, fail, tsum

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "results_app", "worker", "-l", "info",
         "-P", "threads", "-c", "4"],
        cwd=HERE, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in worker.stdout:
            if " ready." in line:
                break
        t = time.monotonic()
        res = add.delay(2, 3)
        print("add(2, 3) =", res.get(timeout=30), f"({(time.monotonic() - t) * 1000:.0f} ms)")
        print("  stored:", res.name, res.args, "by", res.worker, "on queue", res.queue)
        print("chain    =", chain(add.s(1, 1), add.s(10), add.s(100)).delay().get(timeout=30))
        print("group    =", group(add.s(i, i) for i in range(5)).delay().get(timeout=30))
        print("chord    =", chord((add.s(i, i) for i in range(10)), tsum.s()).delay().get(timeout=30))
        bad = chord([add.s(1, 1), fail.s("header task failed")], tsum.s()).delay()
        try:
            app.AsyncResult(bad.id).get(timeout=30)
        except Exception as exc:  # the body fails with ChordError
            print("failed chord body raised", type(exc).__name__ + ":", exc)
        print("cleanup  =", app.backend.cleanup(), "(expired rows deleted)")
        return 0
    finally:
        worker.terminate()
        worker.wait(30)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
