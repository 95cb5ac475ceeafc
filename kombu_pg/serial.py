"""Serial keys for Celery tasks: at most one task per key runs at a time, in order.

A message whose header ``serial_key`` is set is delivered only when no other message
with that key is in flight anywhere in the cluster; within a key, higher priority first,
then publish order.  The key is held from delivery until ack, so it needs late acks:
:class:`SerialTask` turns them on, and a worker warns once per task when it receives a
keyed message for a task that acks early (the key would be free while it still runs).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from celery import Task
from celery.signals import task_prerun

from .store.broker import SERIAL_KEY_HEADER

logger = logging.getLogger(__name__)

__all__ = ["SERIAL_KEY_HEADER", "SerialTask", "serial_key_headers"]


def serial_key_headers(key: Any, headers: dict | None = None) -> dict:
    """``headers`` plus the serial key, for ``apply_async(headers=...)``."""
    if key is None or key == "":
        raise ValueError("a serial key must be a non-empty value")
    return {**(headers or {}), SERIAL_KEY_HEADER: str(key)}


class SerialTask(Task):
    """A task whose calls are serialised per key derived from their arguments.

    ``@app.task(base=SerialTask, serial_key=lambda user_id, amount: f"user:{user_id}")``:
    every ``delay``/``apply_async`` (and retry) of the task carries the key, without
    touching call sites.  An explicit ``headers={"serial_key": ...}`` wins.
    """

    abstract = True
    acks_late = True
    #: Callable receiving the task's args and kwargs and returning the key.
    serial_key: Callable[..., Any] | None = None

    def apply_async(self, args=None, kwargs=None, **options):
        headers = options.get("headers") or {}
        derive = type(self).serial_key
        if derive is not None and SERIAL_KEY_HEADER not in headers:
            options["headers"] = serial_key_headers(derive(*(args or ()), **(kwargs or {})), headers)
        return super().apply_async(args, kwargs, **options)


_warned: set[str] = set()


@task_prerun.connect(weak=False)
def _warn_on_early_ack(sender=None, task=None, **_kwargs) -> None:
    request = getattr(task, "request", None)
    headers = getattr(request, "headers", None) or {}
    key = headers.get(SERIAL_KEY_HEADER) or getattr(request, SERIAL_KEY_HEADER, None)
    if key and not task.acks_late and task.name not in _warned:
        _warned.add(task.name)
        logger.warning(
            "kombu-pg: task %s received a serial key but acks early: the key is released "
            "when the task starts, so another task of key %r may run alongside it. "
            "Use acks_late=True (or base=SerialTask).", task.name, key)
