"""The SQL store on its own: no Kombu, no Celery, a real PostgreSQL."""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg import sql

from kombu_pg.config import ConfigurationError
from kombu_pg.store import (
    BrokerStore, MigrationError, apply_migrations, connect, current_version, ensure_schema, migration_sql,
)
from kombu_pg.store.broker import OutgoingMessage
from kombu_pg.store.migrations import all_migrations
from tests.worker import wait_until


def test_migrations_are_idempotent(pg_conn, schema):
    latest = all_migrations()[-1].version
    assert apply_migrations(pg_conn, schema) == list(range(1, latest + 1))
    assert apply_migrations(pg_conn, schema) == []
    assert current_version(pg_conn, schema) == latest


def test_twenty_concurrent_migrations_apply_once(pg_url, schema):
    barrier = threading.Barrier(20)
    results, errors = [], []

    def migrate():
        try:
            with connect(pg_url) as conn:
                barrier.wait()
                results.append(apply_migrations(conn, schema))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(1 for r in results if r) == 1


def test_printed_sql_builds_the_same_schema(pg_conn, schema):
    pg_conn.execute(migration_sql(schema))
    assert current_version(pg_conn, schema) == all_migrations()[-1].version
    assert apply_migrations(pg_conn, schema) == []


def test_ensure_schema_checks_once_per_conninfo_and_schema_per_process(pg_url, schema):
    conn = connect(pg_url)
    ensure_schema(conn, pg_url, schema, auto_migrate=True)
    assert current_version(conn, schema) == all_migrations()[-1].version
    conn.close()
    # Known to be current now: whoever asks next (transport, backend, DLQ) sends nothing,
    # so a closed connection does not matter; with or without auto_migrate.
    ensure_schema(conn, pg_url, schema, auto_migrate=True)
    ensure_schema(conn, pg_url, schema, auto_migrate=False)
    ensure_schema(conn, pg_url, schema, auto_migrate=False, minimum=1)
    # Another schema, or the same one on another server, is checked on its own.
    with pytest.raises(psycopg.OperationalError):
        ensure_schema(conn, pg_url, schema + "_other", auto_migrate=False)
    with pytest.raises(psycopg.OperationalError):
        ensure_schema(conn, pg_url + "?application_name=other", schema, auto_migrate=False)


def test_ensure_schema_without_auto_migrate_changes_nothing(pg_conn, pg_url, schema):
    with pytest.raises(MigrationError, match="pg migrate"):
        ensure_schema(pg_conn, pg_url, schema, auto_migrate=False)
    with pytest.raises(MigrationError, match="at version 0; version 2 is needed"):
        ensure_schema(pg_conn, pg_url, schema, auto_migrate=False, minimum=2)
    assert current_version(pg_conn, schema) == 0  # nothing was created
    # A schema at least at ``minimum`` passes that check, and is remembered only as that
    # version: the exact check still refuses it.
    first = all_migrations()[0]
    pg_conn.execute(migration_sql(schema).split(f"-- {all_migrations()[1].version:04d}_")[0])
    assert current_version(pg_conn, schema) == first.version
    ensure_schema(pg_conn, pg_url, schema, auto_migrate=False, minimum=first.version)
    with pytest.raises(MigrationError, match="pg migrate"):
        ensure_schema(pg_conn, pg_url, schema, auto_migrate=False)
    ensure_schema(pg_conn, pg_url, schema, auto_migrate=True)
    assert current_version(pg_conn, schema) == all_migrations()[-1].version


@pytest.mark.parametrize("bad", ["", "1abc", 'x"; DROP TABLE y; --', "a" * 49, "sp ace", None, "é"])
def test_invalid_schema_is_refused_before_any_sql(pg_conn, bad):
    with pytest.raises(ConfigurationError):
        apply_migrations(pg_conn, bad)
    with pytest.raises(ConfigurationError):
        BrokerStore(pg_conn, bad)


def test_claim_order_is_priority_then_fifo(store):
    cid = store.register_consumer()
    for i, prio in enumerate([0, 5, 9, 5, 0]):
        store.publish("q", f"m{i}", priority=prio)
    claimed = store.claim("q", 10, cid)
    assert [c.payload for c in claimed] == ["m2", "m1", "m3", "m0", "m4"]
    assert all(c.delivery_count == 1 for c in claimed)


