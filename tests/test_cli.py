"""``celery pg`` / ``kombu-pg`` commands against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
from click.testing import CliRunner

from kombu_pg.cli import pg
from kombu_pg.store import BrokerStore, apply_migrations, connect

from .worker import TESTS_DIR


def run(*args):
    return CliRunner().invoke(pg, list(args), catch_exceptions=False)


def test_migrate_applies_then_reports_up_to_date(pg_url, schema):
    first = run("--url", pg_url, "--schema", schema, "migrate")
    assert first.exit_code == 0 and "applied migration(s) 1" in first.output
    again = run("--url", pg_url, "--schema", schema, "migrate")
    assert again.exit_code == 0 and "up to date" in again.output


def test_migrate_print_needs_no_database(schema):
    result = run("--schema", schema, "migrate", "--print")
    assert result.exit_code == 0
    assert f'CREATE SCHEMA IF NOT EXISTS "{schema}"' in result.output


def test_printed_sql_is_what_migrate_would_apply(pg_url, schema):
    printed = run("--schema", schema, "migrate", "--print").output
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(printed)
    assert "up to date" in run("--url", pg_url, "--schema", schema, "migrate").output


def test_bad_schema_and_unreachable_server_give_distinct_exit_codes(pg_url):
    assert run("--url", pg_url, "--schema", "bad;name", "migrate").exit_code == 2
    assert run("--url", "postgresql://postgres@127.0.0.1:1/x?connect_timeout=2", "status").exit_code == 1


def test_status_shows_queues_keys_and_poison(pg_url, schema):
    conn = connect(pg_url)
    apply_migrations(conn, schema)
    store = BrokerStore(conn, schema)
    cid = store.register_consumer()
    store.publish("work", "a", serial_key="user:1")
    store.publish("work", "b", serial_key="user:1")
    store.publish("work", "c")
    store.claim("work", 1, cid)  # user:1's head goes in flight
    result = run("--url", pg_url, "--schema", schema, "status", "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    [queue] = report["queues"]
    assert (queue["queue"], queue["ready"], queue["in_flight"], queue["keys_in_flight"]) == ("work", 2, 1, 1)
    [key] = report["serial_keys"]
    assert (key["serial_key"], key["in_flight"], key["waiting"]) == ("user:1", True, 1)
    assert len(report["consumers"]) == 1
    conn.close()


def test_celery_subcommand_uses_the_apps_broker(pg_url, schema):
    env = {"KOMBU_PG_URL": pg_url, "KOMBU_PG_SCHEMA": schema, "PYTHONPATH": str(TESTS_DIR)}
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "celery_app", "pg", "migrate"],
                            env={**os.environ, **env}, capture_output=True, text=True,
                            cwd=TESTS_DIR, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"schema {schema}: applied" in result.stdout
