"""``celery -A proj dlq ...``: inspect, requeue, delete, purge, stats, reap, serve.

Registered through the ``celery.commands`` entry point (``dlq = "celery_dlq.cli:dlq"``);
``python -m celery_dlq -A proj dlq ...`` works without it.

Exit codes: 0 success, 1 error (database, configuration), 2 bad usage (unknown option,
bulk operation without ids or filter), 3 not found (an id that does not exist), 4 refused
(a requeue refused because a task with the same job key is waiting, or because the body's
content type is not in accept_content).
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime

import click

from kombu_pg.config import ConfigurationError

from .api import DLQ
from .reaper import ReaperLoop
from .store import MAX_PAGE, REASONS, REFUSED_STATUS, STATUSES, DLQError, NotFound, UsageError
from .values import parse_time

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4


class When(click.ParamType):
    """An ISO 8601 time, or an age such as 30m, 2h, 7d (that long ago)."""

    name = "time"

    def convert(self, value, param, ctx):
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(param.name if param else "time", value)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


def filter_options(fn):
    options = [
        click.option("--task", help="Task name (exact)."),
        click.option("--queue", help="Queue (or routing key) the message came from."),
        click.option("--job-key", help="Job key of the message (exact)."),
        click.option("--reason", type=click.Choice(REASONS), help="Why it is in the DLQ."),
        click.option("--exception", help="Exception type, e.g. myapp.errors.PaymentDeclined."),
        click.option("--status", type=click.Choice(STATUSES), help="dead, requeued or resolved."),
        click.option("--since", type=When(), help="Failed at or after (ISO time or age: 2h, 7d)."),
        click.option("--until", type=When(), help="Failed before (ISO time or age)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _filters(kwargs) -> dict:
    return {k: kwargs.pop(k) for k in ("task", "queue", "job_key", "reason", "exception", "status", "since",
                                       "until")
            if kwargs.get(k) is not None}


def _emit(data, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, default=str, indent=2, sort_keys=True))
    elif text is not None:
        click.echo(text)


def _run(ctx, fn):
    """Map errors onto exit codes; never a traceback for an expected failure."""
    try:
        code = fn(DLQ(ctx.obj.app))
    except NotFound as exc:
        click.echo(f"not found: {exc}", err=True)
        ctx.exit(EXIT_NOT_FOUND)
    except (UsageError, click.BadParameter) as exc:
        click.echo(f"usage error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    except (DLQError, ConfigurationError) as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_ERROR)
    except click.exceptions.Exit:
        raise
    except Exception as exc:  # database down, permissions...
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        ctx.exit(EXIT_ERROR)
    ctx.exit(code or EXIT_OK)


@click.group(name="dlq")
@click.option("--replica-url", envvar="CELERY_DLQ_REPLICA_URL", show_envvar=True,
              help="A read replica: list, show, stats and the admin's GET pages read there "
                   "(sets dlq_replica_url); writes always go to the primary.")
@click.pass_context
def dlq(ctx, replica_url):
    """Dead-letter queue: list, show, requeue, delete, purge, stats, reap, serve."""
    if ctx.obj is None or getattr(ctx.obj, "app", None) is None:
        raise click.UsageError("run as `celery -A proj dlq ...` (no Celery app given)")
    if replica_url:
        ctx.obj.app.conf.dlq_replica_url = replica_url


@dlq.command(name="list")
@filter_options
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=50, show_default=True)
@click.option("--cursor", type=int, help="Continue after this id (the previous page's next_cursor).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_(ctx, limit, cursor, as_json, **kwargs):
    """Entries, newest first, with the total matching the filters."""
    filters = _filters(kwargs)

    def run(api):
        page = api.list(limit=limit, cursor=cursor, **filters)
        if as_json:
            _emit({"total": page.total, "next_cursor": page.next_cursor, "rows": page.rows}, True)
            return EXIT_OK
        click.echo(f"{page.total} entr{'y' if page.total == 1 else 'ies'} match")
        for r in page.rows:
            click.echo(f"{r['id']:>8}  {r['last_failed_at']:%Y-%m-%d %H:%M:%S}  {r['status']:<8} "
                       f"{r['reason']:<17} x{r['failure_count']:<3} {r['task_name'] or '-'}  "
                       f"{r['exception_type'] or '-'}: {(r['exception_message'] or '')[:80]}")
        if page.next_cursor is not None:
            click.echo(f"more: --cursor {page.next_cursor}")
        return EXIT_OK

    _run(ctx, run)


@dlq.command()
@click.argument("dlq_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx, dlq_id, as_json):
    """Everything stored for one entry, the decoded call included."""
    def run(api):
        row = api.show(dlq_id)
        if as_json:
            _emit(row, True)
        else:
            for key, value in row.items():
                if key not in ("message", "traceback", "call", "body"):
                    click.echo(f"{key:>18}: {value}")
            body, call = row["body"], row.get("call")
            click.echo(f"{'body':>18}: {body['content_type']}, {body['size']} bytes"
                       + ("" if body["accepted"] else ", not in accept_content: not deserialized"))
            if call:
                click.echo(f"{'call':>18}: {call['task']}(*{call['args']!r}, **{call['kwargs']!r})")
            else:
                click.echo(f"{'preview':>18}: {body['preview']}" + (" ..." if body["truncated"] else ""))
            if row.get("traceback"):
                click.echo("\n" + row["traceback"])
        return EXIT_OK

    _run(ctx, run)


@dlq.command()
@click.argument("ids", nargs=-1, type=int)
@filter_options
@click.option("--note", help="Appended to the entry's notes.")
@click.option("--force", is_flag=True, help="Also entries already requeued or resolved, and replace a "
              "waiting task with the same job key (it is marked revoked).")
@click.option("--dry-run", is_flag=True, help="Say what would be requeued, change nothing.")
@click.option("--keep-retries", is_flag=True, help="Keep the retries already made (default: the task gets "
              "its full retry budget again).")
@click.option("--keep-expires", is_flag=True, help="Keep the stored expiry time (default: cleared, so the "
              "task is not revoked as expired on arrival).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def requeue(ctx, ids, note, force, dry_run, keep_retries, keep_expires, as_json, **kwargs):
    """Send entries back to their queue (ids, or every entry matching the filters)."""
    filters = _filters(kwargs)

    def run(api):
        results = api.requeue(ids or None, filters=filters or None, note=note, dry_run=dry_run, force=force,
                              keep_retries=keep_retries, keep_expires=keep_expires)
        _emit([r.__dict__ for r in results], as_json,
              "\n".join(f"{r.id}: {r.detail}" for r in results) or "nothing matched")
        if any(r.detail.startswith("error:") for r in results):
            return EXIT_ERROR
        missing = [r for r in results if r.detail == "not found"]
        if missing:
            return EXIT_NOT_FOUND
        # An entry that is not dead is skipped quietly (as before); any other refusal
        # (a waiting task holds its job key, a body the app does not accept) is not.
        return EXIT_REFUSED if any(r.refused not in (None, REFUSED_STATUS) for r in results) else EXIT_OK

    _run(ctx, run)


@dlq.command()
@click.argument("ids", nargs=-1, type=int)
@filter_options
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def delete(ctx, ids, dry_run, as_json, **kwargs):
    """Delete entries (ids, or every entry matching the filters)."""
    filters = _filters(kwargs)

    def run(api):
        deleted = api.delete(ids or None, filters=filters or None, dry_run=dry_run)
        missing = sorted(set(ids) - set(deleted)) if ids else []
        verb = "would delete" if dry_run else "deleted"
        _emit({"deleted" if not dry_run else "would_delete": deleted, "not_found": missing}, as_json,
              f"{verb} {len(deleted)}" + (f"; not found: {', '.join(map(str, missing))}" if missing else ""))
        return EXIT_NOT_FOUND if missing else EXIT_OK

    _run(ctx, run)


@dlq.command()
@filter_options
@click.option("--all", "everything", is_flag=True, help="Every entry (no filter needed).")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge(ctx, everything, dry_run, as_json, **kwargs):
    """Delete every entry matching the filters (or --all).  Pending captures run first."""
    filters = _filters(kwargs)

    def run(api):
        n = api.purge(filters=filters or None, everything=everything, dry_run=dry_run)
        _emit({"would_delete" if dry_run else "deleted": n}, as_json,
              f"{'would delete' if dry_run else 'deleted'} {n}")
        return EXIT_OK

    _run(ctx, run)


@dlq.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stats(ctx, as_json):
    """Totals, per task and per reason, oldest and newest."""
    def run(api):
        s = api.stats()
        if as_json:
            _emit(s, True)
            return EXIT_OK
        click.echo(f"entries {s['total']} (dead {s['dead']}, requeued {s['requeued']}, resolved "
                   f"{s['resolved']}), failures {s['failures']}, oldest {s['oldest']}, newest {s['newest']}")
        for title, key in (("by task", "by_task"), ("by reason", "by_reason")):
            click.echo(title + ":")
            for name, v in s[key].items():
                click.echo(f"  {name or '-':<40} {v['entries']:>8} entries {v['failures']:>8} failures")
        return EXIT_OK

    _run(ctx, run)


@dlq.command()
@click.argument("dlq_id", type=int)
@click.argument("text")
@click.pass_context
def note(ctx, dlq_id, text):
    """Append a note to an entry."""
    def run(api):
        api.note(dlq_id, text)
        return EXIT_OK

    _run(ctx, run)


@dlq.command()
@click.option("--dry-run", is_flag=True, help="Count what would move, move nothing.")
@click.option("--loop", is_flag=True, help="Keep reaping every --interval seconds (until SIGTERM).")
@click.option("--interval", type=click.FloatRange(min=0.01), default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def reap(ctx, dry_run, loop, interval, as_json):
    """Move exhausted broker messages to the DLQ and sweep missed failures (cron-friendly)."""
    def run(api):
        if loop:
            def one_pass():
                report = api.reap()
                _emit(report, as_json, ", ".join(f"{k} {v}" for k, v in report.items()))
                sys.stdout.flush()

            reaper = ReaperLoop(one_pass, interval)
            signal.signal(signal.SIGTERM, lambda *a: reaper.stop())
            signal.signal(signal.SIGINT, lambda *a: reaper.stop())
            reaper.run()
            return EXIT_OK
        report = api.reap(dry_run=dry_run)
        _emit(report, as_json, ", ".join(f"{k} {v}" for k, v in report.items()))
        return EXIT_OK

    _run(ctx, run)


@dlq.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8088, show_default=True,
              help="Port (0: any free port, printed at start).")
@click.option("--token", envvar="CELERY_DLQ_TOKEN", show_envvar=True,
              help="Require `Authorization: Bearer TOKEN` on every request.")
@click.pass_context
def serve(ctx, host, port, token):
    """Serve the DLQ admin (JSON API and page) over HTTP until SIGTERM or Ctrl-C."""
    import threading

    from .http import LOOPBACK_HOSTS, DLQAdmin, make_http_server

    def run(api):
        api.stats()  # fail fast (exit 1) when the database cannot be reached
        # On loopback only local Host names are answered: no DNS rebinding onto the admin.
        allowed = LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None
        server = make_http_server(DLQAdmin(dlq=api, token=token, allowed_hosts=allowed), host, port)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
        signal.signal(signal.SIGINT, lambda *a: stop.set())
        thread = threading.Thread(target=server.serve_forever, name="celery-dlq-http", daemon=True)
        thread.start()
        bound_host, bound_port = server.server_address[:2]
        if not token and bound_host not in LOOPBACK_HOSTS:
            click.echo("warning: no --token, and listening beyond localhost", err=True)
        click.echo(f"celery_dlq admin on http://{bound_host}:{bound_port}/")
        sys.stdout.flush()
        stop.wait()
        server.shutdown()
        server.server_close()
        return EXIT_OK

    _run(ctx, run)


def main(argv=None) -> None:
    """``python -m celery_dlq -A proj dlq list``: the celery command with ``dlq`` added."""
    from celery.bin.celery import celery

    if "dlq" not in celery.commands:
        celery.add_command(dlq)
    celery.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="celery")
