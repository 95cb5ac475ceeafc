"""Job keys: deduplicated and replaceable Celery tasks with an explicit outcome.

A message with the header ``job_key`` is unique among *waiting* messages of the schema.
Publishing another message with the same key, decided by the insert itself:

- ``replace`` (default): the waiting message gets the new body, priority and due time;
- ``preserve_eta``: the same, but the waiting message keeps its due time;
- ``keep``: the new message is dropped; the waiting one is untouched.

A message with the key that is already **in flight** is never modified: the new message
is enqueued behind it (outcome ``QUEUED_BEHIND_IN_FLIGHT``), because the running task may
have read its data before the change that caused the new publish.

:func:`enqueue` reports what happened; a replaced task id is marked REVOKED in the result
backend (when there is one) with the id that replaced it, so waiting on it ends clearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from celery import Celery
from celery.canvas import Signature
from celery.result import AsyncResult

from .store.broker import JOB_KEY_HEADER, JOB_KEY_MODE_HEADER
from .transport import Channel

__all__ = ["JOB_KEY_HEADER", "JOB_KEY_MODE_HEADER", "JobResult", "Outcome", "enqueue"]


class Outcome(str, Enum):
    ENQUEUED = "enqueued"
    REPLACED = "replaced"
    DROPPED = "dropped"
    QUEUED_BEHIND_IN_FLIGHT = "queued_behind_in_flight"


@dataclass(frozen=True)
class JobResult:
    outcome: Outcome
    #: The published task; for DROPPED it will never run.
    result: AsyncResult
    #: For REPLACED: the waiting task whose message now carries this task instead.
    replaced_task_id: str | None = None

    @property
    def task_id(self) -> str:
        return self.result.id


def enqueue(signature: Signature, job_key: str, *, mode: str = "replace", app: Celery | None = None,
            **options: Any) -> JobResult:
    """Publish ``signature`` with a job key and say what happened."""
    if not job_key:
        raise ValueError("a job key must be a non-empty string")
    app = app or signature.app
    headers = {**(options.pop("headers", None) or {}), JOB_KEY_HEADER: str(job_key), JOB_KEY_MODE_HEADER: mode}
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        if not isinstance(channel, Channel):
            raise TypeError(f"job keys need the kombu-pg broker, not {type(channel).__module__}")
        channel.last_job_publish = None
        result = signature.apply_async(producer=producer, headers=headers, **options)
        # Read it from the producer's channel now, not the one held before: a publish
        # retried after a lost session (Celery retries by default) committed on the channel
        # the retry revived the producer with.
        published = producer.channel.last_job_publish
    if published is None:
        raise RuntimeError(f"the publish of task {result.id} with job key {job_key!r} reported no outcome "
                           "(was it routed away from the kombu-pg default exchange?)")
    outcome = Outcome(published.outcome)
    if outcome is Outcome.REPLACED and published.replaced_task_id:
        mark_replaced(app, published.replaced_task_id, result.id)
    return JobResult(outcome, result, published.replaced_task_id)


def mark_replaced(app: Celery, old_id: str, new_id: str) -> None:
    """Mark a task whose waiting message another one replaced REVOKED (it will never run)."""
    backend = app.backend
    if type(backend).__name__ == "DisabledBackend":
        return
    backend.mark_as_revoked(old_id, reason=f"replaced by task {new_id} (same job key)")
