"""The contenders: how to reach each broker, its result backend, and how to clean up after it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any

from kombu import Connection, Exchange, Queue

from .pg import Database, with_scheme

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"

#: What ``--brokers`` accepts; ``amqp`` selects both RabbitMQ variants.
GROUPS = ("kombu_pg", "sqla", "redis", "amqp")

# Kombu's SQLAlchemy transport gets table names of its own so it never touches a
# ``kombu_queue``/``kombu_message`` pair someone else created.
SQLA_TABLES = {"queue_tablename": "bench_kombu_queue", "message_tablename": "bench_kombu_message"}


@dataclass(frozen=True)
class Broker:
    key: str  # row identity in tables and JSON
    group: str  # the --brokers name that selects it
    label: str  # what the Markdown table shows
    url: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    #: Celery result backend URL and a label for it; None: not benchmarked at Celery level.
    backend: str | None = None
    backend_label: str = ""
    #: Why the row is skipped (unreachable, not installed); None when usable.
    skip: str | None = None
    #: A Kombu transport class to use instead of the URL's (a bench arm's variant).
    transport: type | None = None

    @property
    def is_reference(self) -> bool:
        """kombu_pg is the row every ratio is taken against."""
        return self.key == "kombu_pg"

    def connection(self) -> Connection:
        return Connection(
            self.url,
            transport_options=dict(self.transport_options),
            connect_timeout=5,
            transport=self.transport,
        )


def build(db: Database, redis_url: str, amqp_url: str, groups: set[str]) -> list[Broker]:
    """The brokers selected by ``groups``, in table order, each marked skipped if unusable."""
    pg = db.url
    # psycopg2 is not a dependency; name SQLAlchemy's psycopg 3 dialect explicitly.
    sqla_db = with_scheme(pg, "postgresql+psycopg")
    pg_backend, pg_backend_label = _kombu_pg_backend(pg, sqla_db)
    candidates = [
        Broker(
            key="kombu_pg",
            group="kombu_pg",
            label="kombu_pg (`postgresql://`)",
            url=pg,
            backend=pg_backend,
            backend_label=pg_backend_label,
        ),
        Broker(
            key="sqla",
            group="sqla",
            label="Kombu SQLAlchemy transport (`sqla+postgresql+psycopg://`)",
            url="sqla+" + sqla_db,
            transport_options=dict(SQLA_TABLES),
            backend="db+" + sqla_db,
            backend_label="SQLAlchemy database backend",
        ),
        Broker(
            key="redis",
            group="redis",
            label="Redis",
            url=redis_url,
            backend=redis_url,
            backend_label="Redis",
        ),
        Broker(
            key="amqp",
            group="amqp",
            label="RabbitMQ (no publisher confirms)",
            url=amqp_url,
            backend="rpc://",
            backend_label="rpc",
        ),
        # No Celery level for this one (backend None), as in BASELINE.md: the worker side
        # does not change with confirms, and the Kombu row already shows the publish cost.
        Broker(
            key="amqp_confirm",
            group="amqp",
            label="RabbitMQ with `confirm_publish`",
            url=amqp_url,
            transport_options={"confirm_publish": True},
        ),
    ]
    chosen = [b for b in candidates if b.group in groups]
    return [_with_reachability(b) for b in chosen]


def _kombu_pg_backend(pg_url: str, sqla_db: str) -> tuple[str, str]:
    """kombu_pg's own result backend when it is importable, else Celery's database backend
    on the same database, labelled so the table says which one ran."""
    try:
        importlib.import_module("kombu_pg.backend").PostgresBackend  # noqa: B018
    except Exception as exc:  # not written yet, or broken: say so in the label
        return (
            "db+" + sqla_db,
            f"SQLAlchemy database backend (kombu_pg.backend unavailable: {type(exc).__name__})",
        )
    return pg_url, "kombu_pg PostgresBackend"


def _with_reachability(broker: Broker) -> Broker:
    try:
        with broker.connection() as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0.2, interval_step=0, interval_max=0.2
            )
    except Exception as exc:
        return replace(
            broker,
            skip=f"unreachable or unusable: {type(exc).__name__}: {exc}".splitlines()[0][:160],
        )
    return broker


def delete_entities(broker: Broker, names: list[str]) -> None:
    """Delete the queues and direct exchanges called ``names`` (a run's own names only).

    On the PostgreSQL brokers this is tidiness; the scratch database goes anyway.  On Redis
    and RabbitMQ it is the only cleanup, since those servers are shared.
    """
    with broker.connection() as conn:
        channel = conn.channel()
        for name in names:
            for entity in (Queue(name, Exchange(name), name), Exchange(name)):
                try:
                    entity(channel).delete()
                except Exception:  # already gone, or a fresh channel is needed after an error
                    channel = conn.channel()


def scrub_redis(redis_url: str, tag: str) -> int:
    """Remove every Redis key and Kombu binding entry carrying this run's ``tag``.

    Celery's worker leaves a pidbox binding in the shared ``_kombu.binding.celery.pidbox``
    set; only the members naming our own worker are removed.  Returns the number removed.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    removed = 0
    try:
        for key in client.scan_iter(match=f"*{tag}*"):
            removed += client.delete(key)
        for key in client.scan_iter(match="_kombu.binding.*"):
            ours = [m for m in client.smembers(key) if tag.encode() in m]
            if ours:
                removed += client.srem(key, *ours)
    finally:
        client.close()
    return removed


def server_versions(brokers: list[Broker]) -> dict[str, str]:
    """``{"redis": "7.0.15", "rabbitmq": "3.12.1"}`` for the reachable non-PostgreSQL brokers."""
    versions: dict[str, str] = {}
    for broker in brokers:
        if broker.skip or broker.group not in ("redis", "amqp") or broker.group in versions:
            continue
        try:
            versions[broker.group] = _server_version(broker)
        except Exception as exc:  # a version is nice to have, never worth failing the run
            versions[broker.group] = f"unknown ({type(exc).__name__})"
    return {("redis server" if k == "redis" else "rabbitmq server"): v for k, v in versions.items()}


def _server_version(broker: Broker) -> str:
    if broker.group == "redis":
        import redis

        client = redis.Redis.from_url(broker.url)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()
    with broker.connection() as conn:
        conn.connect()
        props = conn.connection.server_properties
        version = props.get("version", "unknown")
        return version.decode() if isinstance(version, bytes) else str(version)
