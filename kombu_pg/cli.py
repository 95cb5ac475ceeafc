"""``celery -A proj pg …`` (and the standalone ``kombu-pg …``): schema and status commands.

Exit codes: 0 success, 1 an error reported by the command (e.g. the database is
unreachable), 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable

import click
import psycopg

from .config import ConfigurationError, Options, build_conninfo, validate_schema
from .store import BrokerStore, apply_migrations, connect, current_version, migration_sql
from .store.migrations import all_migrations
from .transport import Transport


@dataclass
class Target:
    conninfo: str = field(repr=False)  # carries the password
    options: Options
    # --replica-url: where the read-only commands read (a streaming replica); never written.
    replica_conninfo: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, ctx: click.Context, *, need_database: bool = True) -> "Target":
        """The database and options: --url/--schema, else the Celery app's broker settings
        (all of them: broker_url, broker_user/password/port, broker_use_ssl, timeouts)."""
        url, schema, replica_url = ctx.meta["kombu_pg.target"]
        app = getattr(ctx.obj, "app", None)
        try:
            if url is None and app is not None:
                transport = app.connection_for_write().transport
                if not isinstance(transport, Transport):
                    raise click.UsageError(
                        f"the app's broker is {transport.driver_type!r}, not PostgreSQL: pass --url")
                target = cls(transport.conninfo, transport.options)
            else:
                url = url or os.environ.get("KOMBU_PG_URL")
                options = Options.from_mapping(
                    dict(app.conf.broker_transport_options or {}) if app is not None else {})
                if not url and need_database:
                    raise click.UsageError("no database: pass --url, set KOMBU_PG_URL or use celery -A <app>")
                target = cls(build_conninfo(url, extra=options.connect_kwargs) if url else "", options)
            if schema:
                target.options = replace(target.options, schema=validate_schema(schema))
            if replica_url:
                target.replica_conninfo = build_conninfo(replica_url, extra=target.options.connect_kwargs)
            return target
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from None

    @property
    def read_conninfo(self) -> str:
        """Where read-only commands read: the replica when given, else the primary."""
        return self.replica_conninfo or self.conninfo

    def connect(self, *, read_only: bool = False) -> psycopg.Connection:
        try:
            return connect(self.read_conninfo if read_only else self.conninfo)
        except psycopg.OperationalError as exc:
            raise click.ClickException(f"cannot connect: {exc}") from None


@click.group(name="pg")
@click.option("--url", help="PostgreSQL URL (default: the app's broker_url or $KOMBU_PG_URL).")
@click.option("--schema", help="Schema (default: the app's broker_transport_options or kombu_pg).")
@click.option("--replica-url", envvar="KOMBU_PG_REPLICA_URL", show_envvar=True,
              help="A read replica of the same database: `status` and `metrics` read there "
                   "(`migrate` always uses the primary).")
@click.pass_context
def pg(ctx: click.Context, url: str | None, schema: str | None, replica_url: str | None) -> None:
    """kombu-pg: PostgreSQL broker schema and status."""
    ctx.meta["kombu_pg.target"] = (url, schema, replica_url)


@pg.command()
@click.option("--print", "print_only", is_flag=True, help="Print the SQL for a DBA instead of applying it.")
@click.pass_context
def migrate(ctx: click.Context, print_only: bool) -> None:
    """Create or upgrade the kombu-pg tables (idempotent, under an advisory lock)."""
    target = Target.resolve(ctx, need_database=not print_only)
    schema = target.options.schema
    if print_only:
        click.echo(migration_sql(schema), nl=False)
        return
    with target.connect() as conn:
        applied = apply_migrations(conn, schema)
    if applied:
        click.echo(f"schema {schema}: applied migration(s) {', '.join(map(str, applied))}")
    else:
        click.echo(f"schema {schema}: up to date (version {all_migrations()[-1].version})")


@pg.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--keys", default=20, show_default=True, help="How many serial keys to list.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, keys: int) -> None:
    """Queues (ready, in flight, delayed, poison, oldest age), consumers and serial keys."""
    target = Target.resolve(ctx)
    schema = target.options.schema
    with target.connect(read_only=True) as conn:
        version = current_version(conn, schema)
        if version == 0:
            raise click.ClickException(f"schema {schema!r} has no kombu-pg tables; run `pg migrate`")
        store = BrokerStore(conn, schema)
        report = {
            "schema": schema,
            "schema_version": version,
            "queues": store.queue_stats(target.options.max_deliveries),
            "consumers": store.consumers(),
            "serial_keys": store.serial_key_stats(keys),
            "invalid_messages": store.invalid_count(),
            "dead_letters": _dead_letters(conn, schema),
        }
    if as_json:
        click.echo(json.dumps(report, default=_json_default, indent=2))
    else:
        _print_status(report)


@pg.command(name="metrics")
@click.option("--port", default=9808, show_default=True, type=click.IntRange(0, 65535),
              help="Port to serve /metrics on (0: any free port, printed at start).")
@click.option("--addr", default="127.0.0.1", show_default=True,
              help="Address to bind; /metrics has no authentication, so every interface (0.0.0.0, "
                   "the old default) must be asked for.")
@click.option("--results/--no-results", default=True, show_default=True,
              help="Result-backend gauges (counts the results table at every scrape).")
@click.option("--dlq/--no-dlq", default=None,
              help="DLQ gauges (default: when the app installs celery_dlq).")
@click.option("--max-queues", default=100, show_default=True, type=click.IntRange(1),
              help="Queue label values beyond this many are summed as '(other)'.")
@click.option("--scrape-timeout", default=5.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds a scrape's query may run before it is cancelled (scrape_ok 0).")
@click.option("--min-interval", default=10.0, show_default=True, type=click.FloatRange(0),
              help="Seconds a database reading is reused by later scrapes.")
@click.pass_context
def metrics_command(ctx: click.Context, port: int, addr: str, results: bool, dlq: bool | None,
                    max_queues: int, scrape_timeout: float, min_interval: float) -> None:
    """Serve Prometheus metrics: queue gauges from the database, plus the workers' counters
    when PROMETHEUS_MULTIPROC_DIR is shared with them (see docs/metrics.md)."""
    import signal
    import threading

    from . import metrics

    target = Target.resolve(ctx)
    app = getattr(ctx.obj, "app", None)
    if dlq and app is None:
        raise click.UsageError("--dlq needs the app: celery -A proj pg metrics --dlq")
    if target.replica_conninfo and app is not None and not app.conf.get("dlq_replica_url"):
        # The DLQ gauges read through celery_dlq's own setting: the same replica.
        app.conf.dlq_replica_url = ctx.meta["kombu_pg.target"][2]
    registry = metrics.build_registry(
        app, conninfo=target.conninfo, replica_conninfo=target.replica_conninfo,
        schema=target.options.schema,
        max_deliveries=target.options.max_deliveries, results=results, dlq=dlq, max_queues=max_queues,
        scrape_timeout=scrape_timeout, min_interval=min_interval)
    try:
        server, thread = metrics.start_http_server(port, addr, registry=registry)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {addr}:{port}: {exc}") from None
    mode = metrics.multiprocess_dir()
    click.echo(f"kombu-pg metrics: serving http://{addr}:{server.server_port}/metrics "
               f"(schema {target.options.schema}; counters: "
               f"{'multiprocess ' + mode if mode else 'this process only'})")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()



@pg.group(name="schedule")
def schedule_group() -> None:
    """Periodic tasks kept in the database (celery beat -S kombu_pg.beat:Scheduler)."""


def _entries(ctx: click.Context):
    from .beat import Entries

    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("pg schedule needs the app: celery -A proj pg schedule ...")
    target = Target.resolve(ctx)
    conn = target.connect()
    if current_version(conn, target.options.schema) < all_migrations()[-1].version:
        conn.close()
        raise click.ClickException(f"schema {target.options.schema!r} is not up to date; run `pg migrate`")
    return Entries(app, conn, schema=target.options.schema, own=True)


def _schedule_fields(every: float | None, cron: str | None, args: str | None, kwargs: str | None,
                     queue: str | None, priority: int | None, expires: float | None, header: tuple[str, ...],
                     missed: str | None) -> dict[str, Any]:
    from celery.schedules import crontab

    if every is not None and cron is not None:
        raise click.UsageError("give --every or --cron, not both")
    fields: dict[str, Any] = {}
    if every is not None:
        fields["schedule"] = every
    if cron is not None:
        try:
            minute, hour, day_of_month, month_of_year, day_of_week = cron.split()
            fields["schedule"] = crontab(minute, hour, day_of_week, day_of_month, month_of_year)
        except ValueError as exc:
            raise click.UsageError(f"--cron wants five fields (m h dom mon dow): {exc}") from None
    for name, text in (("args", args), ("kwargs", kwargs)):
        if text is not None:
            try:
                fields[name] = json.loads(text)
            except ValueError as exc:
                raise click.UsageError(f"--{name} is not JSON: {exc}") from None
    options = {k: v for k, v in (("queue", queue), ("priority", priority), ("expires", expires))
               if v is not None}
    if header:
        options["headers"] = dict(h.split("=", 1) for h in header)
    if options:
        fields["options"] = options
    if missed is not None:
        fields["missed"] = missed
    return fields


_ENTRY_OPTIONS = [
    click.option("--every", type=click.FloatRange(0, min_open=True), help="Run every N seconds."),
    click.option("--cron", help='Crontab "m h dom mon dow" in the app\'s timezone.'),
    click.option("--args", help="Positional arguments, a JSON list."),
    click.option("--kwargs", help="Keyword arguments, a JSON object."),
    click.option("--queue"), click.option("--priority", type=int),
    click.option("--expires", type=float, help="Seconds after publishing that the task expires."),
    click.option("--header", multiple=True, help="KEY=VALUE message header (serial_key, job_key...)."),
    click.option("--missed", type=click.Choice(["skip", "once", "catchup"]),
                 help="Ticks missed while no beat ran (default once)."),
]


def _entry_options(func):
    for option in reversed(_ENTRY_OPTIONS):
        func = option(func)
    return func


@schedule_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def schedule_list(ctx: click.Context, as_json: bool) -> None:
    """Entries with their next run, last run, last task id and the beat that published it."""
    from .beat.schedules import describe

    with _entries(ctx) as entries:
        rows = entries.list()
    if as_json:
        click.echo(json.dumps(rows, default=_json_default, indent=2))
        return
    columns = ["name", "task", "schedule", "enabled", "missed", "next_run", "last_run", "last_task_id",
               "last_beat", "runs"]
    _table(columns, [[r["name"], r["task"], describe(r["schedule"]), "yes" if r["enabled"] else "no",
                      r["missed"], _when(r["next_due"]), _when(r["last_run_at"]), r["last_task_id"] or "-",
                      r["last_beat"] or "-", str(r["run_count"])] for r in rows])


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


@schedule_group.command(name="add")
@click.argument("name")
@click.argument("task")
@_entry_options
@click.option("--disabled", is_flag=True, help="Add it disabled.")
@click.pass_context
def schedule_add(ctx: click.Context, name: str, task: str, disabled: bool, **options: Any) -> None:
    """Add (or replace) entry NAME running TASK, with --every or --cron."""
    fields = _schedule_fields(**options)
    if "schedule" not in fields:
        raise click.UsageError("give --every SECONDS or --cron 'm h dom mon dow'")
    with _entries(ctx) as entries:
        entries.add(name, task, fields.pop("schedule"), enabled=not disabled, **fields)
    click.echo(f"added {name}")


@schedule_group.command(name="change")
@click.argument("name")
@click.option("--task")
@_entry_options
@click.pass_context
def schedule_change(ctx: click.Context, name: str, task: str | None, **options: Any) -> None:
    """Change entry NAME's task, schedule, arguments, options or missed-ticks policy."""
    fields = _schedule_fields(**options)
    if task:
        fields["task"] = task
    with _entries(ctx) as entries:
        _known(entries.change, name, **fields)
    click.echo(f"changed {name}")


