"""Retry policy presets, in attempts, mapped onto Celery's own retry options.

Celery does the retrying; the DLQ only receives what is left when it gives up.  A preset
is a dict of task options, so it is applied where Celery reads them::

    @app.task(autoretry_for=(ConnectionError,), **retry_policy("fast"))
    def fetch(url): ...

``attempts`` counts runs, so ``max_retries = attempts - 1``.  The delay before retry
``n`` (0-based) is ``min(backoff_max, backoff * 2**n)`` seconds (Celery's
``retry_backoff``); with ``jitter`` Celery picks a random delay in ``[0, that]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    backoff: int  # seconds, the first delay (Celery's retry_backoff factor; an integer)
    backoff_max: int  # seconds, the cap (retry_backoff_max)
    jitter: bool = True  # retry_jitter (full jitter)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 1 or self.backoff_max < self.backoff:
            raise ValueError(f"invalid retry policy {self!r}")

    @property
    def max_retries(self) -> int:
        return self.attempts - 1

    def task_options(self) -> dict:
        return {
            "max_retries": self.max_retries,
            "retry_backoff": self.backoff,
            "retry_backoff_max": self.backoff_max,
            "retry_jitter": self.jitter,
        }

    def delays(self) -> list[int]:
        """The delay before each retry without jitter (the upper bound with it)."""
        return [min(self.backoff_max, self.backoff * 2 ** n) for n in range(self.max_retries)]


PRESETS: dict[str, RetryPolicy] = {
    # Transient blips that clear within seconds: 3 runs, 1 s then 2 s.
    "fast": RetryPolicy(attempts=3, backoff=1, backoff_max=10),
    # The default: 5 runs, 2, 4, 8, 16 s.
    "default": RetryPolicy(attempts=5, backoff=2, backoff_max=60),
    # A fragile downstream you must not hammer: 4 runs, 30 s, 60 s, 120 s.
    "conservative": RetryPolicy(attempts=4, backoff=30, backoff_max=600),
    # Keep trying for a while: 10 runs, 1, 2, 4, 8, 16, 32, 60, 60, 60 s.
    "aggressive": RetryPolicy(attempts=10, backoff=1, backoff_max=60),
}


def retry_policy(name: str = "default", **overrides) -> dict:
    """Celery task options for a preset, e.g. ``retry_policy("fast", jitter=False)``."""
    try:
        policy = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown retry policy {name!r}; presets: {', '.join(PRESETS)}") from None
    return replace(policy, **overrides).task_options()
