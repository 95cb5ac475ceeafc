"""Validated settings shared by the transport, the result backend and the CLI.

Nothing here talks to the database: bad input is refused before any SQL runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping
from urllib.parse import unquote

from psycopg.conninfo import conninfo_to_dict, make_conninfo

DEFAULT_SCHEMA = "kombu_pg"

#: libpq parameters whose values are secrets: never in an error, a log line or output.
SECRET_KEYS = ("password", "sslpassword")
# A URL's userinfo password (scheme://user:PASSWORD@host), and key=value secrets of a
# conninfo string or a URL query (password=..., sslpassword='...').  Used on input that
# libpq may have refused to parse, so they are deliberately lenient.
_URL_SECRET_RE = re.compile(r"(://[^:/?#@\s]*:)([^/?#\s]*)(@)")
_KV_SECRET_RE = re.compile(
    r"((?<![A-Za-z_])(?:ssl)?password\s*=\s*)"  # the key: password= or sslpassword=
    r"('(?:[^'\\]|\\.)*'?|\x22(?:[^\x22\\]|\\.)*\x22?|[^\s&#'\x22]*)"  # '...', "..." or bare
)

# Schema names become identifiers and NOTIFY channel prefixes; channels are limited to
# 63 bytes, so the schema keeps room for a suffix such as ":results".
_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,47}$")

# The password of a libpq URL: after the user's first ':' and before the '@' that ends the
# user info, which (as libpq reads it) comes before any '/'.  A ``password=`` query
# parameter too.

# Keys Kombu and Celery themselves put into transport_options for every transport
# (publish retry policy, callbacks).  They are accepted and not interpreted here.
GENERIC_TRANSPORT_OPTIONS = frozenset(
    {
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "callback",
        "errback",
        "on_revive",
        "retry_errors",
        "confirm_publish",
        "body_encoding",
        "deadletter_queue",
    }
)


class ConfigurationError(ValueError):
    """A kombu-pg option, URL or name is invalid."""


def validate_schema(name: Any) -> str:
    """Return ``name`` if it is an acceptable schema name, else raise ConfigurationError."""
    if not isinstance(name, str) or not _SCHEMA_RE.match(name):
        raise ConfigurationError(
            f"invalid schema name {name!r}: use 1-48 characters, letters, digits and "
            "underscores, not starting with a digit"
        )
    return name


@dataclass(frozen=True)
class Options:
    """kombu-pg options, read from ``broker_transport_options`` (or the backend's)."""

    #: Schema holding every kombu-pg table.
    schema: str = DEFAULT_SCHEMA
    #: Apply missing migrations on first use (under an advisory lock).
    auto_migrate: bool = True
    #: Seconds between safety polls when no NOTIFY arrives.
    polling_interval: float = 2.0
    #: Most messages claimed per round trip.  With a prefetch limit, a consumer claims
    #: again once min(claim_batch_max, prefetch/2) slots are free, so claims stay batched.
    claim_batch_max: int = 100
    #: Seconds between recovery passes (dead consumers' messages unlocked, expiry).
    recovery_interval: float = 2.0
    #: Reclaim messages locked longer than this many seconds even if the owner lives.
    visibility_timeout: float | None = None
    #: A message delivered this many times is not delivered again (poison); it stays,
    #: unlocked, for the dead-letter reaper.  None turns the limit off.
    max_deliveries: int | None = 10
    #: Celery ETA/countdown messages stay invisible in the database until due, instead
    #: of waiting in a worker's memory (and prefetch window).
    native_delayed_delivery: bool = False
    #: reject(requeue=False) moves the message into the dead-letter table (celery_dlq)
    #: instead of deleting it.  celery_dlq.install() turns this on for kombu-pg brokers.
    dead_letter_rejected: bool = False
    #: Claims and acks wait for the WAL flush like publishes do.  Off by default: a
    #: claim or ack undone by a server crash only means a redelivery (as with
    #: RabbitMQ, whose acks are not confirmed either); publishes are always durable.
    durable_acks: bool = False
    #: Deprecated and ignored (accepted so existing settings keep working): publishes no
    #: longer debounce their NOTIFYs, they notify only queues with an idle consumer.
    notify_debounce: float = 0.02
    #: Extra libpq connection parameters (e.g. ``sslrootcert``, ``keepalives_idle``),
    #: merged into the connection string; they override the URL.
    connect_kwargs: Mapping[str, Any] = field(default_factory=dict, repr=False)  # may hold a password

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None, *, allow: frozenset[str] = frozenset()) -> "Options":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known - GENERIC_TRANSPORT_OPTIONS - allow)
        if unknown:
            raise ConfigurationError(
                f"unknown kombu-pg option(s) {', '.join(map(repr, unknown))}; "
                f"known options: {', '.join(sorted(known))}"
            )
        values = {k: raw[k] for k in known if k in raw}
        opts = cls(**values)
        opts._check()
        return opts

    def _check(self) -> None:
        validate_schema(self.schema)
        for name in ("polling_interval", "recovery_interval", "notify_debounce"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigurationError(f"option {name!r} must be a number >= 0, got {value!r}")
        if self.polling_interval <= 0 or self.recovery_interval <= 0:
            raise ConfigurationError("polling_interval and recovery_interval must be > 0")
        if not _is_int(self.claim_batch_max) or self.claim_batch_max < 1:
            raise ConfigurationError(
                f"option 'claim_batch_max' must be an integer >= 1, got {self.claim_batch_max!r}"
            )
        vt = self.visibility_timeout
        if vt is not None and (not _is_number(vt) or vt <= 0):
            raise ConfigurationError(f"option 'visibility_timeout' must be > 0 or None, got {vt!r}")
        md = self.max_deliveries
        if md is not None and (not _is_int(md) or md < 1):
            raise ConfigurationError(f"option 'max_deliveries' must be an integer >= 1 or None, got {md!r}")
        for name in ("auto_migrate", "native_delayed_delivery", "dead_letter_rejected", "durable_acks"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"option {name!r} must be True or False")
        if not isinstance(self.connect_kwargs, Mapping):
            raise ConfigurationError("option 'connect_kwargs' must be a mapping")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_conninfo(
    url: str,
    *,
    database: str | None = None,
    user: str | None = None,
    password: str | None = None,
    port: int | None = None,
    connect_timeout: float | None = None,
    ssl: Mapping[str, Any] | bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Turn a libpq URL plus separately given parts into one libpq conninfo string.

    The URL passes through untouched (multi-host, ``sslmode``, ``application_name``...).
    User, password, port and timeout given separately fill in what the URL leaves out;
    the ``ssl*`` keys of ``ssl`` (Celery's ``broker_use_ssl``) and ``extra``
    (``connect_kwargs``) override the URL.  A bare host name (Kombu's ``hostname``
    without a scheme) is accepted, with ``virtual_host`` as the database.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("a PostgreSQL URL is required, e.g. postgresql://user@host/db")
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(f"unsupported URL scheme {scheme!r}: use postgresql://")
        try:
            parsed = conninfo_to_dict(url)
        except Exception as exc:  # psycopg raises ProgrammingError for malformed input
            # libpq quotes the offending part, which can be the password itself.
            raise ConfigurationError(f"malformed PostgreSQL URL: {scrub(str(exc).strip(), url)}") from None
    elif "=" in url or any(c.isspace() for c in url.strip()):
        raise ConfigurationError(f"expected a postgresql:// URL or a host name, got {scrub(repr(url), url)}")
    else:
        parsed = {"host": url.strip()}
        if database and database != "/":
            parsed["dbname"] = database.lstrip("/")
    merged: dict[str, Any] = {}
    if user and "user" not in parsed:
        merged["user"] = user
    if password and "password" not in parsed:
        merged["password"] = password() if callable(password) else password
    if port and "port" not in parsed:
        merged["port"] = int(port)
    if isinstance(connect_timeout, float) and not math.isfinite(connect_timeout):
        raise ConfigurationError(f"connect_timeout must be a finite number, got {connect_timeout!r}")
    if connect_timeout and "connect_timeout" not in parsed:
        # libpq takes whole seconds and treats values below 2 as 2.
        merged["connect_timeout"] = max(2, int(round(float(connect_timeout))))
    if isinstance(ssl, Mapping):
        merged.update({k: v for k, v in ssl.items() if k.startswith("ssl")})
    elif ssl is True and "sslmode" not in parsed:
        merged["sslmode"] = "require"
    parsed.setdefault("application_name", "kombu_pg")
    merged.update(extra or {})
    try:
        conninfo = make_conninfo(make_conninfo(**parsed), **merged)
    except Exception as exc:
        message = scrub(str(exc).strip(), url, parsed, merged)
        raise ConfigurationError(f"invalid connection parameters: {message}") from None
    if "\x00" in conninfo:
        raise ConfigurationError("connection parameters cannot contain NUL characters")
    return conninfo


def redact(conninfo_or_url: str) -> str:
    """Return the connection string with its secrets masked, for logs and errors."""
    try:
        params = conninfo_to_dict(conninfo_or_url)
    except Exception:
        return "<unparsable connection string>"
    for key in SECRET_KEYS:
        if key in params:
            params[key] = "**"
    return make_conninfo(**params)


def redact_url(url: str, mask: str = "**") -> str:
    """``url`` (kept a URL) with the userinfo password and secret query values masked."""
    return scrub(url, url, mask=mask)


def scrub(text: str, *sources: str | Mapping[str, Any] | None, mask: str = "**") -> str:
    """``text`` with every secret of ``sources`` (URLs, conninfo strings or parameter
    mappings, well-formed or not) replaced by ``mask``, and any secret it spells out itself
    (``password=...``, ``user:password@``) masked."""
    found: set[str] = set()
    for source in sources:
        found.update(_secrets(source))
    # Longest first, so a secret containing another is masked whole.
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, mask)
    text = _URL_SECRET_RE.sub(lambda m: m[1] + mask + m[3], text)
    return _KV_SECRET_RE.sub(lambda m: m[1] + mask, text)


def _secrets(source: str | Mapping[str, Any] | None) -> set[str]:
    values: list[Any] = []
    if isinstance(source, Mapping):
        values = [source.get(key) for key in SECRET_KEYS]
    elif isinstance(source, str):
        try:
            params = conninfo_to_dict(source)
            values = [params.get(key) for key in SECRET_KEYS]
        except Exception:
            pass
        values += [m[2] for m in _URL_SECRET_RE.finditer(source)]
        values += [m[2] for m in _KV_SECRET_RE.finditer(source)]
    found = set()
    for value in values:
        if callable(value) or not value:
            continue
        value = str(value)
        # The raw, the quoted-string and the percent-decoded spellings: libpq may echo any.
        found.update({value, value.strip("'"), unquote(value)})
    found.discard("")
    return found
