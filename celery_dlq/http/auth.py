"""Who may talk to the admin: the ``Host`` name it answers and the bearer token."""

from __future__ import annotations

import hmac

from .messages import Request, bad

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Sent with every 401, so a client knows which scheme to answer with.
CHALLENGE = ("WWW-Authenticate", 'Bearer realm="celery_dlq"')


def check_host(request: Request, allowed_hosts: set[str] | None) -> None:
    """A 400 unless the ``Host`` header names one of ``allowed_hosts`` (any when None)."""
    if allowed_hosts is None:
        return
    host = request.headers.get("host", "").strip().lower()
    if host.startswith("["):  # [::1]:8088
        name = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port
        name = host.partition(":")[0]
    else:  # a name without a port, or a bare IPv6 address
        name = host
    if name not in allowed_hosts:
        raise bad(f"Host {host!r} is not served here")


def authorized(request: Request, token: str | None) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (always, without a token)."""
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
