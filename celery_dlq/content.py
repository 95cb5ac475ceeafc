"""Reading stored payloads without deserializing what the app does not accept.

A DLQ row keeps whatever a producer sent, including bodies in a content type the app
refuses (a pickle sent to a json-only app is rejected into the DLQ).  Deserializing one
runs the producer's code, so bodies are decoded only with the app's ``accept_content``
(``result_accept_content`` for result rows); anything else is described (content type,
size, an escaped preview) and never loaded.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Collection

from kombu.serialization import TRUSTED_CONTENT, prepare_accept_content

#: Bytes of a refused body shown, escaped, in a preview.
PREVIEW_BYTES = 256


def accepted_content(app, *, results: bool = False) -> frozenset[str]:
    """The content types the app accepts: ``accept_content``, or for result rows
    ``result_accept_content`` when set (Celery's own precedence)."""
    conf = app.conf
    names = conf.result_accept_content if results else None
    if names is None:
        names = conf.accept_content
    return frozenset(prepare_accept_content(names or ()))


def is_accepted(content_type: str | None, accept: Collection[str]) -> bool:
    """Whether Kombu would decode this content type under ``accept`` (its rule, in one place)."""
    content_type = content_type or "application/data"
    return content_type in accept or content_type in TRUSTED_CONTENT


def raw_body(doc: dict) -> bytes:
    """The body of a stored Kombu message document, as the bytes the producer serialized."""
    body = doc.get("body")
    if (doc.get("properties") or {}).get("body_encoding") == "base64":
        return base64.b64decode(body or "")
    if isinstance(body, str):
        return body.encode(doc.get("content-encoding") or "utf-8")
    return b"" if body is None else json.dumps(body).encode()


def escaped_preview(data: bytes, limit: int = PREVIEW_BYTES) -> str:
    """The first ``limit`` bytes as printable ASCII, everything else backslash-escaped."""
    return repr(bytes(data[:limit]))[2:-1]


def describe_body(message: str, accept: Collection[str]) -> dict[str, Any]:
    """Content type, encoding and size of a stored message's body, whether the app accepts
    it, and (always; nothing is deserialized here) an escaped preview of its first bytes."""
    try:
        doc = json.loads(message)
        data = raw_body(doc)
        content_type, encoding = doc.get("content-type"), doc.get("content-encoding")
    except Exception:  # not a Kombu message document: show the stored text itself
        data, content_type, encoding = message.encode("utf-8", "replace"), None, None
    return {
        "content_type": content_type, "content_encoding": encoding, "size": len(data),
        "accepted": content_type is not None and is_accepted(content_type, accept),
        "preview": escaped_preview(data), "truncated": len(data) > PREVIEW_BYTES,
    }
