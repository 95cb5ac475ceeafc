"""Named queries loaded from ``kombu_pg/sql/*.sql`` and rendered for one schema."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from psycopg import sql

from ..config import validate_schema

_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@lru_cache(maxsize=None)
def _load(filename: str) -> dict[str, str]:
    text = resources.files("kombu_pg").joinpath("sql", filename).read_text(encoding="utf-8")
    parts = _NAME_RE.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2])}


class Queries:
    """The queries of one ``.sql`` file with ``{schema}`` bound to a quoted identifier.

    Rendering happens once per schema; the result is plain text with ``%(name)s``
    placeholders, so psycopg can prepare it.
    """

    def __init__(self, schema: str, filename: str = "queries.sql") -> None:
        self.schema = validate_schema(schema)
        identifier = sql.Identifier(schema)
        bodies = _load(filename)
        # A query may include another one as a fragment: {name} stands for its text.
        fragments = {name: sql.SQL(body) for name, body in bodies.items()}
        self._text = {
            name: sql.SQL(body).format(schema=identifier, **fragments).as_string(None)
            for name, body in bodies.items()
        }

    def __getitem__(self, name: str) -> str:
        return self._text[name]

    def __contains__(self, name: str) -> bool:
        return name in self._text
