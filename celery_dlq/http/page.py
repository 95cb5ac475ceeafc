"""The admin page: ``static/admin.html`` with its CSS and script inlined under a nonce.

Inlined rather than served as files, so the page is one response and its Content-Security-
Policy can forbid every other source.  The files ship as package data (``pyproject.toml``).
"""

from __future__ import annotations

import html
import re
import secrets
from importlib.resources import files
from typing import Any

from ..store import REASONS, STATUSES
from .auth import CHALLENGE
from .messages import COMMON_HEADERS, Response, dumps


def _static(name: str) -> str:
    return (files(__package__) / "static" / name).read_text(encoding="utf-8")


def _options(values: tuple[str, ...]) -> str:
    return "".join(f'<option value="{v}">{v}</option>' for v in values)


# What never changes is filled in once; per request only __NONCE__, __BASE__ and __INITIAL__.
_TEMPLATE = (_static("admin.html")
             .replace("__STYLE__", _static("admin.css"))
             .replace("__SCRIPT__", _static("admin.js"))
             .replace("__REASONS__", _options(REASONS))
             .replace("__STATUSES__", _options(STATUSES)))
_SLOTS = re.compile(r"__(NONCE|BASE|INITIAL)__")


def render(root: str, initial: Any, authorized: bool) -> Response:
    """The page mounted at ``root``, with ``initial`` (a first page of rows, or None) in it.

    Unauthorized it is a 401 whose body is still the page, without data: its script asks
    for the token and sends it with every fetch.
    """
    nonce = secrets.token_urlsafe(16)
    # One pass, so text put into one slot (the mount path, row data) is never read as another.
    values = {"NONCE": nonce, "BASE": html.escape(root.rstrip("/"), quote=True), "INITIAL": dumps(initial)}
    body = _SLOTS.sub(lambda m: values[m[1]], _TEMPLATE)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Security-Policy", csp)]
    headers += COMMON_HEADERS
    if not authorized:
        headers.append(CHALLENGE)
    return Response(200 if authorized else 401, headers, body.encode())
