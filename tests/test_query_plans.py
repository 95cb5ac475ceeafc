"""The claim's plans: index scans on the partial indexes, never a scan or sort of the table.

auto_explain sends each nested statement's plan to the client as a NOTICE, so the test
sees the plans PostgreSQL really used inside the claim function on a deep queue.
"""

from __future__ import annotations

import re

import pytest
from psycopg import sql

from .test_serial import BLOCKED_DEPTH, BLOCKS, block_a_key


@pytest.fixture
def deep_store(store):
    table = sql.SQL("{}.messages").format(sql.Identifier(store.schema))
    store.conn.execute(sql.SQL(
        "INSERT INTO {} (queue, priority, payload, serial_key) "
        "SELECT CASE WHEN n % 10 = 0 THEN 'other' ELSE 'deep' END, n % 10, 'x', "
        "       CASE WHEN n % 7 = 0 THEN 'k' || (n % 64) END "
        "FROM generate_series(1, 200000) AS n").format(table))
    store.conn.execute(sql.SQL("ANALYZE {}").format(table))
    return store


def claim_plans(store, queue: str = "deep", limit: int = 100, *, analyze: bool = False, **claim) -> str:
    """The plans of every statement one claim ran (with actual row counts if ``analyze``);
    asserts the claim was full."""
    notices = []
    store.conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    try:
        store.conn.execute("LOAD 'auto_explain'")
    except Exception as exc:  # pragma: no cover - depends on the server build
        pytest.skip(f"auto_explain not available: {exc}")
    for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_nested_statements = on",
                    "auto_explain.log_level = notice", f"auto_explain.log_analyze = {'on' if analyze else 'off'}",
                    "auto_explain.log_timing = off"):
        store.conn.execute(f"SET {setting}")
    try:
        claimed = store.claim(queue, limit, store.register_consumer(), **claim)
    finally:
        store.conn.execute("SET auto_explain.log_min_duration = -1")
    assert len(claimed) == limit
    return "\n".join(notices)


def sorts_of_messages(plans: str) -> list[str]:
    """Sort nodes that read messages directly: the claim must find rows in order by index.
    (Sorting a few hundred keys it already holds, as the window does, is fine.)"""
    lines = plans.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.lstrip(" ->").startswith("Sort  ("):
            child = next((c for c in lines[i + 1:] if "->" in c), "")
            if " on messages" in child:
                found.append(line + "\n" + child)
    return found


def test_claim_uses_the_ready_indexes_without_sorting(deep_store):
    plans = claim_plans(deep_store)
    assert "messages_ready_idx" in plans          # unkeyed candidates
    assert "messages_ready_keyed_idx" in plans    # keyed candidates: the window
    assert "Seq Scan on messages" not in plans
    assert sorts_of_messages(plans) == []


def test_claim_with_max_deliveries_still_uses_the_indexes(deep_store):
    plans = claim_plans(deep_store, max_deliveries=5)
    assert "Seq Scan on messages" not in plans and sorts_of_messages(plans) == []


def rows_touched(plans: str) -> list[int]:
    """Rows each plan node returned or filtered out, over all its loops."""
    touched = []
    loops = 1
    for line in plans.splitlines():
        if node := re.search(r"actual rows=(\d+) loops=(\d+)", line):
            loops = int(node[2])
            touched.append(int(node[1]) * loops)
        elif removed := re.search(r"Rows Removed by (?:Filter|Join Filter|Index Recheck): (\d+)", line):
            touched.append(int(removed[1]) * loops)
    return touched


@pytest.mark.parametrize("block", BLOCKS)
def test_a_blocked_keys_waiting_messages_are_not_read(store, block):
    # One key's 10,000 waiting messages come first in the queue; its head cannot be taken.
    # The claim must get past them reading no more of them than its window (limit x 16
    # rows), nor the table: no plan node may see as many as a tenth of them.
    block_a_key(store, block)
    plans = claim_plans(store, "q", 10, analyze=True, max_deliveries=1)
    assert "Seq Scan on messages" not in plans and sorts_of_messages(plans) == []
    assert max(rows_touched(plans)) < BLOCKED_DEPTH // 10


@pytest.fixture
def shallow_store(store):
    # A busy queue consumers keep near empty: analyzed while small, then 100k messages
    # came and went before the next vacuum.  The claim's UPDATE once hash-joined its
    # candidates to a sequential scan of all those dead rows.
    table = sql.SQL("{}.messages").format(sql.Identifier(store.schema))
    store.conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table))
    insert = "INSERT INTO {} (queue, priority, payload) SELECT %s, 0, 'x' FROM generate_series(1, %s)"
    store.conn.execute(sql.SQL(insert).format(table), ("deep", 1000))
    store.conn.execute(sql.SQL("ANALYZE {}").format(table))
    store.conn.execute(sql.SQL(insert).format(table), ("gone", 100_000))
    store.conn.execute(sql.SQL("DELETE FROM {} WHERE queue = 'gone'").format(table))
    return store


def test_a_shallow_queue_full_of_dead_rows_is_claimed_by_primary_key(shallow_store):
    update = claim_plans(shallow_store).split("Update on messages", 1)[1].splitlines()
    # The node that finds the rows to update is the Update's own child: "  ->  ...".
    [finds_rows] = [line for line in update if line.startswith("  ->  ")]
    assert "Index Scan using messages_pkey" in finds_rows


def test_queue_stats_aggregates_the_table_in_one_pass_without_sorting_it(deep_store):
    # queue_stats runs at every metrics scrape and `pg status`: its cost must stay one
    # scan of messages hashed into (queue, serial key) groups.  Counting DISTINCT in the
    # scan sorted every message (and scanned the table twice): ~25 s at 3M messages.
    plan = [row[0] for row in deep_store.conn.execute(
        "EXPLAIN " + deep_store.q["queue_stats"], {"max_deliveries": 10})]
    scans = [i for i, line in enumerate(plan) if "Seq Scan on messages" in line]
    assert len(scans) == 1, "\n".join(plan)
    depth = len(plan[scans[0]]) - len(plan[scans[0]].lstrip())
    parent = next(line for line in reversed(plan[:scans[0]]) if len(line) - len(line.lstrip()) < depth)
    assert "HashAggregate" in parent, "\n".join(plan)
