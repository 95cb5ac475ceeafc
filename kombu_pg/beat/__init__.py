"""Periodic tasks kept in PostgreSQL: ``celery beat -S kombu_pg.beat:Scheduler``.

See docs/beat.md.
"""

from .entries import MISSED_POLICIES, Entries
from .scheduler import Scheduler

__all__ = ["Entries", "MISSED_POLICIES", "Scheduler"]
