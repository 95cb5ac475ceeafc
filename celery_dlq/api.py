"""The Python API: the same operations as ``celery dlq ...``.

    from celery_dlq import DLQ
    dlq = DLQ(app)
    page = dlq.list(task="proj.charge", limit=20)
    dlq.requeue(ids=[page.rows[0]["id"]], note="fixed in #123")
"""

from __future__ import annotations

import json
import logging
from typing import Any, Collection, Iterable, List, Mapping

from kombu.serialization import loads as kombu_loads

from kombu_pg.jobs import mark_replaced
from kombu_pg.store.broker import JOB_KEY_MODE_HEADER, JobPublish
from kombu_pg.transport import Channel

from .capture import CELERY_HEADERS
from .content import accepted_content, describe_body, is_accepted, raw_body
from .ext import DeadLetterQueue, install
from .store import (
    DLQ_ID_HEADER, REFUSED_CONTENT, REFUSED_STATUS, DLQError, NotFound, Page, RequeueResult,
    UsageError, check_filters, has_filter, job_key_of, job_requeue_result,
)

logger = logging.getLogger("celery_dlq")


class DLQ:
    """Inspect and act on the dead-letter queue of one Celery app."""

    def __init__(self, app) -> None:
        self.app = app
        self.runtime: DeadLetterQueue = install(app)

    @property
    def settings(self):
        return self.runtime.settings

    def _store(self):
        return self.runtime.store()

    def _read_store(self):
        # list/show/stats only: the replica when dlq_replica_url is set.
        return self.runtime.read_store()

    def close(self) -> None:
        self.runtime.close()

    # -- read -----------------------------------------------------------------------

    def list(self, *, limit: int = 50, cursor: int | None = None, **filters: Any) -> Page:
        return self._read_store().list(filters, limit=limit, cursor=cursor)

    def show(self, dlq_id: int) -> dict:
        """One entry with everything stored, plus ``body`` (content type, size, whether the
        app accepts it, an escaped preview) and ``call``, the decoded task call when the
        body is readable and its content type is in ``accept_content`` (else None)."""
        row = self._read_store().get(dlq_id)
        accept = accepted_content(self.app)
        row["body"] = describe_body(row["message"], accept)
        row["call"] = decode_call(row["message"], accept)
        return row

    def stats(self) -> dict:
        return self._read_store().stats()

    # -- write -------------------------------------------------------------------------

    def _targets(self, ids: Iterable[int] | None, filters: Mapping[str, Any] | None) -> List[int]:
        """Explicit ids, or the rows matching at least one filter; never 'everything'."""
        ids = list(ids or ())
        params = check_filters(filters)
        if ids and has_filter(params):
            raise UsageError("give either ids or filters, not both")
        if ids:
            return [int(i) for i in ids]
        if not has_filter(params):
            raise UsageError("a bulk operation needs explicit ids or at least one filter")
        return self._store().matching_ids(filters)

    def requeue(self, ids: Iterable[int] | None = None, *, filters: Mapping[str, Any] | None = None,
                note: str | None = None, dry_run: bool = False, force: bool = False,
                keep_retries: bool = False, keep_expires: bool = False) -> List[RequeueResult]:
        """Send entries back to their queue.  Unknown ids give ``requeued=False, 'not found'``.

        The requeued task gets its full retry budget again (``retries`` 0) and no expiry,
        unless ``keep_retries`` / ``keep_expires`` keep the stored values.
        """
        targets = self._targets(ids, filters)
        results = []
        for dlq_id in targets:
            if dry_run:
                try:
                    row = self._store().get(dlq_id)
                except NotFound:
                    results.append(RequeueResult(dlq_id, False, "not found"))
                    continue
                results.append(self._would_requeue(row, force))
                continue
            try:
                results.append(self.requeue_one(dlq_id, note=note, force=force, keep_retries=keep_retries,
                                                keep_expires=keep_expires))
            except NotFound:
                results.append(RequeueResult(dlq_id, False, "not found"))
            except Exception as exc:  # one bad entry or a broker error must not hide the rest
                self.runtime.reset_connection()
                logger.error("celery_dlq: requeue of entry %s failed: %s", dlq_id, exc)
                results.append(RequeueResult(dlq_id, False, f"error: {type(exc).__name__}: {exc}"))
        return results

    def _would_requeue(self, row: dict, force: bool) -> RequeueResult:
        """A dry run: the refusals a requeue would give, changing nothing."""
        if row["status"] != "dead" and not force:
            return RequeueResult(row["id"], False, f"already {row['status']}", refused=REFUSED_STATUS)
        job_key = job_key_of(row["message"])
        waiting = self._store().waiting_job(job_key) if job_key and self.settings.atomic else None
        if waiting is not None and waiting != row["task_id"]:
            if not force:
                return job_requeue_result(row["id"], JobPublish("dropped"), job_key, row["task_id"], [],
                                          waiting)
            return RequeueResult(row["id"], True, f"would requeue, replacing waiting task {waiting}",
                                 job_outcome="replaced", replaced_task_id=waiting)
        return RequeueResult(row["id"], True, "would requeue")

    def requeue_one(self, dlq_id: int, *, note: str | None = None, force: bool = False,
                    keep_retries: bool = False, keep_expires: bool = False) -> RequeueResult:
        """Requeue one entry.  A forced requeue that replaced a waiting task with the same job
        key marks that task REVOKED in the result backend: it will never run."""
        store = self._store()
        if self.settings.atomic:
            result = store.requeue_to_broker(dlq_id, note=note, force=force, keep_retries=keep_retries,
                                             keep_expires=keep_expires)
        else:
            result = self._requeue_send_task(dlq_id, note=note, force=force, keep_retries=keep_retries,
                                             keep_expires=keep_expires)
        if result.replaced_task_id:
            try:
                mark_replaced(self.app, result.replaced_task_id, store.get(dlq_id)["task_id"])
            except Exception as exc:  # requeued all the same: say what is missing
                logger.error("celery_dlq: entry %s replaced task %s, which could not be marked revoked: %s",
                             dlq_id, result.replaced_task_id, exc)
                result.detail += f" (not marked revoked: {type(exc).__name__}: {exc})"
        return result

    def _requeue_send_task(self, dlq_id: int, *, note: str | None, force: bool, keep_retries: bool,
                           keep_expires: bool) -> RequeueResult:
        """Another broker: publish with send_task; success means the message was published.

        send_task needs the decoded call: a body whose content type the app does not accept
        is refused (``REFUSED_CONTENT``), never deserialized.
        """
        row = self._store().get(dlq_id)
        if row["status"] != "dead" and not force:
            return RequeueResult(dlq_id, False, f"already {row['status']}", refused=REFUSED_STATUS)
        accept = accepted_content(self.app)
        call = decode_call(row["message"], accept)
        if call is None:
            body = describe_body(row["message"], accept)
            if not body["accepted"]:
                return RequeueResult(
                    dlq_id, False, f"refused: the body is {body['content_type']!r}, which accept_content "
                    "does not allow; send_task would have to deserialize it", refused=REFUSED_CONTENT)
            raise DLQError(f"DLQ entry {dlq_id}: the stored message cannot be decoded for send_task")
        headers = dict(call["custom_headers"])
        headers[DLQ_ID_HEADER] = dlq_id
        job_key = job_key_of(row["message"])
        if job_key is not None:  # as on the atomic path: never overwrite a waiting task unless forced
            headers[JOB_KEY_MODE_HEADER] = "replace" if force else "keep"
        h = call["headers"]
        embed = call["embed"] or {}
        options = dict(
            task_id=h.get("id"), headers=headers, retries=(h.get("retries") or 0) if keep_retries else 0,
            expires=h.get("expires") if keep_expires else None,
            root_id=h.get("root_id"), parent_id=h.get("parent_id"), group_id=h.get("group"),
            group_index=h.get("group_index"), shadow=h.get("shadow"),
            link=embed.get("callbacks"), link_error=embed.get("errbacks"),
            chain=embed.get("chain"), chord=embed.get("chord"),
            priority=call["priority"],
        )
        if row["exchange"] and job_key is None:  # routed as it was originally
            options["exchange"] = row["exchange"]
            options["routing_key"] = row["routing_key"] or ""
        elif row["queue"]:  # the default exchange: straight to the queue
            options["queue"] = row["queue"]
        timelimit = h.get("timelimit") or (None, None)
        if isinstance(timelimit, (list, tuple)) and len(timelimit) == 2:
            options["time_limit"], options["soft_time_limit"] = timelimit
        with self.app.producer_or_acquire() as producer:
            channel = producer.channel
            if isinstance(channel, Channel):  # kombu-pg reports what a job-key publish did
                channel.last_job_publish = None
            self.app.send_task(h.get("task") or row["task_name"], call["args"], call["kwargs"],
                               producer=producer, **{k: v for k, v in options.items() if v is not None})
            published = getattr(channel, "last_job_publish", None) if job_key is not None else None
        result = RequeueResult(dlq_id, True, "requeued")
        if published is not None:
            result = job_requeue_result(dlq_id, published, job_key, row["task_id"], [])
            if not result.requeued:
                return result
        # Published: from here on nothing may turn this into a failure.
        try:
            self._store().mark_requeued(dlq_id, note, seen_failures=row["failure_count"])
        except Exception as exc:
            self.runtime.reset_connection()
            logger.warning("celery_dlq: entry %s was requeued but its status could not be updated: %s",
                           dlq_id, exc)
            result.detail += f" (status not updated: {exc})"
        return result

    def delete(self, ids: Iterable[int] | None = None, *, filters: Mapping[str, Any] | None = None,
               dry_run: bool = False) -> List[int]:
        """Delete entries; returns the ids that existed (and were, or would be, deleted)."""
        targets = self._targets(ids, filters)
        if dry_run:
            return sorted(self._store().matching_ids({"ids": targets})) if targets else []
        return self._store().delete(targets)

    def purge(self, *, filters: Mapping[str, Any] | None = None, everything: bool = False,
              dry_run: bool = False) -> int:
        """Delete every entry matching the filters (or all with ``everything=True``).

        Pending captures run first, so nothing the broker still holds is left behind.
        """
        params = check_filters(filters)
        if not has_filter(params) and not everything:
            raise UsageError("purge needs at least one filter, or everything=True")
        if not dry_run:
            self.reap()
        store = self._store()
        ids = store.matching_ids(filters) if has_filter(params) else store.all_ids()
        if dry_run:
            return len(ids)
        return len(store.delete(ids))

    def note(self, dlq_id: int, text: str) -> None:
        self._store().add_note(dlq_id, text)

    def reap(self, *, dry_run: bool = False) -> dict:
        """Capture exhausted broker messages and failures missing from the DLQ."""
        if dry_run:
            s = self.settings
            n = self._store().count_exhausted(s.max_deliveries) if s.atomic and s.max_deliveries else 0
            return {"moved": 0, "swept": 0, "recovered": 0, "would_move": n}
        return self.runtime.reap()


def decode_call(message: str, accept: Collection[str]) -> dict | None:
    """Task name, args, kwargs, embed and headers of a stored Kombu message (protocol 2);
    None when unreadable or when its content type is not in ``accept`` (then the body is
    never deserialized: it may be a pickle from anyone who could publish)."""
    try:
        doc = json.loads(message)
        headers = dict(doc.get("headers") or {})
        props = doc.get("properties") or {}
        content_type = doc.get("content-type")
        if not is_accepted(content_type, accept):
            return None
        decoded = kombu_loads(raw_body(doc), content_type, doc.get("content-encoding"), accept=accept)
        args, kwargs, embed = decoded
    except Exception:
        return None
    return {
        "task": headers.get("task"), "args": list(args or ()), "kwargs": dict(kwargs or {}),
        "embed": embed, "headers": headers, "priority": props.get("priority"),
        "custom_headers": {k: v for k, v in headers.items()
                           if k not in CELERY_HEADERS and k != DLQ_ID_HEADER},
    }
