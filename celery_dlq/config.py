"""celery_dlq settings, read from ``app.conf`` keys that start with ``dlq_``.

Unknown ``dlq_*`` keys are refused (a typo must not silently disable a safety net).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kombu.utils.imports import symbol_by_name

from kombu_pg.config import ConfigurationError, DEFAULT_SCHEMA, Options, validate_schema

PREFIX = "dlq_"

DEFAULTS: dict[str, Any] = {
    # Master switch: False keeps the handlers installed but captures nothing (and warns
    # at worker start about exhausted broker messages that nothing will keep).
    "dlq_enabled": True,
    # Where the DLQ table lives.  Default: the kombu-pg broker's database.  Required
    # with any other broker.
    "dlq_database_url": None,
    # Schema of the DLQ table.  Default: the kombu-pg broker's schema option.
    "dlq_schema": None,
    # A read replica of dlq_database_url: list/show/stats, the admin's GET pages and the DLQ
    # gauges read there.  Writes (requeue, delete, purge, note, reap, capture) never do.
    "dlq_replica_url": None,
    # Deliveries after which the reaper dead-letters a broker message.  Default: the
    # kombu-pg transport option ``max_deliveries`` (the claim stops there).
    "dlq_max_deliveries": None,
    # Exception classes (or dotted names) that are never retried and go straight to
    # the DLQ.  Subclasses of celery_dlq.NonRetryable always are.
    "dlq_non_retryable_exceptions": (),
    # Capture final failures of tasks that have no retry policy for that exception.
    "dlq_capture_unclassified": True,
    # Task names never captured.
    "dlq_excluded_tasks": (),
    # Seconds between beat runs of celery_dlq.reap; None: not scheduled by install().
    "dlq_reap_interval": 60.0,
    # Messages per reaping statement (the reaper loops until none are left).
    "dlq_reap_batch_size": 500,
    # Capture exhausted messages when a worker starts (before --purge and consuming).
    "dlq_reap_at_worker_start": True,
    # Backstop: FAILURE results this recent (seconds) with no DLQ row are captured by the
    # reaper.  0 disables.  Needs the kombu-pg result backend in the same schema.
    "dlq_backstop_window": 86400.0,
    # ...and at least this old (seconds), so a capture in progress is not raced.
    "dlq_backstop_grace": 30.0,
    # lock_timeout/statement_timeout (seconds) of DLQ writes from task signals.
    "dlq_write_timeout": 5.0,
    # Apply kombu-pg migrations (the DLQ table is 0003) on first use.
    "dlq_auto_migrate": True,
    # How many received requests the worker's main process remembers, so failures
    # reported there (Reject, worker lost, hard time limit) keep the exact message.
    "dlq_request_memory": 4096,
}


@dataclass(frozen=True)
class Settings:
    enabled: bool
    database_url: str = field(repr=False)  # carries the password
    schema: str
    kombu_pg_broker: bool
    same_database: bool
    max_deliveries: int | None
    non_retryable: tuple[type, ...]
    capture_unclassified: bool
    excluded_tasks: frozenset[str]
    reap_interval: float | None
    reap_batch_size: int
    reap_at_worker_start: bool
    backstop_window: float
    backstop_grace: float
    write_timeout: float
    auto_migrate: bool
    request_memory: int
    replica_url: str | None = field(default=None, repr=False)  # carries the password

    @property
    def atomic(self) -> bool:
        """Requeue and reaping are single transactions (broker tables in the same DB)."""
        return self.kombu_pg_broker and self.same_database


def raw_settings(app) -> dict[str, Any]:
    conf = app.conf
    keys = {k for k in conf.keys() if isinstance(k, str) and k.lower().startswith(PREFIX)}
    unknown = sorted(k for k in keys if k.lower() not in DEFAULTS)
    if unknown:
        raise ConfigurationError(
            f"unknown celery_dlq setting(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    return {name: conf.get(name, default) for name, default in DEFAULTS.items()}


def is_kombu_pg_url(url: Any) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0] in ("postgresql", "postgres")


def load(app) -> Settings:
    raw = raw_settings(app)
    broker_url = app.conf.broker_url
    if isinstance(broker_url, (list, tuple)):
        broker_url = broker_url[0] if broker_url else None
    transport = app.conf.broker_transport
    kombu_pg_broker = is_kombu_pg_url(broker_url) and transport in (None, "", "kombu_pg.transport:Transport")
    broker_opts = None
    if kombu_pg_broker:
        broker_opts = Options.from_mapping(app.conf.broker_transport_options or {})
    url = raw["dlq_database_url"]
    same_database = False
    if not url:
        if not kombu_pg_broker:
            raise ConfigurationError(
                "celery_dlq needs a PostgreSQL database: the broker is not kombu-pg, so set "
                "dlq_database_url = 'postgresql://...'")
        url, same_database = broker_url, True
    elif kombu_pg_broker and url == broker_url:
        same_database = True
    schema = raw["dlq_schema"] or (broker_opts.schema if broker_opts else DEFAULT_SCHEMA)
    validate_schema(schema)
    if broker_opts is not None and schema != broker_opts.schema:
        same_database = False  # the broker's tables are elsewhere: no atomic path
    max_deliveries = raw["dlq_max_deliveries"]
    if max_deliveries is None and broker_opts is not None:
        max_deliveries = broker_opts.max_deliveries
    if max_deliveries is not None and (not isinstance(max_deliveries, int) or max_deliveries < 1):
        raise ConfigurationError(f"dlq_max_deliveries must be an integer >= 1, got {max_deliveries!r}")
    classes = []
    for item in raw["dlq_non_retryable_exceptions"] or ():
        cls = symbol_by_name(item) if isinstance(item, str) else item
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise ConfigurationError(f"dlq_non_retryable_exceptions: {item!r} is not an exception class")
        classes.append(cls)
    interval = raw["dlq_reap_interval"]
    if interval is not None and (not isinstance(interval, (int, float)) or interval <= 0):
        raise ConfigurationError(f"dlq_reap_interval must be a number of seconds > 0 or None, got {interval!r}")
    batch = raw["dlq_reap_batch_size"]
    if not isinstance(batch, int) or batch < 1:
        raise ConfigurationError(f"dlq_reap_batch_size must be an integer >= 1, got {batch!r}")
    for name in ("dlq_backstop_window", "dlq_backstop_grace", "dlq_write_timeout"):
        if not isinstance(raw[name], (int, float)) or raw[name] < 0:
            raise ConfigurationError(f"{name} must be a number >= 0, got {raw[name]!r}")
    return Settings(
        enabled=bool(raw["dlq_enabled"]),
        database_url=url,
        schema=schema,
        kombu_pg_broker=kombu_pg_broker,
        same_database=same_database,
        max_deliveries=max_deliveries,
        non_retryable=tuple(classes),
        capture_unclassified=bool(raw["dlq_capture_unclassified"]),
        excluded_tasks=frozenset(raw["dlq_excluded_tasks"] or ()) | {"celery_dlq.reap"},
        reap_interval=float(interval) if interval is not None else None,
        reap_batch_size=batch,
        reap_at_worker_start=bool(raw["dlq_reap_at_worker_start"]),
        backstop_window=float(raw["dlq_backstop_window"]),
        backstop_grace=float(raw["dlq_backstop_grace"]),
        write_timeout=float(raw["dlq_write_timeout"]),
        auto_migrate=bool(raw["dlq_auto_migrate"]),
        request_memory=int(raw["dlq_request_memory"]),
        replica_url=raw["dlq_replica_url"] or None,
    )