def test_claim_takes_at_most_limit_and_skips_locked(store):
    cid = store.register_consumer()
    for i in range(5):
        store.publish("q", str(i))
    first = store.claim("q", 3, cid)
    second = store.claim("q", 3, cid)
    assert len(first) == 3 and len(second) == 2
    assert not {c.id for c in first} & {c.id for c in second}
    assert store.claim("q", 3, cid) == []


def test_requeue_is_in_place_and_late_ack_is_fenced(store):
    cid = store.register_consumer()
    store.publish("q", "only")
    [first] = store.claim("q", 1, cid)
    assert store.requeue([first.token]) == ["q"]
    [second] = store.claim("q", 1, cid)
    assert second.id == first.id and second.delivery_count == 2
    store.ack([first.token])  # stale token: must not delete the redelivery
    assert store.conn.execute(
        sql.SQL("SELECT count(*) FROM {}.messages").format(sql.Identifier(store.schema))
    ).fetchone()[0] == 1
    store.ack([second.token])
    assert store.size("q") == 0 and store.claim("q", 1, cid) == []


def test_a_claim_acks_first_so_a_freed_key_is_claimed_in_the_same_statement(store):
    cid = store.register_consumer()
    store.publish("q", "k1", serial_key="k")
    store.publish("q", "k2", serial_key="k")
    [first] = store.claim("q", 5, cid)
    assert first.payload == "k1"  # k2 waits: its key is in flight
    [second] = store.claim("q", 5, cid, acks=[first.token])
    assert second.payload == "k2"
    assert store.conn.execute(
        sql.SQL("SELECT payload FROM {}.messages").format(sql.Identifier(store.schema))
    ).fetchall() == [("k2",)]


@pytest.mark.parametrize("durable", [True, False])
def test_claims_and_acks_wait_for_the_wal_flush_only_when_durable(store, durable):
    cid = store.register_consumer()
    store.publish("q", "m")
    expected = "on" if durable else "off"
    with store.conn.transaction():
        [claimed] = store.claim("q", 1, cid, durable=durable)
        assert store.conn.execute("SHOW synchronous_commit").fetchone()[0] == expected
    with store.conn.transaction():
        store.ack([claimed.token], durable=durable)
        assert store.conn.execute("SHOW synchronous_commit").fetchone()[0] == expected
    # Local to the claim's or ack's transaction: a publish after them commits durably.
    assert store.conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    assert store.size("q") == 0


def test_purge_removes_ready_messages_only(store):
    cid = store.register_consumer()
    for i in range(4):
        store.publish("q", str(i))
    [held] = store.claim("q", 1, cid)
    assert store.purge("q").messages == 3
    store.requeue([held.token])
    assert store.size("q") == 1


def test_ttl_hides_expired_messages_and_recovery_deletes_them(store):
    cid = store.register_consumer()
    store.publish("q", "expired", ttl=0)
    store.publish("q", "fresh", ttl=60)
    assert [c.payload for c in store.claim("q", 10, cid)] == ["fresh"]
    assert store.recover([cid]).expired_messages == 1


def _last_used(store, name: str, seconds_ago: float) -> None:
    """The queue was last declared, consumed or read ``seconds_ago`` (time passing)."""
    store.conn.execute(sql.SQL("UPDATE {}.queues SET last_used_at = now() - make_interval(secs => %s) "
                               "WHERE name = %s").format(sql.Identifier(store.schema)), [seconds_ago, name])


def _pass_finding_dead(store, own):
    """A recovery pass that found a dead consumer (its session's end is asynchronous)."""
    reports = []
    wait_until(lambda: reports.append(store.recover(own)) or reports[-1].dead_consumers, 10,
               "a recovery pass to find the closed session's consumer")
    return reports[-1]


def test_x_expires_spares_consumed_queues_and_counts_from_the_last_consumer(store, pg_url):
    other = BrokerStore(connect(pg_url), store.schema)
    gone_later = other.register_consumer()
    me = store.register_consumer()
    for name in ("idle", "consumed", "cancelled"):
        store.declare_queue(name, expires_ms=60_000)
    other.consume_queue("consumed", gone_later)
    store.consume_queue("cancelled", me)
    for name in ("idle", "consumed", "cancelled"):
        _last_used(store, name, 3600)  # an hour ago: idle since, or consumed all along
    assert store.recover([me]).expired_queues == ["idle"]
    # The clock starts when the last consumer leaves: cancelled, or its session ended.
    store.cancel_queue("cancelled", me)
    other.conn.close()
    report = _pass_finding_dead(store, [me])
    assert report.dead_consumers == [gone_later] and report.expired_queues == []
    for name in ("consumed", "cancelled"):
        _last_used(store, name, 61)
    assert sorted(store.recover([me]).expired_queues) == ["cancelled", "consumed"]


