"""The SQL layer of kombu-pg: schema migrations and named queries over psycopg 3.

Nothing in this package imports Kombu or Celery, so it can be tested on its own against
a real PostgreSQL server.
"""

from .broker import JOB_KEY_MODES, BrokerStore, Claimed, JobPublish, RecoveryReport, Superseded
from .connect import connect
from .migrations import (
    MigrationError,
    apply_migrations,
    check_version,
    current_version,
    ensure_schema,
    migration_sql,
    pending_migrations,
)
from .queries import Queries
from .results import ChordProgress, ResultListener, ResultStore

__all__ = [
    "JOB_KEY_MODES",
    "BrokerStore",
    "JobPublish",
    "ChordProgress",
    "Claimed",
    "MigrationError",
    "Queries",
    "RecoveryReport",
    "Superseded",
    "ResultListener",
    "ResultStore",
    "apply_migrations",
    "check_version",
    "connect",
    "current_version",
    "ensure_schema",
    "migration_sql",
    "pending_migrations",
]
