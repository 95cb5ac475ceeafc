"""The chaos soak's topology, its record of what happened, and its invariant checker.

Pure Python (no Celery, no database), so the checker is unit-tested on crafted rows
(``tests/test_soak.py``) as well as run on the soak's real ones.  The worker app
(``soak_app``) imports the topology from here.

Identity is the Celery task id: the producer picks every task id before publishing, so a
run can be traced to its publish whatever its outcome.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Collection, Iterable, Sequence

from kombu import Exchange, Queue

DIRECT = Exchange("soak.direct", type="direct")
TOPIC = Exchange("soak.topic", type="topic")
FANOUT = Exchange("soak.fanout", type="fanout")
QUEUES = [
    Queue("celery"),
    Queue("soak.direct", DIRECT, routing_key="direct"),
    Queue("soak.topic", TOPIC, routing_key="soak.#"),
    Queue("soak.fan1", FANOUT),
    Queue("soak.fan2", FANOUT),
]
COMMON_QUEUES = ["celery", "soak.direct", "soak.topic"]
# Each fanout queue is consumed by one worker group only (the first letter of a worker's
# hostname), so a fanout copy's run tells which queue it came from.
FANOUT_GROUPS = {"soak.fan1": "a", "soak.fan2": "b"}

# Job outcomes whose task id will run (kombu_pg.jobs.Outcome values).
RUNS = {"enqueued", "queued_behind_in_flight", "replaced"}

# The WARNING an unlock logs when it deletes a delivered message whose job key has a
# waiting message: that newer one runs instead (docs/job-keys.md, "superseded").
SUPERSEDED_RE = re.compile(r"task (\S+) \(job key .*?\) was delivered and not acked while task \S+ "
                           r"with the same job key was waiting: superseded")


def superseded_ids(log_lines: Iterable[str]) -> set[str]:
    """Task ids the workers' logs say an unlock superseded."""
    return {match[1] for line in log_lines if (match := SUPERSEDED_RE.search(line))}


@dataclass
class Publish:
    """One task id the producer tried to publish, and what the publish call said."""

    task_id: str
    kind: str
    started: float
    done: float
    committed: bool  # the publish call returned without raising
    serial_key: str | None = None
    job_key: str | None = None
    job_mode: str | None = None
    outcome: str | None = None  # a job publish's outcome (lower case)
    replaced: str | None = None  # the task id a REPLACED publish took the place of
    groups: tuple[str, ...] = ()  # fanout: one completed run per worker group is required
    fail: bool = False  # the task raises a non-retryable error: it must reach the DLQ
    batch: str | None = None  # the bulk publish (send_many, Producer.batch) it was part of


@dataclass
class Run:
    task_id: str
    hostname: str
    start: float
    end: float | None  # None: interrupted (its worker died or the soak ended first)


@dataclass
class Fault:
    """Something that ended sessions at ``at``: ``hosts`` None means every session."""

    kind: str
    at: float
    hosts: frozenset[str] | None = None


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def violate(self, invariant: str, example: str) -> None:
        self.violations[invariant].append(example)

    def text(self, examples: int = 3) -> str:
        out = list(self.lines)
        if not self.violations:
            out.append("violations: none")
        for name, found in sorted(self.violations.items()):
            out.append(f"VIOLATION {name}: {len(found)}, e.g. " + "; ".join(found[:examples]))
        return "\n".join(out)


def pair_runs(rows: Iterable[tuple[str, str, str, int, float]]) -> list[Run]:
    """Runs from task_log rows ``(task_id, phase, hostname, pid, at)`` in log order: each
    ``end`` closes the oldest open ``start`` of the same task id in the same process."""
    runs: list[Run] = []
    open_runs: dict[tuple, list[Run]] = defaultdict(list)
    for task_id, phase, hostname, pid, at in rows:
        key = (task_id, hostname, pid)
        if phase == "start":
            run = Run(task_id, hostname, at, None)
            runs.append(run)
            open_runs[key].append(run)
        elif phase == "end" and open_runs[key]:
            open_runs[key].pop(0).end = at
    return runs


