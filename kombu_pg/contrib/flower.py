"""Flower's Broker tab and ``/api/queues/length`` for a kombu-pg broker.

Flower chooses its broker client by URL scheme in ``flower.utils.broker.Broker.__new__``
and has no hook for another one, so :func:`install` wraps that ``__new__``: a
``postgresql://`` or ``postgres://`` URL gets a :class:`PostgresBroker`, every other URL
Flower's own client.  kombu-pg calls it when Flower imports that module (see
``kombu_pg._hooks``), so ``celery -A proj flower`` needs nothing else.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any, Mapping
from urllib.parse import urlparse

from ..config import Options, build_conninfo
from ..store import BrokerStore, connect

SCHEMES = ("postgresql", "postgres")


class PostgresBroker:
    """Queue lengths read from the broker's tables, in the shape Flower's template and API use."""

    def __init__(self, broker_url: str, *_: Any, broker_options: Mapping[str, Any] | None = None,
                 broker_use_ssl: Mapping[str, Any] | bool | None = None, **__: Any) -> None:
        self.options = Options.from_mapping(broker_options)
        self._conninfo = build_conninfo(broker_url, ssl=broker_use_ssl,
                                        extra=self.options.connect_kwargs)

    async def queues(self, names: list[str]) -> list[dict[str, Any]]:
        # psycopg's blocking API off Flower's event loop: one short query per page view.
        return await asyncio.to_thread(self._queues, names)

    def _queues(self, names: list[str]) -> list[dict[str, Any]]:
        with connect(self._conninfo) as conn:
            store = BrokerStore(conn, self.options.schema)
            stats = {row["queue"]: row for row in store.queue_stats(self.options.max_deliveries)}
        rows = []
        for name in names:
            row = stats.get(name, {})
            ready, unacked = int(row.get("ready", 0)), int(row.get("in_flight", 0))
            waiting = ready + int(row.get("delayed", 0)) + int(row.get("poison", 0))
            rows.append({"name": name, "messages": waiting + unacked, "messages_ready": ready,
                         "messages_unacknowledged": unacked})
        return rows


def install(module: ModuleType) -> None:
    """Make ``module.Broker`` (``flower.utils.broker``) answer for kombu-pg URLs."""
    broker = module.Broker
    if getattr(broker.__new__, "_kombu_pg", False):
        return
    flowers_new = broker.__new__

    def __new__(cls: type, broker_url: str, *args: Any, **kwargs: Any) -> Any:
        if urlparse(broker_url).scheme in SCHEMES:
            return PostgresBroker(broker_url, *args, **kwargs)
        return flowers_new(cls, broker_url, *args, **kwargs)

    __new__._kombu_pg = True  # type: ignore[attr-defined]
    broker.__new__ = staticmethod(__new__)
