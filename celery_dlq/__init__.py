"""celery_dlq: a dead-letter queue for Celery, kept in PostgreSQL.

Enable it with one line::

    import celery_dlq
    celery_dlq.install(app)

Settings are ``app.conf.dlq_*`` (see :mod:`celery_dlq.config`).  With the kombu-pg broker
the DLQ lives in the broker's database and reaping and requeueing are single
transactions; with any other broker set ``dlq_database_url``.
"""

from .api import DLQ
from .capture import NonRetryable
from .ext import REAP_TASK, DeadLetterQueue, install
from .policies import PRESETS, RetryPolicy, retry_policy
from .store import DLQError, NotFound, UsageError

__all__ = [
    "DLQ", "DLQError", "DeadLetterQueue", "NonRetryable", "NotFound", "PRESETS", "REAP_TASK",
    "RetryPolicy", "UsageError", "install", "retry_policy",
]
