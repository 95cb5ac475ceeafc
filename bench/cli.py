"""``python -m bench``: run every scenario on every selected broker, print one report."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from types import FrameType

from . import brokers as brokers_mod

# Importing a scenario module registers its scenarios, in report order.
from . import kombu_level  # noqa: F401  isort: skip
from . import celery_level  # noqa: F401  isort: skip
from . import latency  # noqa: F401  isort: skip
from . import kombu_pg_features  # noqa: F401  isort: skip
from . import scaling  # noqa: F401  isort: skip
from . import depth  # noqa: F401  isort: skip
from . import notify  # noqa: F401  isort: skip
from . import ceiling  # noqa: F401  isort: skip
from . import worker_rss  # noqa: F401  isort: skip
from .brokers import Broker
from .pg import create_scratch
from .probe import Probe
from .report import Row, machine_info, markdown, to_json
from .scenarios import REGISTRY, Context, Params, Scenario, progress


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare kombu_pg with Kombu's SQLAlchemy transport, Redis and RabbitMQ.",
    )
    p.add_argument(
        "--quick", action="store_true", help="small N and threads pool only: a smoke test (< 1 min)"
    )
    p.add_argument(
        "--brokers",
        default=",".join(brokers_mod.GROUPS),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help=f"comma-separated subset of {','.join(s.key for s in REGISTRY)}",
    )
    p.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON here")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("KOMBU_PG_URL"),
        help="PostgreSQL server (default $KOMBU_PG_URL; if unset, an embedded server is started)",
    )
    p.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", brokers_mod.DEFAULT_REDIS_URL)
    )
    p.add_argument(
        "--amqp-url", default=os.environ.get("BENCH_AMQP_URL", brokers_mod.DEFAULT_AMQP_URL)
    )
    p.add_argument("--messages", type=int, help="Kombu level N")
    p.add_argument("--tasks", type=int, help="Celery level N")
    p.add_argument("--samples", type=int, help="latency samples per metric")
    return p.parse_args(argv)


def choose(args: argparse.Namespace) -> tuple[Params, list[Scenario], set[str]]:
    params = Params.quick() if args.quick else Params.full()
    overrides = {
        k: v
        for k, v in (("messages", args.messages), ("tasks", args.tasks), ("samples", args.samples))
        if v
    }
    params = replace(params, **overrides)
    groups = {g.strip() for g in args.brokers.split(",") if g.strip()}
    unknown = groups - set(brokers_mod.GROUPS)
    if unknown:
        known = ", ".join(brokers_mod.GROUPS)
        raise SystemExit(f"unknown broker(s): {', '.join(sorted(unknown))}; choose from {known}")
    if args.scenarios:
        wanted = {s.strip() for s in args.scenarios.split(",")}
        scenarios = [s for s in REGISTRY if s.key in wanted]
        if len(scenarios) != len(wanted):
            known = ", ".join(s.key for s in REGISTRY)
            raise SystemExit(f"unknown scenario in {args.scenarios!r}; choose from {known}")
    else:
        scenarios = [s for s in REGISTRY if s.in_quick or not args.quick]
    return params, scenarios, groups


def run_one(ctx: Context, scenario: Scenario, broker: Broker) -> Row:
    row = Row(scenario, broker)
    if broker.skip:
        progress(f"[{scenario.key}] {broker.key}: skipped ({broker.skip})")
        return row
    progress(f"[{scenario.key}] {broker.key}: running")
    try:
        row.measured = scenario.run(ctx, broker)
    except Exception as exc:  # one broker failing must not lose the other rows
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        traceback.print_exc(file=sys.stderr)
    values = row.measured.values if row.measured else {}
    shown = row.status or ", ".join(f"{k}={v:,.1f}" for k, v in values.items())
    progress(f"[{scenario.key}] {broker.key}: {shown}")
    return row


def _terminate_as_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same cleanup path as Ctrl-C: workers stopped, database dropped.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        progress("interrupted; workers stopped and everything this run created removed")
        return 130


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    params, scenarios, groups = choose(args)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    tag = "kpgb" + secrets.token_hex(4)  # distinctive enough to scan Redis keys by
    where = "PostgreSQL at the given URL"
    if not args.pg_url:
        where = "an embedded PostgreSQL (pass --pg-url for figures worth publishing)"
    progress(f"run {tag} on {where}")
    # Everything the run creates is registered for removal the moment it exists, and
    # removed in reverse order whatever happens (error, Ctrl-C, SIGTERM); a failing
    # cleanup step does not stop the others.
    with ExitStack() as cleanup:
        db = create_scratch(args.pg_url, tag)
        cleanup.callback(_quietly, "drop the scratch database " + db.name, db.drop)
        probe = Probe()
        cleanup.callback(probe.close)
        log_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=f"bench_{tag}_")))
        selected = brokers_mod.build(db, args.redis_url, args.amqp_url, groups)
        if any(b.group == "redis" and not b.skip for b in selected):
            # Queues are deleted per scenario; this catches pidbox bindings and leftovers.
            cleanup.callback(
                _quietly,
                f"remove Redis keys with {tag}",
                brokers_mod.scrub_redis,
                args.redis_url,
                tag,
            )
        info = machine_info(
            f"{db.server}, {db.origin}",
            brokers_mod.server_versions(selected),
            params,
            args.quick,
        )
        ctx = Context(params, tag, probe, log_dir)
        sections = [(s, [run_one(ctx, s, b) for b in selected if s.applies(b)]) for s in scenarios]
    print(markdown(info, sections))
    if args.json:
        args.json.write_text(to_json(info, params, sections))
        progress(f"wrote {args.json}")
    return 0


def _quietly(what: str, fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception as exc:
        progress(f"cleanup: could not {what}: {type(exc).__name__}: {exc}")