def test_temporary_queues_live_as_long_as_their_session_or_a_consumer(store, pg_url):
    other = BrokerStore(connect(pg_url), store.schema)
    owner = other.register_consumer()
    other.declare_queue("mine.x", exclusive=True, owner=owner)
    other.declare_queue("mine.ad", auto_delete=True, owner=owner)
    other.declare_queue("shared.ad", auto_delete=True, owner=owner)
    store.declare_queue("nobodys.ad", auto_delete=True)
    reader = store.register_consumer()
    store.consume_queue("shared.ad", reader)
    assert store.recover([reader]).expired_queues == ["nobodys.ad"]
    other.conn.close()
    assert sorted(_pass_finding_dead(store, [reader]).expired_queues) == ["mine.ad", "mine.x"]
    store.cancel_queue("shared.ad", reader)
    assert store.recover([reader]).expired_queues == ["shared.ad"]


def test_queue_ttl_applies_to_messages(store):
    cid = store.register_consumer()
    store.declare_queue("q", message_ttl_ms=0)
    store.publish("q", "gone")
    assert store.claim("q", 1, cid) == []


def test_max_deliveries_stops_poison_but_keeps_it(store):
    cid = store.register_consumer()
    store.publish("q", "poison")
    for _ in range(3):
        [c] = store.claim("q", 1, cid, max_deliveries=3)
        store.requeue([c.token])
    assert store.claim("q", 1, cid, max_deliveries=3) == []
    assert store.size("q") == 1  # still there, unlocked, for the reaper
    assert len(store.claim("q", 1, cid, max_deliveries=None)) == 1


def test_routing_by_exchange_type(store):
    store.declare_exchange("d", "direct")
    store.declare_exchange("t", "topic")
    store.declare_exchange("f", "fanout")
    store.bind("d", "qd", "key", None, exchange_type="direct")
    store.bind("t", "qt", "a.*", r"^a\..*?[^\.]$", exchange_type="topic")
    store.bind("f", "qf1", "", None, exchange_type="fanout")
    store.bind("f", "qf2", "", None, exchange_type="fanout")
    assert store.publish_routed("d", "key", "x") == ["qd"]
    assert store.publish_routed("d", "other", "x") == []
    assert store.publish_routed("t", "a.b", "x") == ["qt"]
    assert store.publish_routed("t", "b.a", "x") == []
    assert sorted(store.publish_routed("f", "anything", "x")) == ["qf1", "qf2"]
    store.unbind("f", "qf2", "")
    assert store.publish_routed("f", "", "x") == ["qf1"]


def test_publish_many_routes_like_single_publishes_in_one_statement(store, pg_conn):
    store.declare_exchange("t", "topic")
    store.declare_exchange("f", "fanout")
    store.bind("t", "qt", "a.*", r"^a\..*?[^\.]$", exchange_type="topic")
    store.bind("f", "qf1", "", None, exchange_type="fanout")
    store.bind("f", "qf2", "", None, exchange_type="fanout")
    batch = [OutgoingMessage("qd", "1"), OutgoingMessage("a.b", "2", exchange="t"),
             OutgoingMessage("x", "3", exchange="f"), OutgoingMessage("b.a", "4", exchange="t"),
             OutgoingMessage("qd", "5")]
    store.publish_many(batch)
    stored = pg_conn.execute(sql.SQL("SELECT queue, payload FROM {}.messages ORDER BY id").format(
        sql.Identifier(store.schema))).fetchall()
    # In publish order, a fanout copy per bound queue; the unroutable one dropped.
    assert stored == [("qd", "1"), ("qt", "2"), ("qf1", "3"), ("qf2", "3"), ("qd", "5")]
    store.publish_many([OutgoingMessage("b.a", "6", exchange="t")], deadletter="dead")
    assert store.size("dead") == 1