def _known(method, name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return method(name, *args, **kwargs)
    except KeyError:
        raise click.ClickException(f"no schedule entry {name!r}") from None


def _simple_entry_command(name: str, help_text: str, action: Callable[[Any, str], None], done: str) -> None:
    @schedule_group.command(name=name, help=help_text)
    @click.argument("entry")
    @click.pass_context
    def command(ctx: click.Context, entry: str) -> None:
        with _entries(ctx) as entries:
            _known(lambda n: action(entries, n), entry)
        click.echo(f"{done} {entry}")


for _args in (
    ("enable", "Enable entry ENTRY (its next run counts from now).",
     lambda entries, n: entries.set_enabled(n, True), "enabled"),
    ("disable", "Disable entry ENTRY (kept, not run).", lambda entries, n: entries.set_enabled(n, False),
     "disabled"),
    ("remove", "Remove entry ENTRY (one from beat_schedule comes back at the next beat start).",
     lambda entries, n: entries.remove(n), "removed"),
):
    _simple_entry_command(*_args)


@schedule_group.command(name="run")
@click.argument("name")
@click.pass_context
def schedule_run(ctx: click.Context, name: str) -> None:
    """Publish entry NAME's task now, once (its schedule is unchanged); prints the task id."""
    with _entries(ctx) as entries:
        click.echo(_known(entries.run_now, name))

def _dead_letters(conn: psycopg.Connection, schema: str) -> int | None:
    # The DLQ table belongs to celery_dlq's migration; report None where it is absent.
    exists = conn.execute("SELECT to_regclass(format('%%I.dlq', %s::text)) IS NOT NULL", (schema,)).fetchone()[0]
    if not exists:
        return None
    query = psycopg.sql.SQL("SELECT count(*) FROM {}.dlq WHERE status = 'dead'").format(psycopg.sql.Identifier(schema))
    return conn.execute(query).fetchone()[0]


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return float(value)


def _print_status(report: dict) -> None:
    click.echo(f"schema {report['schema']} (version {report['schema_version']})")
    columns = ["queue", "ready", "in_flight", "delayed", "poison", "oldest_age", "consumers_holding",
               "keys_in_flight", "keys_waiting"]
    rows = [[_cell(q[c]) for c in columns] for q in report["queues"]]
    _table(columns, rows)
    click.echo(f"consumers: {len(report['consumers'])}  invalid messages: {report['invalid_messages']}  "
               f"dead letters: {'n/a' if report['dead_letters'] is None else report['dead_letters']}")
    if report["serial_keys"]:
        click.echo("serial keys (busiest first):")
        columns = ["serial_key", "queue", "in_flight", "waiting", "oldest_age"]
        _table(columns, [[_cell(k[c]) for c in columns] for k in report["serial_keys"]])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) or hasattr(value, "as_integer_ratio") and not isinstance(value, int):
        return f"{float(value):.1f}s"
    return str(value)


def _table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main() -> None:
    """Entry point of the standalone ``kombu-pg`` command."""
    pg(prog_name="kombu-pg")
