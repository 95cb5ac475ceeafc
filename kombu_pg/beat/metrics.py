"""Beat counters, in the registry (and multiprocess directory) of kombu_pg.metrics.

Labels are bounded: ``outcome`` is ``published`` or ``skipped``, never an entry name.
"""

from __future__ import annotations

from .. import metrics as _metrics

TICKS = (_metrics.Counter("kombu_pg_beat_ticks", "Periodic-task ticks handled by this beat: "
                          "published, or skipped by the entry's missed-ticks policy.", ("outcome",))
         if _metrics.Counter is not None else None)


def ticks(published: int, skipped: int) -> None:
    if TICKS is None or not _metrics.enabled():
        return
    if published:
        TICKS.labels("published").inc(published)
    if skipped:
        TICKS.labels("skipped").inc(skipped)
