"""kombu_pg.contrib.pytest in a user's test suite: pytest run in a subprocess on a tiny
project whose tests use Celery's ``celery_app`` and ``celery_worker`` fixtures."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

USER_TEST = '''
def test_a_task_round_trip(celery_app, celery_worker, kombu_pg_schema):
    @celery_app.task
    def mul(x, y):
        return x * y

    celery_worker.reload()
    assert mul.delay(4, 4).get(timeout=30) == 16
    # Both ends are kombu-pg, not Celery's in-memory defaults.
    assert celery_app.connection_for_write().transport.driver_type == "postgresql"
    assert type(celery_app.backend).__module__ == "kombu_pg.backend"
    print("SCHEMA", kombu_pg_schema)
'''


def _run_user_suite(tmp_path, conftest: str, args: list[str], url: str | None) -> str:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the user's rootdir, not this repository's
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_tasks.py").write_text(USER_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("KOMBU_PG_URL", "PYTHONPATH")}
    if url:
        env["KOMBU_PG_URL"] = url
    out = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
                          *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed" in out.stdout
    return re.search(r"SCHEMA (\w+)", out.stdout).group(1)


@pytest.mark.parametrize("conftest, args", [
    ('pytest_plugins = ["kombu_pg.contrib.pytest"]\n', []),
    # pytest-celery (a test extra here) registers Docker-based fixtures of the same names
    # from its pytest11 entry point; on the command line they must be turned off.
    ("", ["-p", "no:celery", "-p", "kombu_pg.contrib.pytest"]),
], ids=["conftest-line", "-p"])
def test_users_suite_gets_a_kombu_pg_broker_and_backend(tmp_path, pg_url, pg_conn, conftest, args):
    schema = _run_user_suite(tmp_path, conftest, args, pg_url)
    # The session's schema was used, then dropped.
    left = pg_conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", [schema])
    assert left.fetchone()[0] == 0


def test_without_a_url_it_embeds_a_server(tmp_path):
    pytest.importorskip("pgserver", reason="the embedded server is the kombu-pg[embedded] extra")
    _run_user_suite(tmp_path, 'pytest_plugins = ["kombu_pg.contrib.pytest"]\n', [], None)
