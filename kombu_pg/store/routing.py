"""Routing keys and queue names as the database sees them."""

from __future__ import annotations

import re

#: Queue names travel as NOTIFY payloads, which PostgreSQL caps just under 8000 bytes.
MAX_QUEUE_NAME_BYTES = 4096

_TOPIC_WILDCARDS = {"*": r"[^.]+", "#": r".*?"}


def check_queue_name(name: str) -> str:
    """Return ``name`` if PostgreSQL can carry it everywhere a queue name goes."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a queue name must be a non-empty string, not {name!r}")
    size = len(name.encode("utf-8"))
    if size > MAX_QUEUE_NAME_BYTES:
        raise ValueError(f"queue name too long: {size} bytes, at most {MAX_QUEUE_NAME_BYTES} "
                         f"(it starts {name[:40]!r})")
    if "\x00" in name:
        raise ValueError("a queue name cannot contain a NUL character")
    return name


def topic_pattern(binding_key: str) -> str:
    """The POSIX regex (PostgreSQL ``~``) a topic binding key matches routing keys with.

    Kombu's semantics: words are separated by dots, a word that is exactly ``*`` matches
    one word, exactly ``#`` any number of characters.  Unlike Kombu's own
    ``key_to_pattern``, a ``*`` or ``#`` inside a word is a literal character: Kombu leaves
    it unescaped, so ``user*`` would mean "use" then any r's, and ``*0`` is an invalid
    regex that made every publish to the exchange fail.
    """
    words = (_TOPIC_WILDCARDS.get(word) or re.escape(word) for word in binding_key.split("."))
    return "^" + r"\.".join(words) + "$"
