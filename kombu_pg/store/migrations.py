"""Numbered, idempotent schema migrations applied under an advisory lock.

Migration files live in ``kombu_pg/sql/migrations/NNNN_name.sql``.  The pending ones are
applied in one transaction together with their rows in ``schema_version``, so a crash
leaves the schema at a whole version.  Many processes starting at once serialize on a transaction
advisory lock and all but the first find nothing to do.

A fresh schema is built by the same migrations.  ``kombu_pg/sql/schema.sql`` is the
schema they build, in one file for reading; it is never applied, and tests/test_schema.py
keeps it identical to what the migrations build.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import psycopg
from psycopg import sql

from ..config import validate_schema

_FILE_RE = re.compile(r"^(\d{4})_(\w+)\.sql$")


class MigrationError(RuntimeError):
    """The database schema is behind (with auto-migration off) or ahead of this kombu-pg."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    body: str

    def render(self, schema: str) -> sql.Composed:
        return sql.SQL(self.body).format(schema=sql.Identifier(schema))


@lru_cache(maxsize=1)
def all_migrations() -> tuple[Migration, ...]:
    folder = resources.files("kombu_pg").joinpath("sql", "migrations")
    found = []
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration numbers must be 1..N without gaps, found {versions}")
    return tuple(found)


def _create_schema(schema: str) -> sql.Composed:
    return sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))


def _create_version_table(schema: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {}.schema_version ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    ).format(sql.Identifier(schema))


def current_version(conn: psycopg.Connection, schema: str) -> int:
    """The highest applied migration, 0 when the schema has none."""
    validate_schema(schema)
    row = conn.execute(
        "SELECT to_regclass(format('%%I.schema_version', %(schema)s::text)) IS NOT NULL",
        {"schema": schema},
    ).fetchone()
    if not row or not row[0]:
        return 0
    query = sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version").format(
        sql.Identifier(schema)
    )
    return conn.execute(query).fetchone()[0]


def pending_migrations(conn: psycopg.Connection, schema: str) -> list[Migration]:
    version = current_version(conn, schema)
    latest = all_migrations()[-1].version
    if version > latest:
        raise MigrationError(
            f"schema {schema!r} is at version {version}, newer than this kombu-pg "
            f"(knows up to {latest}); upgrade kombu-pg"
        )
    return [m for m in all_migrations() if m.version > version]


def migration_sql(schema: str, from_version: int = 0) -> str:
    """The SQL a DBA can review and run by hand to bring ``schema`` up to date."""
    validate_schema(schema)
    parts = [_create_schema(schema).as_string(None) + ";", _create_version_table(schema).as_string(None) + ";"]
    for m in all_migrations():
        if m.version > from_version:
            parts.append(f"-- {m.version:04d}_{m.name}\n" + m.render(schema).as_string(None))
            parts.append(
                sql.SQL("INSERT INTO {}.schema_version (version, name) VALUES ({}, {});")
                .format(sql.Identifier(schema), sql.Literal(m.version), sql.Literal(m.name))
                .as_string(None)
            )
    return "\n\n".join(parts) + "\n"


def check_version(conn: psycopg.Connection, schema: str) -> None:
    """Raise MigrationError unless ``schema`` is exactly at this kombu-pg's version."""
    missing = pending_migrations(conn, schema)
    if missing:
        raise MigrationError(
            f"schema {schema!r} lacks migration(s) {', '.join(str(m.version) for m in missing)} and "
            "auto_migrate is off: run `celery -A proj pg migrate` (or `kombu-pg migrate --print` for a DBA)"
        )


def apply_migrations(conn: psycopg.Connection, schema: str) -> list[int]:
    """Bring ``schema`` up to date; return the versions applied (empty if none)."""
    validate_schema(schema)
    if not pending_migrations(conn, schema):
        return []
    applied = []
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('kombu_pg:migrate:' || %(schema)s, 0))",
            {"schema": schema},
        )
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
        # exists; a role that owns a schema a DBA made for it must still be able to migrate.
        exists = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (schema,))
        if not exists.fetchone()[0]:
            conn.execute(_create_schema(schema))
        conn.execute(_create_version_table(schema))
        # Re-read under the lock: another process may have migrated meanwhile.
        for m in pending_migrations(conn, schema):
            conn.execute(m.render(schema))
            conn.execute(
                sql.SQL("INSERT INTO {}.schema_version (version, name) VALUES (%s, %s)").format(
                    sql.Identifier(schema)
                ),
                (m.version, m.name),
            )
            applied.append(m.version)
    return applied


# The schema version each (conninfo, schema) was last found at or brought to by
# :func:`ensure_schema` in this process.  A forked child inherits it: what the parent saw
# of the database holds for the child too.
_verified: dict[tuple[str, str], int] = {}
_verified_lock = threading.Lock()


def ensure_schema(
    conn: psycopg.Connection, conninfo: str, schema: str, *, auto_migrate: bool, minimum: int | None = None
) -> None:
    """Make sure ``schema`` suits this kombu-pg, once per (``conninfo``, ``schema``) per
    process; ``conn`` is a connection to that server, used only when a check is due.

    With ``auto_migrate`` the missing migrations are applied (:func:`apply_migrations`).
    Without it nothing is changed: the schema must be at exactly this kombu-pg's version
    (:func:`check_version`), or, when ``minimum`` is given, at ``minimum`` or later (the
    result backend works with any schema that has the migrations its SQL needs).
    Raises MigrationError otherwise.
    """
    key = (conninfo, schema)
    latest = all_migrations()[-1].version

    def satisfied() -> bool:
        known = _verified.get(key)
        if known is None:
            return False
        if auto_migrate or minimum is None:
            return known == latest
        return known >= minimum

    if satisfied():
        return
    # One thread checks or migrates; the others wait for it instead of taking the
    # advisory lock in turn.
    with _verified_lock:
        if satisfied():
            return
        if auto_migrate:
            apply_migrations(conn, schema)
            version = latest
        elif minimum is None:
            check_version(conn, schema)
            version = latest
        else:
            version = current_version(conn, schema)
            if version < minimum:
                raise MigrationError(
                    f"schema {schema!r} is at version {version}; version {minimum} is needed and "
                    "auto_migrate is off: run `celery -A proj pg migrate` (or `kombu-pg migrate --print` for a DBA)"
                )
        _verified[key] = version
