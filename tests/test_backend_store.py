"""The result store's SQL on its own (no Celery): atomicity and idempotency properties."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from kombu_pg.store import apply_migrations
from kombu_pg.store.results import ResultListener, ResultStore, results_channel

J = dict(content_type="application/json", content_encoding="utf-8")


@pytest.fixture
def store(pg_conn, schema):
    apply_migrations(pg_conn, schema)
    return ResultStore(pg_conn, schema)


@pytest.fixture
def listener(pg_url, schema, store):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        lst = ResultListener(conn, schema)
        lst.start()
        yield lst


def test_ready_store_notifies_with_the_task_id(store, listener):
    store.store("t1", "SUCCESS", result=b"1", ready=True, **J)
    assert listener.wait({"t1"}, timeout=5) == {"t1"}


def test_non_ready_store_does_not_notify(store, listener):
    store.store("t1", "STARTED", result=b"{}", ready=False, started=True, notify=False, **J)
    assert listener.wait(None, timeout=0.2) == set()


def test_notify_is_sent_only_if_the_transaction_commits(pg_conn, store, listener):
    with pytest.raises(RuntimeError):
        with pg_conn.transaction():
            store.store("t1", "SUCCESS", result=b"1", ready=True, **J)
            raise RuntimeError("rollback")
    assert listener.wait(None, timeout=0.2) == set()
    assert store.get("t1") is None


def test_success_is_final_and_skipped_writes_do_not_notify(store, listener):
    assert store.store("t1", "SUCCESS", result=b"1", ready=True, **J)
    assert listener.wait({"t1"}, timeout=5) == {"t1"}
    assert not store.store("t1", "FAILURE", result=b"{}", ready=True, **J)
    assert listener.wait(None, timeout=0.2) == set()
    assert store.get("t1")["status"] == "SUCCESS"


def test_date_started_is_kept_and_extended_fields_survive_later_states(store):
    store.store("t1", "STARTED", result=None, ready=False, started=True, name="n", worker="w", **J)
    started = store.get("t1")["date_started"]
    store.store("t1", "RETRY", result=None, ready=False, **J)
    store.store("t1", "SUCCESS", result=b"2", ready=True, started=False, **J)
    row = store.get("t1")
    assert row["date_started"] == started and row["name"] == "n" and row["worker"] == "w"
    assert row["date_done"] >= started


def test_get_many_filters_by_state(store):
    store.store("a", "SUCCESS", result=b"1", ready=True, **J)
    store.store("b", "STARTED", result=None, ready=False, **J)
    rows = store.get_many(["a", "b", "c"], ["SUCCESS", "FAILURE"])
    assert [r["task_id"] for r in rows] == ["a"]


def _part(store, gid, tid, index, token, size=None):
    return store.chord_part_return(gid, tid, index, "SUCCESS", b"1", token=token,
                                   size_hint=size, **J)


def test_chord_claim_is_unique_and_a_retried_call_sees_its_own_claim(store):
    gid = str(uuid.uuid4())
    store.chord_start(gid, task_ids=["a", "b"])
    store.set_chord_size(gid, 2)
    assert not _part(store, gid, "a", 0, "00000000-0000-0000-0000-000000000001").claimed
    token = "00000000-0000-0000-0000-000000000002"
    assert _part(store, gid, "b", 1, token).claimed
    # The same call retried after an ambiguous commit: still the claimer, no new count.
    again = _part(store, gid, "b", 1, token)
    assert again.claimed and again.done == 2
    # A different (duplicate) delivery of a part never claims.
    assert not _part(store, gid, "b", 1, "00000000-0000-0000-0000-000000000003").claimed


def test_parts_before_set_chord_size_are_counted(store):
    gid = str(uuid.uuid4())
    store.chord_start(gid, task_ids=["a", "b", "c"])
    assert not _part(store, gid, "c", 2, str(uuid.uuid4())).claimed
    assert not _part(store, gid, "a", 0, str(uuid.uuid4())).claimed
    store.set_chord_size(gid, 3)
    progress = _part(store, gid, "b", 1, str(uuid.uuid4()))
    assert progress.claimed and (progress.done, progress.size) == (3, 3)
    assert [p["task_id"] for p in store.chord_parts(gid)] == ["a", "b", "c"]


def test_size_hint_without_chord_row(store):
    gid = str(uuid.uuid4())
    assert _part(store, gid, "only", 0, str(uuid.uuid4()), size=1).claimed


def test_cleanup_deletes_in_batches(pg_conn, schema, store):
    for i in range(25):
        store.store(f"t{i}", "SUCCESS", result=b"1", ready=True, expires=3600, **J)
    store.store("keep", "SUCCESS", result=b"1", ready=True, expires=None, **J)
    pg_conn.execute(
        psycopg.sql.SQL("UPDATE {}.results SET expires_at = now() - interval '1s' "
                        "WHERE expires_at IS NOT NULL").format(psycopg.sql.Identifier(schema)))
    assert store.cleanup(batch=10)["results"] == 25
    assert store.counts()["results"] == 1


def test_channel_name():
    assert results_channel("kombu_pg") == "kombu_pg:results"


def test_chord_add_raises_the_target_even_before_the_size_is_set(store):
    gid = str(uuid.uuid4())
    store.chord_start(gid, task_ids=["a", "b"])
    store.chord_add(gid, "x")  # "a" adds a task "x" while running
    assert not _part(store, gid, "a", 0, str(uuid.uuid4())).claimed
    store.set_chord_size(gid, 2)
    assert not _part(store, gid, "b", 1, str(uuid.uuid4())).claimed
    assert _part(store, gid, "x", 0, str(uuid.uuid4())).claimed
    assert [p["task_id"] for p in store.chord_parts(gid)] == ["a", "b", "x"]


def test_chord_add_run_again_for_the_same_task_counts_it_once(store):
    # What the backend's retry after a lost reply does: the first run committed.
    gid = str(uuid.uuid4())
    store.chord_start(gid, task_ids=["a", "b"])
    store.chord_add(gid, "x")
    store.chord_add(gid, "x")
    store.chord_add(gid, "y")  # another added task still counts
    store.set_chord_size(gid, 2)
    for task_id, index in (("a", 0), ("b", 1), ("x", 0)):
        assert not _part(store, gid, task_id, index, str(uuid.uuid4())).claimed
    assert _part(store, gid, "y", 1, str(uuid.uuid4())).claimed
