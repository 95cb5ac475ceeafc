"""The PostgreSQL database the bench runs against: a scratch database created for one run.

Every PostgreSQL-backed contender (kombu_pg, Kombu's SQLAlchemy transport, Celery's
database result backend) writes into one fresh database, ``kombu_pg_bench_<tag>``, which is
dropped at the end.  That keeps the run apart from whatever else uses the server (tests
running concurrently, an application's own ``kombu_pg`` schema) and makes cleanup one
statement that cannot miss a table, sequence or schema.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from kombu_pg.embedded import EmbeddedPostgres

#: Same variable as the test-suite and kombu_pg.embedded use.
URL_ENV = "KOMBU_PG_URL"


@dataclass
class Database:
    """A scratch database; ``url`` is a ``postgresql://`` URL for it."""

    url: str
    admin_url: str
    name: str
    server: str  # version and the settings that move publish rates most
    embedded: EmbeddedPostgres | None = None  # when the bench started the server

    @property
    def origin(self) -> str:
        if self.embedded is not None:
            return "embedded server (pgserver, Unix socket)"
        return redact(self.admin_url)

    def drop(self) -> None:
        """Drop the scratch database (FORCE ends any session left behind), stop an embedded
        server.  Safe to call twice."""
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.name)
                    )
                )
        finally:
            _stop(self.embedded)
            self.embedded = None


def with_database(url: str, name: str) -> str:
    """``url`` with its database path replaced by ``name`` (query, e.g. ``?host=``, kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def with_scheme(url: str, scheme: str) -> str:
    """``url`` with its scheme replaced (``postgresql`` -> ``sqla+postgresql+psycopg``)."""
    return scheme + "://" + url.split("://", 1)[1]


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":**@", 1)
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def create_scratch(url: str | None, tag: str) -> Database:
    """Create ``kombu_pg_bench_<tag>`` on the server at ``url`` / ``$KOMBU_PG_URL``, or on
    an embedded server started here when neither is given."""
    url = url or os.environ.get(URL_ENV)
    embedded = None
    if not url:
        from kombu_pg.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres()
        url = embedded.url
    name = f"kombu_pg_bench_{tag}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            version = _describe_server(conn)
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InsufficientPrivilege as exc:
        _stop(embedded)
        raise SystemExit(
            f"cannot create the scratch database {name} on {redact(url)}: {exc}\n"
            "the bench needs a role with CREATEDB (or omit --pg-url/KOMBU_PG_URL to use an "
            "embedded server)"
        ) from None
    except BaseException:
        _stop(embedded)
        raise
    return Database(with_database(url, name), url, name, version, embedded)


# Every publish is a commit, so what a commit costs (WAL flush) sets the publish rate.
_SETTINGS = ("fsync", "synchronous_commit", "shared_buffers")


def _describe_server(conn: psycopg.Connection) -> str:
    """``15.4 (fsync=on, synchronous_commit=on, shared_buffers=128MB)``."""
    names = ["server_version", *_SETTINGS]
    rows = conn.execute(
        "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name", (names,)
    ).fetchall()
    values: dict[str, str] = dict(rows)
    settings = ", ".join(f"{name}={values[name]}" for name in _SETTINGS)
    return f"{values['server_version']} ({settings})"


def _stop(embedded: EmbeddedPostgres | None) -> None:
    if embedded is not None:
        embedded.stop()
