"""kombu_pg only: what this server can commit, without kombu_pg.

A bare psycopg loop of single-row INSERTs in autocommit (N rows of the Kombu scenario's
payload size, prepared), once with the server's ``synchronous_commit`` and once with it
off for the session.  One producer's durable publishes cannot go faster than the first
figure: each waits for its commit's WAL flush.  Read the Kombu-level publish rate against it.
"""

from __future__ import annotations

import time

import psycopg

from .brokers import Broker
from .scenarios import Context, Measured, Metric, scenario


@scenario(
    "commit_ceiling",
    "kombu_pg's server without kombu_pg: single-row INSERT + commit, one client (the durable publish ceiling)",
    [Metric("durable", "INSERT/s, synchronous_commit as configured"),
     Metric("async", "INSERT/s, synchronous_commit off")],
    applies=lambda broker: broker.is_reference,
)
def commit_ceiling(ctx: Context, broker: Broker) -> Measured:
    n = ctx.params.messages
    payload = "x" * ctx.params.payload_bytes
    out = Measured()
    with psycopg.connect(broker.url, autocommit=True) as conn:
        # A real table: a temporary one is not WAL-logged, so its commits never wait.
        conn.execute("CREATE TABLE bench_ceiling (id bigserial PRIMARY KEY, body text)")
        try:
            setting = conn.execute("SHOW synchronous_commit").fetchone()[0]
            out.values["durable"] = _inserts_per_second(conn, n, payload)
            conn.execute("SET synchronous_commit = off")
            out.values["async"] = _inserts_per_second(conn, n, payload)
        finally:
            conn.execute("DROP TABLE bench_ceiling")
    out.notes.append(f"server synchronous_commit = {setting}")
    return out


def _inserts_per_second(conn: psycopg.Connection, n: int, payload: str) -> float:
    started = time.perf_counter()
    for _ in range(n):
        conn.execute("INSERT INTO bench_ceiling (body) VALUES (%s)", (payload,), prepare=True)
    return n / (time.perf_counter() - started)
