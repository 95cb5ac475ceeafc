"""A consumer process for the multi-process delivery tests.

Usage: python consumer_proc.py URL SCHEMA QUEUE PREFETCH
Records every message it receives into <schema>.received before acking it, and exits
cleanly (handing back anything unacked) on SIGTERM.
"""

import signal
import socket
import sys

import psycopg
from kombu import Connection, Consumer, Queue
from psycopg import sql

import kombu_pg  # noqa: F401

url, schema, queue_name, prefetch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stopping = False


def stop(*_):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
record = psycopg.connect(url, autocommit=True)
insert = sql.SQL("INSERT INTO {}.received (body, pid) VALUES (%s, pg_backend_pid())").format(
    sql.Identifier(schema))


def on_message(body, message):
    record.execute(insert, (str(body),))
    message.ack()


with Connection(url, transport_options={"schema": schema}) as conn:
    with Consumer(conn, [Queue(queue_name)], callbacks=[on_message], prefetch_count=prefetch):
        print("consuming", flush=True)
        while not stopping:
            try:
                conn.drain_events(timeout=0.5)
            except socket.timeout:
                pass
