"""celery_dlq demo: failures land in the DLQ, an operator inspects and requeues them.

    python examples/dlq_demo.py

With ``KOMBU_PG_URL`` unset it starts an embedded PostgreSQL and stops it at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    from kombu_pg.embedded import database_url

    url, server = database_url()
    os.environ["KOMBU_PG_URL"] = url
    from dlq_app import app, charge
    from celery_dlq import DLQ

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "dlq_app", "worker", "-l", "warning", "-P", "threads",
         "-c", "2", "-B", "-s", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dlq-demo-beat")],
        cwd=HERE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    dlq = DLQ(app)
    try:
        declined = charge.delay(1, 5000)  # NonRetryable: DLQ at once
        flaky = charge.delay(2, -1)  # retried at 1 s and 2 s, then DLQ
        deadline = time.monotonic() + 60
        while dlq.list().total < 2 and time.monotonic() < deadline:
            threading.Event().wait(0.2)
        for row in dlq.list().rows:
            print(f"DLQ #{row['id']}: {row['task_name']} {row['reason']} after {row['retries']} retries: "
                  f"{row['exception_type']}: {row['exception_message']}")
        print("stats:", {k: v for k, v in dlq.stats().items() if k in ("total", "dead", "by_reason")})
        print("requeue (it will fail again, same row, failure_count 2):",
              [r.detail for r in dlq.requeue(filters={"exception": "dlq_app.CardDeclined"}, note="demo")])
        del declined, flaky
        return 0
    finally:
        dlq.close()
        worker.terminate()
        worker.wait(30)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