def required_ids(publishes: Sequence[Publish], superseded: Collection[str] = ()) -> tuple[set[str], set[str], set[str]]:
    """(must run, must never run, uncertain) task ids.

    Must run: committed, and for job keys an outcome that runs and not replaced later, nor
    ``superseded`` (delivered, then unlocked while a newer message of its key waited).
    Must never run: a job publish DROPPED (``keep``): nothing was stored.
    Uncertain: a job publish that raised may have committed and replaced any message of
    its key committed before it returned, so those are not required.
    """
    required = {p.task_id for p in publishes if p.committed and (p.job_key is None or p.outcome in RUNS)}
    never = {p.task_id for p in publishes if p.committed and p.outcome == "dropped"}
    uncertain: set[str] = set()
    by_key: dict[str, list[Publish]] = defaultdict(list)
    for p in publishes:
        if p.job_key is not None:
            by_key[p.job_key].append(p)
        if p.committed and p.replaced:
            required.discard(p.replaced)
    required.difference_update(superseded)
    for key_publishes in by_key.values():
        for lost in (p for p in key_publishes if not p.committed and p.job_mode != "keep"):
            for p in key_publishes:
                if p.task_id in required and p.started < lost.done:
                    uncertain.add(p.task_id)
    return required - uncertain, never, uncertain


