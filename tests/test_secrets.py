"""No password (nor ``sslpassword``) in any error, repr, log line or command output.

Every test gives distinctive secrets and asserts they appear nowhere: exception text,
repr and traceback, the commands' output (real subprocesses), a real worker's log.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import traceback
import urllib.request
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from celery import Celery
from kombu import Connection

from kombu_pg.backend import PostgresBackend
from kombu_pg.config import ConfigurationError, build_conninfo, redact

from .worker import CeleryWorker

SECRET = "Pw-XyZZy-7731"
SSL_SECRET = "SslPw-QuuX-4412"
DEAD = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once


def assert_clean(*texts: object) -> None:
    for text in texts:
        assert SECRET not in str(text) and SSL_SECRET not in str(text), text
        # libpq echoes tokens decoded or not: neither half of a broken escape may show
        assert "XyZZy" not in str(text) and "QuuX" not in str(text), text


def exception_texts(exc: BaseException) -> list[str]:
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


def with_secrets(url: str, *, netloc: str | None = None) -> str:
    """``url`` with SECRET as its password and SSL_SECRET as its sslpassword."""
    parts = urlsplit(url)
    host = netloc or parts.netloc.rpartition("@")[2]
    user = parts.username or "postgres"
    query = "&".join(filter(None, [parts.query, f"sslpassword={SSL_SECRET}", "connect_timeout=2"]))
    return urlunsplit((parts.scheme, f"{user}:{SECRET}@{host}", parts.path, query, ""))


MALFORMED = [
    f"postgresql://u:{SECRET}%zz@h/db",  # libpq: invalid percent-encoded token: "<password>"
    f"postgresql://u:{SECRET}@h/db?bogus=1",
    f"postgresql://u:{SECRET}@[::1/db",
    f"postgresql://u@h/db?sslpassword={SSL_SECRET}%zz",
    f"postgresql://u@h/db?password={SECRET}&sslpassword={SSL_SECRET}&bad",
    f"host=h password={SECRET} sslpassword={SSL_SECRET}",  # a conninfo where a URL belongs
    f"mysql://u:{SECRET}@h/db",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_never_show_the_secret(url):
    with pytest.raises(ConfigurationError) as info:
        build_conninfo(url)
    assert_clean(*exception_texts(info.value))
    with pytest.raises(ConfigurationError) as info:
        Connection(url, transport="kombu_pg.transport:Transport").default_channel
    assert_clean(*exception_texts(info.value))
    app = Celery("secrets_backend", set_as_current=False)
    with pytest.raises(ConfigurationError) as info:
        PostgresBackend(app=app, url=url)
    assert_clean(*exception_texts(info.value))


@pytest.mark.parametrize("connect_kwargs", [
    {"password": SECRET, "bogus": "1"},
    {"sslpassword": SSL_SECRET, "port": "notaport"},
    {"password": f"{SECRET}'", "sslpassword": f"'{SSL_SECRET}"},
])
def test_bad_options_never_show_the_secret(pg_url, connect_kwargs):
    options = {"connect_kwargs": connect_kwargs}
    with pytest.raises(Exception) as info:
        Connection(with_secrets(pg_url, netloc=DEAD), transport_options=options).default_channel
    assert_clean(*exception_texts(info.value))
    app = Celery("secrets_backend", set_as_current=False)
    app.conf.result_backend_transport_options = options
    with pytest.raises(Exception) as info:
        PostgresBackend(app=app, url=with_secrets(pg_url, netloc=DEAD)).get_task_meta("x")
    assert_clean(*exception_texts(info.value))


@pytest.mark.parametrize("netloc", [DEAD, "no-such-host.invalid:5432", "127.0.0.1:99999"])
def test_unreachable_servers_never_show_the_secret(pg_url, netloc, caplog):
    caplog.set_level(logging.DEBUG)
    url = with_secrets(pg_url, netloc=netloc)
    conn = Connection(url, connect_timeout=2)
    with pytest.raises(Exception) as info:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    assert_clean(*exception_texts(info.value), repr(conn), conn.as_uri(), caplog.text)
    app = Celery("secrets_producer", broker=url, set_as_current=False)
    with pytest.raises(Exception) as info:
        app.send_task("t", retry=False)
    assert_clean(*exception_texts(info.value), caplog.text)
    backend = PostgresBackend(app=app, url=url)
    with pytest.raises(psycopg.OperationalError) as info:
        backend.get_task_meta("x")
    assert_clean(*exception_texts(info.value), backend.as_uri(), repr(backend), caplog.text)


def test_redact_masks_every_secret_key():
    text = redact(f"host=h user=u password={SECRET} sslpassword={SSL_SECRET}")
    assert "user=u" in text and "host=h" in text
    assert_clean(text)


APP_MODULE = """
import os
from celery import Celery
import kombu_pg, celery_dlq
app = Celery("secret_app", broker=os.environ["SECRET_BROKER"], backend=os.environ["SECRET_BACKEND"])
app.conf.broker_transport_options = {"schema": os.environ["KOMBU_PG_SCHEMA"]}
app.conf.result_backend_transport_options = {"schema": os.environ["KOMBU_PG_SCHEMA"]}
app.conf.broker_connection_retry_on_startup = True
app.conf.dlq_database_url = os.environ.get("SECRET_DLQ") or None
celery_dlq.install(app)

