"""``celery dlq ...``: filters, --json, --dry-run, exit codes (L1, L3, L4, L6, A3 admin path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from celery.bin.base import CLIContext
from click.testing import CliRunner
from psycopg import sql

from celery_dlq.cli import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, dlq
from celery_dlq.store import DLQStore, Entry
from kombu_pg.store import BrokerStore

from .dlq_app import make_app, setup_schema
from .test_dlq_store import kombu_message


@pytest.fixture
def env(pg_url, schema):
    setup_schema(pg_url, schema)
    app = make_app(pg_url, schema)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield {"app": app, "conn": conn, "schema": schema, "url": pg_url,
               "store": DLQStore(conn, schema), "broker": BrokerStore(conn, schema)}
    app._celery_dlq.close()


def cli(env, *args, app=None):
    result = CliRunner().invoke(dlq, list(args), obj=CLIContext(app=app or env["app"], no_color=True,
                                                                 workdir=None, quiet=True))
    return result


def add(env, *, task="proj.a", reason="non_retryable", exc="ValueError", queue="celery"):
    task_id = str(uuid.uuid4())
    row_id, _ = env["store"].capture(Entry(
        message=kombu_message(task_id, task), reason=reason, source="signal", task_id=task_id,
        task_name=task, queue=queue, exchange="", routing_key=queue, exception_type=exc,
        exception_message="boom"))
    return row_id


def messages(env):
    return env["conn"].execute(sql.SQL("SELECT count(*) FROM {}.messages")
                               .format(sql.Identifier(env["schema"]))).fetchone()[0]


def test_list_filters_total_and_cursor(env):
    ids = [add(env, task="proj.a") for _ in range(5)] + [add(env, task="proj.b", exc="KeyError")]
    result = cli(env, "list", "--task", "proj.a", "--limit", "2", "--json")
    assert result.exit_code == EXIT_OK, result.output
    page = json.loads(result.output)
    assert page["total"] == 5 and [r["id"] for r in page["rows"]] == ids[4:2:-1]
    page2 = json.loads(cli(env, "list", "--task", "proj.a", "--limit", "2", "--cursor",
                           str(page["next_cursor"]), "--json").output)
    assert [r["id"] for r in page2["rows"]] == ids[2:0:-1]
    assert json.loads(cli(env, "list", "--exception", "KeyError", "--json").output)["total"] == 1
    assert json.loads(cli(env, "list", "--since", "1h", "--until", "2999-01-01", "--json").output)["total"] == 6
    assert json.loads(cli(env, "list", "--since", "2999-01-01T00:00:00", "--json").output)["total"] == 0
    assert cli(env, "list", "--limit", "5000").exit_code == EXIT_USAGE  # page size is capped
    assert "6 entries match" in cli(env, "list").output


def test_exit_codes_distinguish_success_not_found_and_errors(env, pg_url):
    row_id = add(env)
    assert cli(env, "show", str(row_id), "--json").exit_code == EXIT_OK
    assert cli(env, "show", "999999").exit_code == EXIT_NOT_FOUND
    assert cli(env, "delete", str(row_id)).exit_code == EXIT_OK  # L3: true...
    assert cli(env, "delete", str(row_id)).exit_code == EXIT_NOT_FOUND  # ...then false
    assert cli(env, "requeue", "999999").exit_code == EXIT_NOT_FOUND
    assert cli(env, "note", "999999", "x").exit_code == EXIT_NOT_FOUND
    # L4: bulk operations need ids or a filter; unknown options are refused.
    assert cli(env, "delete").exit_code == EXIT_USAGE
    assert cli(env, "requeue").exit_code == EXIT_USAGE
    assert cli(env, "purge").exit_code == EXIT_USAGE
    assert cli(env, "delete", "--tsak", "proj.a").exit_code == EXIT_USAGE
    assert cli(env, "list", "--reason", "bogus").exit_code == EXIT_USAGE
    # A database that cannot be reached is an error, not a crash.
    broken = make_app("postgresql://postgres@127.0.0.1:1/nope", env["schema"])
    result = cli(env, "stats", app=broken)
    assert result.exit_code == EXIT_ERROR and "error:" in result.output


def test_out_of_range_times_are_usage_errors(env):
    # The CLI shares the HTTP admin's time parser: an age past year 1 is bad usage, not a crash.
    for value in ("99999999999w", "9" * 400 + "s", "yesterday"):
        result = cli(env, "list", "--since", value)
        assert result.exit_code == EXIT_USAGE and "Invalid value for '--since'" in result.output, result.output
    assert cli(env, "list", "--since", "2h").exit_code == EXIT_OK


def test_bulk_operations_dry_run_then_real(env):
    a = [add(env, task="proj.a") for _ in range(3)]
    b = add(env, task="proj.b")
    result = cli(env, "requeue", "--task", "proj.a", "--dry-run", "--json")
    assert result.exit_code == EXIT_OK
    assert [r["detail"] for r in json.loads(result.output)] == ["would requeue"] * 3
    assert messages(env) == 0  # dry run changed nothing
    result = cli(env, "requeue", "--task", "proj.a", "--note", "after deploy 42", "--json")
    assert [r["requeued"] for r in json.loads(result.output)] == [True] * 3
    assert messages(env) == 3
    assert env["store"].get(a[0])["notes"] == ["after deploy 42"]

    assert json.loads(cli(env, "delete", "--status", "requeued", "--dry-run", "--json").output)[
        "would_delete"] == a
    assert env["store"].count() == 4
    assert json.loads(cli(env, "purge", "--task", "proj.b", "--json").output) == {"deleted": 1}
    assert json.loads(cli(env, "purge", "--all", "--dry-run", "--json").output) == {"would_delete": 3}
    assert json.loads(cli(env, "purge", "--all", "--json").output) == {"deleted": 3}
    del b


def test_stats_empty_then_filled(env):
    """L6."""
    stats = json.loads(cli(env, "stats", "--json").output)
    assert (stats["total"], stats["failures"], stats["by_task"], stats["by_reason"]) == (0, 0, {}, {})
    add(env, task="proj.a")
    add(env, task="proj.a", reason="rejected")
    stats = json.loads(cli(env, "stats", "--json").output)
    assert stats["by_task"] == {"proj.a": {"entries": 2, "failures": 2}}
    assert set(stats["by_reason"]) == {"non_retryable", "rejected"}


def test_reap_command_and_admin_purge_capture_first(env):
    """A3: every admin path that deletes runs capture first; `dlq reap` is the cron entry."""
    consumer = env["broker"].register_consumer()
    for _ in range(3):
        env["broker"].publish("work", kombu_message())
    for _ in range(2):  # max_deliveries is 2 in dlq_app
        env["broker"].requeue([c.token for c in env["broker"].claim("work", 10, consumer)])
    dry = json.loads(cli(env, "reap", "--dry-run", "--json").output)
    assert dry["would_move"] == 3 and messages(env) == 3
    add(env, task="proj.old")
    assert cli(env, "purge", "--task", "proj.old").exit_code == EXIT_OK
    assert messages(env) == 0  # the purge captured the exhausted messages first
    assert env["store"].count({"reason": "max_deliveries"}) == 3
    assert json.loads(cli(env, "reap", "--json").output)["moved"] == 0


def test_the_real_celery_command_line(env):
    """`python -m celery_dlq -A dlq_app dlq ...` is the celery CLI with dlq added."""
    row_id = add(env)
    tests_dir = Path(__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, "-m", "celery_dlq", "-A", "dlq_app", "dlq", "show", str(row_id), "--json"],
        cwd=tests_dir, capture_output=True, text=True, timeout=60,
        env={**os.environ, "KOMBU_PG_URL": env["url"], "DLQ_SCHEMA": env["schema"],
             "PYTHONPATH": str(tests_dir)})
    assert proc.returncode == EXIT_OK, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["id"] == row_id and shown["call"]["args"] == [1, 2]


def test_reap_loop_runs_at_once_and_stops_on_sigterm(env):
    """B2 at the command line: first pass immediately, SIGTERM ends it promptly."""
    import signal
    import time

    tests_dir = Path(__file__).resolve().parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery_dlq", "-A", "dlq_app", "dlq", "reap", "--loop", "--interval", "3600"],
        cwd=tests_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "KOMBU_PG_URL": env["url"], "DLQ_SCHEMA": env["schema"],
             "PYTHONPATH": str(tests_dir), "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()  # blocks until the first pass reports
        assert first.startswith("moved 0, swept 0"), first
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(10) == EXIT_OK
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_requeue_keep_retries_option(env):
    """``--keep-retries`` keeps the stored retry count; without it the message gets 0."""
    task_id = str(uuid.uuid4())
    row_id = env["store"].capture(Entry(
        message=kombu_message(task_id, "proj.a", retries=2), reason="retries_exhausted", source="signal",
        task_id=task_id, task_name="proj.a", queue="celery", exchange="", routing_key="celery"))[0]

    def queued_retries():
        payloads = env["conn"].execute(sql.SQL("SELECT payload FROM {}.messages ORDER BY id").format(
            sql.Identifier(env["schema"]))).fetchall()
        return [json.loads(p)["headers"]["retries"] for (p,) in payloads]

    assert cli(env, "requeue", str(row_id)).exit_code == EXIT_OK
    assert cli(env, "requeue", str(row_id), "--force", "--keep-retries").exit_code == EXIT_OK
    assert queued_retries() == [0, 2]