def check(publishes: Sequence[Publish], runs: Sequence[Run], faults: Sequence[Fault], *,
          job_samples: Sequence[tuple[float, str, int]] = (),
          reaper_samples: Sequence[tuple[float, int, int]] = (),
          dlq_rows: Sequence[dict] = (), leftover: Sequence[dict] = (),
          stale_locks: Sequence[dict] = (), requeued: Iterable[str] = (),
          superseded: Collection[str] = ()) -> Report:
    """Every invariant of the soak, on what the soak recorded (see docs/guarantees.md).

    ``job_samples``: (at, job key, waiting count) rows with a count above 1;
    ``reaper_samples``: (at, dlq id, message id) of reaped rows whose message was still
    queued; ``dlq_rows``: the DLQ at the end; ``leftover``: messages left after the drain
    bound; ``stale_locks``: messages still locked by a dead consumer after the stale-lock
    bound; ``requeued``: task ids the soak requeued from the DLQ; ``superseded``: task ids
    the workers' logs say an unlock superseded (:func:`superseded_ids`).
    """
    report = Report()
    by_id = {p.task_id: p for p in publishes}
    required, never, uncertain = required_ids(publishes, superseded)
    completed: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.end is not None:
            completed[run.task_id].append(run)
    dlq = {row["task_id"]: row for row in dlq_rows}
    reaped = {t for t, row in dlq.items() if row["reason"] == "max_deliveries"}

    # 1. Every publish seen committed is processed at least once (each fanout copy once).
    for task_id in sorted(required):
        p = by_id[task_id]
        if task_id in reaped:
            continue  # poison: kept whole in the DLQ, which is where it must be
        groups = {r.hostname[:1] for r in completed[task_id]}
        missing = [g for g in p.groups if g not in groups] if p.groups else ([] if groups else ["any"])
        if missing:
            report.violate("lost", f"{p.kind} {task_id} (no completed run on {','.join(missing)})")
    for task_id in sorted(never & set(completed)):
        report.violate("dropped job ran", f"{by_id[task_id].job_key} {task_id}")
    for task_id in sorted({r.task_id for r in runs} - set(by_id)):
        report.violate("run of an unknown task id", task_id)

    # 1b. A bulk publish is all or nothing, whether it returned or raised: some of its
    # messages ran (or reached the DLQ) only if all of them did.
    stored = {r.task_id for r in runs} | set(dlq)
    batches: dict[str, list[str]] = defaultdict(list)
    for p in publishes:
        if p.batch is not None:
            batches[p.batch].append(p.task_id)
    for name, ids in sorted(batches.items()):
        ran = [t for t in ids if t in stored]
        if 0 < len(ran) < len(ids):
            report.violate("bulk publish not all-or-nothing", f"{by_id[ids[0]].kind} {name}: {len(ran)} of "
                           f"{len(ids)} ran (publish {'returned' if by_id[ids[0]].committed else 'raised'})")

    # 2. Serial keys: two runs of one key never overlap, unless the earlier run's sessions
    # ended (a fault on its worker, or a server restart) before the later one started.
    killed_at = {h: f.at for f in faults if f.kind in ("kill", "crash") for h in (f.hosts or ())}
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        p = by_id.get(run.task_id)
        if p is not None and p.serial_key is not None:
            by_key[p.serial_key].append(run)
    overlaps_excused = 0
    for key, key_runs in by_key.items():
        key_runs.sort(key=lambda r: r.start)
        for i, first in enumerate(key_runs):
            end = first.end if first.end is not None else killed_at.get(first.hostname, math.inf)
            for later in key_runs[i + 1:]:
                if later.start >= end:
                    break
                if any(first.start <= f.at <= later.start and (f.hosts is None or first.hostname in f.hosts)
                       for f in faults):
                    overlaps_excused += 1
                    continue
                report.violate("serial overlap", f"{key}: {first.task_id}@{first.hostname} "
                               f"[{first.start:.3f}, {end:.3f}] and {later.task_id}@{later.hostname} "
                               f"from {later.start:.3f}")

    # 3. At most one waiting message per job key (sampled during the run).
    for at, key, count in job_samples:
        report.violate("two waiting per job key", f"{key}: {count} waiting at {at:.3f}")

    # 4. The DLQ is consistent with the queue and with what was published.
    for at, dlq_id, message_id in reaper_samples:
        report.violate("dlq row also queued", f"dlq {dlq_id} = message {message_id} at {at:.3f}")
    for task_id, row in sorted(dlq.items()):
        p = by_id.get(task_id)
        if p is None:
            report.violate("dlq row of an unknown task id", str(task_id))
        elif row["reason"] == "non_retryable" and not p.fail:
            report.violate("dlq reason", f"{p.kind} {task_id} is non_retryable but never fails")
        # A requeued entry's task succeeds (soak_app), so after the drain its row is resolved
        # (or dead again, if a copy without the dlq_id header failed later: at least once).
        if row["status"] == "requeued" or (row["status"] == "resolved" and not row["requeue_count"]):
            report.violate("dlq status after drain", f"{task_id} is {row['status']} (requeues "
                           f"{row['requeue_count']}, failures {row['failure_count']})")
    for task_id in sorted(t for t in required if by_id[t].fail and t not in dlq):
        report.violate("failure not in dlq", task_id)

    # 5. Recovery never stalls.
    for m in stale_locks:
        report.violate("locked by a dead consumer", f"message {m['id']} ({m['task_id']}) by {m['locked_by']}")
    for m in leftover:
        report.violate("not drained", f"message {m['id']} ({m['task_id']}) queue {m['queue']} "
                       f"deliveries {m['delivery_count']} locked_by {m['locked_by']}")

    # The summary.
    kinds = Counter(p.kind for p in publishes)
    committed = Counter(p.kind for p in publishes if p.committed)
    duplicates = {t: len(rs) - max(1, len(by_id[t].groups)) for t, rs in completed.items()
                  if t in by_id and len(rs) > max(1, len(by_id[t].groups))}
    report.lines.append("published (committed/attempted): " + ", ".join(
        f"{k} {committed[k]}/{n}" for k, n in sorted(kinds.items())))
    outcomes = Counter(p.outcome for p in publishes if p.job_key is not None and p.committed)
    report.lines.append(f"job outcomes: {dict(outcomes)}; uncertain (a replace publish raised): {len(uncertain)}; "
                        f"superseded at an unlock: {len(set(superseded))}")
    report.lines.append(f"required {len(required)}, runs {len(runs)} ({sum(r.end is None for r in runs)} "
                        f"interrupted), duplicated task ids {len(duplicates)} ({sum(duplicates.values())} extra runs)"
                        f", serial overlaps excused by a fault {overlaps_excused}")
    report.lines.append("faults: " + ", ".join(f"{k} {n}" for k, n in sorted(Counter(f.kind for f in faults).items())))
    report.lines.append(f"dlq: {len(dlq)} rows ({len(reaped)} reaped as poison), requeued by the soak "
                        f"{len(set(requeued))}")
    return report
