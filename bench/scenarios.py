"""The scenario registry: a scenario is one function measuring one broker.

To add a row to the report (say serial keys, or bulk publish), write a function
``(ctx, broker) -> Measured`` and decorate it with :func:`scenario`, naming its metrics;
import its module in :mod:`bench.cli`.  The runner, cleanup of the run's database, tables,
ratios and JSON come for free.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .brokers import Broker
from .probe import Probe


@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    #: "/s" (throughput, higher is better) or "ms" (latency, lower is better).
    unit: str = "/s"


@dataclass
class Measured:
    """What one scenario measured on one broker; a metric left out was not obtained."""

    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Params:
    messages: int  # Kombu level N
    tasks: int  # Celery level N
    samples: int  # latency samples per metric (at most)
    sample_budget_s: float  # ...and at most this long per metric
    stall_timeout_s: float  # give a drain up this long without progress
    payload_bytes: int  # padding in each Kombu-level message body

    @classmethod
    def full(cls) -> Params:
        return cls(
            messages=5000,
            tasks=5000,
            samples=200,
            sample_budget_s=30.0,
            stall_timeout_s=30.0,
            payload_bytes=100,
        )

    @classmethod
    def quick(cls) -> Params:
        return cls(
            messages=300,
            tasks=200,
            samples=20,
            sample_budget_s=2.0,
            stall_timeout_s=15.0,
            payload_bytes=100,
        )


@dataclass
class Context:
    params: Params
    tag: str  # in every queue, exchange, key and worker name this run creates
    probe: Probe
    log_dir: Path

    def name(self, *parts: str) -> str:
        return "_".join(("bench", self.tag, *parts))


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    metrics: tuple[Metric, ...]
    run: Callable[[Context, Broker], Measured]
    applies: Callable[[Broker], bool]
    row_label: Callable[[Broker], str]
    in_quick: bool


REGISTRY: list[Scenario] = []


def scenario(
    key: str,
    title: str,
    metrics: list[Metric],
    *,
    applies: Callable[[Broker], bool] = lambda broker: True,
    row_label: Callable[[Broker], str] = lambda broker: broker.label,
    in_quick: bool = True,
) -> Callable[[Callable[[Context, Broker], Measured]], Callable[[Context, Broker], Measured]]:
    """Register ``fn`` as a scenario; order of registration is order in the report."""

    def register(
        fn: Callable[[Context, Broker], Measured],
    ) -> Callable[[Context, Broker], Measured]:
        REGISTRY.append(Scenario(key, title, tuple(metrics), fn, applies, row_label, in_quick))
        return fn

    return register


# -- helpers shared by scenarios ------------------------------------------------------


def progress(text: str) -> None:
    """A line on stderr, so stdout stays the pasteable report."""
    print(text, file=sys.stderr, flush=True)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported value was observed)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


# Pause before each latency sample so the worker is idle (its previous task acked, its
# consumer back to waiting), and random so the samples do not lock onto a polling period.
_IDLE_GAP_S = (0.02, 0.08)
_MAX_LOST = 3


@dataclass
class Samples:
    values: list[float]
    lost: int
    capped_by_time: bool

    def describe(self, what: str) -> str:
        why = " (time budget)" if self.capped_by_time else ""
        lost = f", {self.lost} lost" if self.lost else ""
        return f"{what}: {len(self.values)} samples{why}{lost}"


def sample_sequentially(params: Params, one: Callable[[int], float | None]) -> Samples:
    """Call ``one(i)`` for up to ``params.samples`` samples or ``sample_budget_s`` seconds.

    ``one`` returns seconds, or None when its sample was lost (timed out).  A first call,
    ``one(-1)``, warms connections up and is not recorded.
    """
    one(-1)
    values: list[float] = []
    lost = 0
    deadline = time.monotonic() + params.sample_budget_s
    for i in range(params.samples):
        if time.monotonic() > deadline:
            return Samples(values, lost, capped_by_time=True)
        time.sleep(random.uniform(*_IDLE_GAP_S))
        value = one(i)
        if value is None:
            lost += 1
            if lost >= _MAX_LOST:
                break
        else:
            values.append(value)
    return Samples(values, lost, capped_by_time=False)


def latency_ms(samples: Samples, prefix: str) -> dict[str, float]:
    """``{prefix_p50: ms, prefix_p95: ms}``, empty when nothing was sampled."""
    if not samples.values:
        return {}
    return {f"{prefix}_p{p}": percentile(samples.values, p) * 1000 for p in (50, 95)}
