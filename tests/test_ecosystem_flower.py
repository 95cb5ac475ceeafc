"""Flower's Broker tab and /api/queues/length against kombu-pg, Flower started the
documented way (``celery -A proj flower``) by an app that never imports kombu_pg.

kombu-pg comes from an installed wheel (tests/ecosystem_venv.py): its import hook gives
Flower's ``Broker`` factory a client for ``postgresql://``.  The page is checked as
Headless Chromium renders it.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
import uuid

import pytest
from psycopg import sql

from tests.ecosystem_venv import installed  # noqa: F401  (a fixture)
from tests.test_flower import Flower, _wait_healthy, free_port

CHROMIUM = "/usr/bin/chromium"

PROJ = '''
import os
import time
from celery import Celery

app = Celery("proj", broker=os.environ["PROJ_URL"])
app.conf.broker_transport_options = {"schema": os.environ["PROJ_SCHEMA"], "polling_interval": 0.5}
# One message in flight per worker, unacked while its task runs.
app.conf.task_acks_late = True
app.conf.worker_prefetch_multiplier = 1

@app.task(name="proj.hold")
def hold(path):
    while not os.path.exists(path):
        time.sleep(0.05)  # the workload itself: run until the test releases it
'''


@pytest.fixture
def stack(installed, tmp_path, pg_url, schema):  # noqa: F811
    (tmp_path / "proj.py").write_text(PROJ)
    env = installed.env(tmp_path, PROJ_URL=pg_url, PROJ_SCHEMA=schema,
                        FLOWER_UNAUTHENTICATED_API="true")
    release = tmp_path / "release"
    node = f"eco{uuid.uuid4().hex[:8]}@localhost"
    worker = installed.process(["-m", "celery", "-A", "proj", "worker", "-P", "solo", "-l", "info",
                                "-n", node], env, name="worker").start()
    port = free_port()
    flower_proc = installed.process(["-m", "celery", "-A", "proj", "flower", f"--port={port}",
                                     "--address=127.0.0.1"], env, name="flower")
    try:
        worker.wait_for_line(r"\bready\.$", timeout=60)
        flower_proc.start()
        flower = Flower(f"http://127.0.0.1:{port}", flower_proc)
        _wait_healthy(flower, timeout=60)
        yield installed, tmp_path, env, release, flower
    finally:
        release.touch()
        flower_proc.stop()
        worker.stop()


def _publish(venv, env, release, count: int) -> None:
    script = f"from proj import hold\nfor _ in range({count}): hold.delay({str(release)!r})\n"
    out = venv.run(["-c", script], env)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Chromium: apt-get install chromium")
def test_broker_tab_and_queue_lengths(stack, pg_conn, schema):
    venv, project, env, release, flower = stack
    _publish(venv, env, release, 4)
    # One task runs and holds the solo worker; its message (acks_late) and any the worker
    # prefetched are unacked, the rest ready.  Wait for the worker to take the first.
    flower.poll("/api/queues/length",
                lambda body: any(q["name"] == "celery" and q["messages_unacknowledged"] >= 1
                                 for q in body["active_queues"]),
                timeout=60, what="an unacked message in 'celery'")
    while True:
        # The counts, read from the tables around Flower's answers: equal before and after
        # means nothing moved in between (a prefetch may still land), so all must agree.
        before = _counts(pg_conn, schema)
        api = flower.json("/api/queues/length")["active_queues"]
        cells = _broker_row(_chromium_dom(flower.base + "/broker"), "celery")
        if _counts(pg_conn, schema) == before:
            break
    ready, unacked = before
    assert ready + unacked == 4 and unacked >= 1
    assert api == [{"name": "celery", "messages": 4, "messages_ready": ready,
                    "messages_unacknowledged": unacked}]
    # Queue, Messages, Unacked, Ready (then consumers and idle since, which kombu-pg leaves empty).
    assert cells[:4] == ["celery", "4", str(unacked), str(ready)], cells


def _counts(conn, schema: str) -> tuple[int, int]:
    query = sql.SQL("SELECT count(*) FILTER (WHERE lock_token IS NULL),"
                    " count(*) FILTER (WHERE lock_token IS NOT NULL)"
                    " FROM {}.messages WHERE queue = 'celery'").format(sql.Identifier(schema))
    row = conn.execute(query).fetchone()
    return int(row[0]), int(row[1])


def _broker_row(page: str, queue: str) -> list[str]:
    """The text of the Broker table's cells for ``queue``, as the browser rendered them."""
    assert "No queue data is available" not in page
    row = re.search(rf'<tr id="{re.escape(queue)}">(.*?)</tr>', page, re.S)
    assert row, page[:2000]
    return [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
            for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)]


def _chromium_dom(url: str) -> str:
    profile = tempfile.mkdtemp(prefix="eco-chromium-")
    try:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
