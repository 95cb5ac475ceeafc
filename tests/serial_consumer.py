"""Consumer process for the serial-key race test.

Usage: python serial_consumer.py URL SCHEMA QUEUE THREADS SEED
Each thread is its own Kombu connection (its own consumer).  Every delivery is logged in
<schema>.serial_log: a row at start, its end time and action (ack/requeue/reject) at the
end, before the action is taken.  Exits on SIGTERM.
"""

import random
import signal
import socket
import sys
import threading

import psycopg
from kombu import Connection, Consumer, Queue
from psycopg import sql

import kombu_pg  # noqa: F401

url, schema, queue_name, threads, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
table = sql.Identifier(schema)
START = sql.SQL("INSERT INTO {}.serial_log (key, seq, prio, consumer, start_at) "
                "VALUES (%s, %s, %s, %s, clock_timestamp()) RETURNING id").format(table)
END = sql.SQL("UPDATE {}.serial_log SET end_at = clock_timestamp(), action = %s WHERE id = %s").format(table)


def consume(index: int) -> None:
    rng = random.Random(seed * 100 + index)
    log = psycopg.connect(url, autocommit=True)
    options = {"schema": schema, "max_deliveries": None, "recovery_interval": 0.5, "polling_interval": 0.5}

    def on_message(body, message):
        [row_id] = log.execute(START, (body["key"], body["seq"], body["prio"], f"{seed}-{index}")).fetchone()
        if rng.random() < 0.3:
            stop.wait(rng.random() * 0.005)  # some work, sometimes
        action = rng.choices(["ack", "requeue", "reject"], [0.8, 0.1, 0.1])[0]
        log.execute(END, (action, row_id))
        getattr(message, action)()

    with Connection(url, transport_options=options) as conn:
        with Consumer(conn, [Queue(queue_name)], callbacks=[on_message],
                      prefetch_count=rng.choice([1, 4, 16])):
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    pass


workers = [threading.Thread(target=consume, args=(i,)) for i in range(threads)]
for w in workers:
    w.start()
print("consuming", flush=True)
for w in workers:
    w.join()