@app.task
def add(x, y):
    return x + y
"""


@pytest.fixture
def secret_env(tmp_path, pg_url, schema):
    (tmp_path / "secret_app.py").write_text(APP_MODULE)
    good = with_secrets(pg_url)
    return {"PYTHONPATH": str(tmp_path), "KOMBU_PG_SCHEMA": schema, "KOMBU_PG_URL": good,
            "SECRET_BROKER": good, "SECRET_BACKEND": good, "PYTHONUNBUFFERED": "1"}


def run(env: dict, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_commands_never_show_the_secret(secret_env, pg_url):
    dead = with_secrets(pg_url, netloc=DEAD)
    celery = [sys.executable, "-m", "celery", "-A", "secret_app"]
    kombu_pg = [sys.executable, "-c", "from kombu_pg.cli import main; main()"]
    dlq_dead = {**secret_env, "SECRET_DLQ": dead}
    cases = [
        (secret_env, kombu_pg + ["--url", MALFORMED[0], "status"], 2),
        (secret_env, kombu_pg + ["--url", MALFORMED[5], "status"], 2),
        (secret_env, kombu_pg + ["--url", dead, "status"], 1),
        (secret_env, kombu_pg + ["--url", dead, "migrate"], 1),
        ({**secret_env, "SECRET_BROKER": dead}, celery + ["pg", "status"], 1),
        ({**secret_env, "SECRET_BROKER": MALFORMED[0]}, celery + ["pg", "status"], 2),
        (dlq_dead, celery + ["dlq", "stats"], 1),
        (dlq_dead, celery + ["dlq", "list"], 1),
        (dlq_dead, celery + ["dlq", "requeue", "1"], 1),
        ({**secret_env, "SECRET_DLQ": MALFORMED[0]}, celery + ["dlq", "stats"], 1),
        # Celery masks result_backend itself, the userinfo password only: a query-string
        # secret there is documented as unsupported (docs/configuration.md).
        ({**secret_env, "SECRET_BACKEND": secret_env["SECRET_BACKEND"].split("?")[0]},
         celery + ["report"], 0),
    ]
    for env, cmd, code in cases:
        result = run(env, *cmd)
        assert result.returncode == code, (cmd, result.stdout, result.stderr)
        assert_clean(result.stdout, result.stderr)


def test_metrics_exporter_never_shows_the_secret(secret_env, pg_url):
    dead = with_secrets(pg_url, netloc=DEAD)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from kombu_pg.cli import main; main()", "--url", dead, "metrics",
         "--port", "0", "--addr", "127.0.0.1"],
        env={**os.environ, **secret_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "serving http://" in line:
                port = int(line.split("serving http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                break
        else:
            raise AssertionError("exporter did not start:\n" + "".join(lines))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            body = response.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    output = "".join(lines) + rest
    assert "broker query failed" in output  # the failure is reported, without the secret
    assert_clean(body, output)


def test_worker_logs_never_show_the_secret(secret_env, pg_url):
    # A working worker: banner (transport and results URLs), a task's round trip.
    with CeleryWorker("secret_app", secret_env) as worker:
        worker.wait_ready()
        app = Celery("secret_client", broker=secret_env["SECRET_BROKER"],
                     backend=secret_env["SECRET_BACKEND"], set_as_current=False)
        app.conf.broker_transport_options = {"schema": secret_env["KOMBU_PG_SCHEMA"]}
        app.conf.result_backend_transport_options = {"schema": secret_env["KOMBU_PG_SCHEMA"]}
        assert app.send_task("secret_app.add", (2, 3)).get(timeout=60) == 5
        assert "transport:" in worker.output()
        assert_clean(worker.output())
    # A worker whose broker is down: it logs the failed connection and keeps retrying.
    dead = with_secrets(pg_url, netloc=DEAD)
    with CeleryWorker("secret_app", {**secret_env, "SECRET_BROKER": dead}) as worker:
        worker.wait_for_line("Cannot connect to", timeout=60)
        assert_clean(worker.output())
