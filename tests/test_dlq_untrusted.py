"""Stored bodies are deserialized only with the app's accept_content (result_accept_content
for result rows): a pickle that writes a file when loaded must never be loaded by `dlq show`,
GET /api/entries/ID, a send_task requeue or the backstop sweep."""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner
from psycopg import sql

from celery_dlq import DLQ
from celery_dlq.cli import EXIT_OK, EXIT_REFUSED, dlq
from celery_dlq.http import DLQAdmin
from celery_dlq.store import REFUSED_CONTENT, DLQStore, Entry

from .dlq_app import make_app, setup_schema
from .test_dlq_http import Server, request

PICKLE = "application/x-python-serialize"


class WritesAFile:
    """Unpickling it creates ``path``: the evidence that something deserialized it."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_message(marker, task_id: str) -> tuple[str, int]:
    """A protocol 2 message whose pickle body creates ``marker`` when loaded; and its size."""
    body = pickle.dumps(([WritesAFile(marker)], {}, {"callbacks": None, "errbacks": None}), protocol=4)
    doc = {"body": base64.b64encode(body).decode(), "content-encoding": "binary", "content-type": PICKLE,
           "headers": {"lang": "py", "task": "proj.unknown", "id": task_id, "retries": 0},
           "properties": {"body_encoding": "base64", "priority": 0,
                          "delivery_info": {"exchange": "", "routing_key": "celery"}}}
    return json.dumps(doc), len(body)


def add_pickle(store: DLQStore, marker) -> tuple[int, int]:
    task_id = str(uuid.uuid4())
    message, size = pickle_message(marker, task_id)
    row_id, _ = store.capture(Entry(message=message, reason="rejected", source="broker", task_id=task_id,
                                    task_name="proj.unknown", queue="celery", exchange="",
                                    routing_key="celery"))
    return row_id, size


@pytest.fixture
def env(pg_url, schema):
    setup_schema(pg_url, schema)
    app = make_app(pg_url, schema)  # accept_content: Celery's default, json only
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield {"app": app, "conn": conn, "schema": schema, "url": pg_url, "store": DLQStore(conn, schema)}
    app._celery_dlq.close()


def cli(app, *args):
    return CliRunner().invoke(dlq, list(args), obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))


def test_the_payload_does_write_its_file_when_pickle_is_accepted(pg_url, schema, tmp_path):
    """The control: an app that accepts pickle decodes the call, and the file appears, so
    the assertions below that it does not appear can fail."""
    setup_schema(pg_url, schema)
    app = make_app(pg_url, schema, accept_content=["json", "pickle"])
    marker = tmp_path / "unpickled"
    row_id, _ = add_pickle(app._celery_dlq.store(), marker)
    shown = DLQ(app).show(row_id)
    assert shown["body"]["accepted"] and shown["call"] is not None
    assert marker.exists()
    app._celery_dlq.close()


def test_cli_show_describes_the_body_without_unpickling_it(env, tmp_path):
    marker = tmp_path / "unpickled"
    row_id, size = add_pickle(env["store"], marker)
    result = cli(env["app"], "show", str(row_id))
    assert result.exit_code == EXIT_OK, result.output
    assert not marker.exists()
    assert f"body: {PICKLE}, {size} bytes, not in accept_content: not deserialized" in result.output
    assert "preview: \\x80\\x04" in result.output  # escaped bytes, not raw binary
    shown = json.loads(cli(env["app"], "show", str(row_id), "--json").output)
    assert not marker.exists()
    assert shown["call"] is None
    body = shown["body"]
    assert (body["content_type"], body["size"], body["accepted"]) == (PICKLE, size, False)
    assert body["preview"].startswith("\\x80\\x04") and "unpickled" in body["preview"]
    assert body["preview"].isascii() and body["preview"].isprintable()


def test_http_show_describes_the_body_without_unpickling_it(env, tmp_path):
    marker = tmp_path / "unpickled"
    row_id, size = add_pickle(env["store"], marker)
    server = Server(DLQAdmin(env["app"]))
    try:
        status, _, shown = request(f"{server.base}/api/entries/{row_id}")
    finally:
        server.close()
    assert status == 200, shown
    assert not marker.exists()
    assert shown["call"] is None
    assert (shown["body"]["content_type"], shown["body"]["size"], shown["body"]["accepted"]) == (PICKLE, size, False)
    assert shown["body"]["preview"].startswith("\\x80\\x04")


def test_send_task_requeue_refuses_a_body_it_would_have_to_unpickle(pg_url, schema, tmp_path):
    """Another broker: requeue goes through send_task, which needs the decoded call."""
    app = Celery("other", broker="memory://", set_as_current=False)
    app.conf.update(dlq_database_url=pg_url, dlq_schema=schema)
    api = DLQ(app)
    marker = tmp_path / "unpickled"
    row_id, _ = add_pickle(api.runtime.store(), marker)
    [result] = api.requeue([row_id])
    assert not marker.exists()
    assert (result.requeued, result.refused) == (False, REFUSED_CONTENT)
    assert PICKLE in result.detail
    assert api.show(row_id)["status"] == "dead"
    refused = cli(app, "requeue", str(row_id))
    assert refused.exit_code == EXIT_REFUSED and "refused" in refused.output
    assert not marker.exists()
    api.close()


def test_backstop_sweep_never_unpickles_a_result_row(env, tmp_path):
    """A FAILURE result stored as pickle (by a worker configured otherwise) is captured
    without loading its result, args or kwargs."""
    markers = {name: tmp_path / name for name in ("result", "args", "kwargs")}
    task_id = str(uuid.uuid4())
    env["conn"].execute(
        sql.SQL("INSERT INTO {}.results (task_id, status, content_type, content_encoding, result, "
                "traceback, date_done, name, args, kwargs, retries, queue) "
                "VALUES (%s, 'FAILURE', %s, 'binary', %s, 'Traceback ...', %s, 'dlq_app.ok', %s, %s, 0, "
                "'celery')").format(sql.Identifier(env["schema"])),
        (task_id, PICKLE, pickle.dumps({"exc_type": "ValueError", "exc_module": "builtins",
                                      "exc_message": [WritesAFile(markers["result"])]}),
         datetime.now(timezone.utc) - timedelta(minutes=5), pickle.dumps([WritesAFile(markers["args"])]),
         pickle.dumps({"x": WritesAFile(markers["kwargs"])})))
    api = DLQ(env["app"])
    assert api.reap()["swept"] == 1
    assert not any(m.exists() for m in markers.values())
    [row] = api.list().rows
    assert (row["task_id"], row["source"]) == (task_id, "backstop")
    shown = api.show(row["id"])
    assert "result_accept_content" in json.loads(shown["message"])["headers"]["dlq_unrebuildable"]
    assert not any(m.exists() for m in markers.values())