def test_publish_many_writes_job_keys_in_their_place_in_one_transaction(store, pg_conn):
    def stored():
        return pg_conn.execute(sql.SQL("SELECT payload, job_key FROM {}.messages ORDER BY id").format(
            sql.Identifier(store.schema))).fetchall()

    store.publish("q", "waiting")
    store.publish_job("q", '{"headers": {"id": "old"}}', "k1")  # replacing reads its task id
    assert store.publish_many([OutgoingMessage("q", "1"), OutgoingMessage("q", "2", job_key="k2"),
                               OutgoingMessage("q", "3"), OutgoingMessage("q", "new", job_key="k1"),
                               OutgoingMessage("q", "dropped", job_key="k2", job_key_mode="keep"),
                               OutgoingMessage("q", "4")]) == 5
    # k1's waiting message was replaced in place (it keeps its id); the rest in publish order.
    assert stored() == [("waiting", None), ("new", "k1"), ("1", None), ("2", "k2"), ("3", None), ("4", None)]

    pg_conn.execute(sql.SQL("ALTER TABLE {}.messages ADD CONSTRAINT refused CHECK (payload <> 'refused') NOT VALID")
                    .format(sql.Identifier(store.schema)))
    with pytest.raises(psycopg.errors.CheckViolation):
        store.publish_many([OutgoingMessage("q", "5"), OutgoingMessage("q", "6", job_key="k6"),
                            OutgoingMessage("q", "refused")])
    assert len(stored()) == 6  # the job-keyed one went with the rest
    assert store.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_recovery_frees_a_terminated_consumers_messages(pg_url, store):
    victim_conn = connect(pg_url)
    victim = BrokerStore(victim_conn, store.schema)
    victim_id = victim.register_consumer()
    store.publish("q", "held")
    [held] = victim.claim("q", 1, victim_id)
    # A live consumer keeps its messages, however old.
    assert store.recover([]).released == {}
    store.conn.execute("SELECT pg_terminate_backend(%s, 5000)", (victim_conn.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        victim_conn.execute("SELECT 1")
    report = store.recover([])
    assert report.dead_consumers == [victim_id]
    assert report.released == {"q": 1}
    cid = store.register_consumer()
    [again] = store.claim("q", 1, cid)
    assert again.id == held.id and again.delivery_count == 2


def test_visibility_timeout_reclaims_from_a_live_consumer(store):
    cid = store.register_consumer()
    store.publish("q", "stuck")
    [held] = store.claim("q", 1, cid)
    assert store.recover([cid], visibility_timeout=3600).released == {}
    assert store.recover([cid], visibility_timeout=0.000001).released == {"q": 1}
    store.ack([held.token])  # the hung worker's late ack is a no-op
    assert store.size("q") == 1


def test_clean_unregister_hands_back_everything(store):
    cid = store.register_consumer()
    store.publish("q", "a")
    store.publish("q", "b")
    store.claim("q", 2, cid)
    assert store.unregister_consumer(cid) == ["q"]
    assert store.size("q") == 2


def test_notify_reaches_a_listener(pg_url, store):
    from kombu_pg.store.wakeups import Listener

    listener = Listener(pg_url, store.channel)
    try:
        # A publish notifies the queues that have an idle consumer: this listener's.
        BrokerStore(listener.conn, store.schema).mark_idle(["some queue", "q2"])
        store.publish("some queue", "x")
        assert listener.wait(5) == {"some queue"}
        store.publish("q2", "x", notify=False)
        assert listener.wait(0.05) == set()
    finally:
        listener.close()


def test_nul_characters_survive(store):
    cid = store.register_consumer()
    store.publish("q", '{"argsrepr": "\\u0000"}')
    [c] = store.claim("q", 1, cid)
    assert c.payload == '{"argsrepr": "\\u0000"}'


def test_x_max_priority_caps_priorities(store):
    """AMQP: a priority above the queue's x-max-priority counts as the maximum, so it
    no longer jumps ahead of equal-capped messages published earlier."""
    cid = store.register_consumer()
    store.declare_queue("capped", max_priority=3)
    store.publish("capped", "first", priority=3)
    store.publish("capped", "second", priority=9)
    store.publish("other", "x", priority=9)
    assert [c.payload for c in store.claim("capped", 5, cid)] == ["first", "second"]
    assert [c.priority for c in store.claim("other", 5, cid)] == [9]


