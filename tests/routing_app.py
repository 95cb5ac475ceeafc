"""A second process for the cross-process routing tests (``python -m tests.routing_app``).

``bind-consume EXCHANGE TYPE QUEUE KEY COUNT``
    declare the exchange and the queue, bind them with KEY, print ``bound``, then print
    ``got <body>`` for each message received until COUNT arrived (or 20 s passed), then
    print ``done`` and exit.

``hold EXCHANGE QUEUE``
    declare an exclusive queue QUEUE.x and an auto-delete queue QUEUE.ad (no x-expires),
    bound to the fanout EXCHANGE, consume both, print ``consuming`` and keep consuming
    until killed.

``publish EXCHANGE KEY BODY...``
    publish each BODY to EXCHANGE with routing key KEY *without declaring anything*,
    print ``published`` and exit.

The broker URL and schema come from ``KOMBU_PG_TEST_URL`` / ``KOMBU_PG_TEST_SCHEMA``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import kombu

import kombu_pg  # noqa: F401  (registers postgresql://)
from tests.monitor_app import SCHEMA_ENV, URL_ENV


def _connection() -> kombu.Connection:
    return kombu.Connection(
        os.environ[URL_ENV],
        transport_options={"schema": os.environ[SCHEMA_ENV], "polling_interval": 0.1},
    )


def bind_consume(exchange: str, type_: str, queue: str, key: str, count: int) -> None:
    ex = kombu.Exchange(exchange, type=type_)
    q = kombu.Queue(queue, exchange=ex, routing_key=key)
    received = []

    def on_message(body, message):
        received.append(body)
        print(f"got {body}", flush=True)
        message.ack()

    with _connection() as conn:
        q(conn.default_channel).declare()
        print("bound", flush=True)
        with kombu.Consumer(conn, [q], callbacks=[on_message], accept=["json"]):
            deadline = time.monotonic() + 20
            while len(received) < count and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=max(deadline - time.monotonic(), 0.01))
                except socket.timeout:
                    pass
    print("done", flush=True)


def hold(exchange: str, queue: str) -> None:
    ex = kombu.Exchange(exchange, type="fanout")
    queues = [kombu.Queue(f"{queue}.x", exchange=ex, exclusive=True),
              kombu.Queue(f"{queue}.ad", exchange=ex, auto_delete=True)]
    with _connection() as conn:
        with kombu.Consumer(conn, queues, callbacks=[lambda body, message: message.ack()], accept=["json"]):
            print("consuming", flush=True)
            while True:
                try:
                    conn.drain_events(timeout=1.0)
                except socket.timeout:
                    pass


def publish(exchange: str, key: str, bodies: list[str]) -> None:
    with _connection() as conn:
        producer = kombu.Producer(conn.default_channel, auto_declare=False)
        for body in bodies:
            # A plain exchange name: this process declares neither it nor any queue.
            producer.publish(body, exchange=exchange, routing_key=key, serializer="json")
    print("published", flush=True)


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "bind-consume":
        exchange, type_, queue, key, count = args
        bind_consume(exchange, type_, queue, key, int(count))
    elif command == "hold":
        hold(*args)
    elif command == "publish":
        exchange, key, *bodies = args
        publish(exchange, key, bodies)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
