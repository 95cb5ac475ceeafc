"""What one Prometheus scrape of ``pg metrics`` costs on a large queue table.

    python -m bench.metrics_scrape --url postgresql://postgres@127.0.0.1:5432/test 1000000 3000000

For each size: a schema of its own (dropped afterwards) filled with ``generate_series``
(10 queues; 1% in flight, 1% delayed, 2% with a serial key; 200-byte payloads), then
``VACUUM ANALYZE``.  Then, timed: each query a scrape runs, alone (best of 3), and a whole
scrape through the exporter's registry (``generate_latest``) as configured by default:
the first (cold cache) and the next ones within ``min_interval`` (served from the cache).
"""

from __future__ import annotations

import argparse
import time
import uuid

from psycopg import sql

from kombu_pg import metrics
from kombu_pg.store import BrokerStore, apply_migrations, connect

FILL = """
INSERT INTO {messages} (queue, payload, serial_key, visible_at, lock_token, locked_by, locked_at)
SELECT 'q' || (n %% 10), repeat('x', 200),
       CASE WHEN n %% 50 = 0 THEN 'k' || (n %% 1000) END,
       CASE WHEN n %% 100 = 1 THEN now() + interval '1 hour' END,
       CASE WHEN n %% 100 = 2 THEN gen_random_uuid() END,
       CASE WHEN n %% 100 = 2 THEN 1 END,
       CASE WHEN n %% 100 = 2 THEN now() END
FROM generate_series(1, %s) AS n
"""


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(url: str, rows: int, scrape_timeout: float) -> None:
    schema = f"bench_scrape_{uuid.uuid4().hex[:8]}"
    conn = connect(url)
    try:
        apply_migrations(conn, schema)
        messages = sql.SQL("{}.messages").format(sql.Identifier(schema))
        fill_s = timed(lambda: conn.execute(sql.SQL(FILL).format(messages=messages), (rows,)))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(messages))
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size(%s))",
                            (f'"{schema}".messages',)).fetchone()[0]
        print(f"{rows:,} messages ({size}, filled in {fill_s:.1f} s)")
        store = BrokerStore(conn, schema)
        for name, query in (("queue_stats", lambda: store.queue_stats(10)),
                            ("consumer_list", store.consumers),
                            ("invalid_count", store.invalid_count)):
            best = min(timed(query) for _ in range(3))
            print(f"  {name:<14} {best * 1000:8.1f} ms")
        registry = metrics.build_registry(conninfo=url, schema=schema, events=False,
                                          scrape_timeout=scrape_timeout)
        from prometheus_client import generate_latest

        first = timed(lambda: generate_latest(registry))
        cached = min(timed(lambda: generate_latest(registry)) for _ in range(3))
        text = generate_latest(registry).decode()
        ok = [line for line in text.splitlines() if line.startswith("kombu_pg_scrape_ok")]
        print(f"  scrape (first)  {first * 1000:8.1f} ms   {', '.join(ok)}")
        print(f"  scrape (cached) {cached * 1000:8.1f} ms")
    finally:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--scrape-timeout", type=float, default=metrics.DEFAULT_SCRAPE_TIMEOUT)
    parser.add_argument("rows", type=int, nargs="+")
    args = parser.parse_args()
    for rows in args.rows:
        measure(args.url, rows, args.scrape_timeout)


if __name__ == "__main__":
    main()
