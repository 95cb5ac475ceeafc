"""Validated settings shared by the transport, the result backend and the CLI.

Nothing here talks to the database: bad input is refused before any SQL runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, TypeVar
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


#: Rows deleted per statement by the result backend's cleanup (``cleanup_batch``).
CLEANUP_BATCH = 5000


@dataclass(frozen=True)
class _Rule:
    """What an option's value must be: ``accepts`` decides, ``requirement`` says it."""

    requirement: str
    accepts: Callable[[Any], bool]
    #: False for values that may carry a secret: the error names their type only.
    show_value: bool = True


def _number(low: float, *, above: bool = False, integer: bool = False, optional: bool = False) -> _Rule:
    """A finite number (an int when ``integer``) >= ``low`` (> ``low`` when ``above``),
    or None when ``optional``.  Booleans and numeric strings are refused."""
    kind = "an integer" if integer else "a number"
    requirement = f"{kind} {'>' if above else '>='} {low:g}" + (" or None" if optional else "")

    def accepts(value: Any) -> bool:
        if value is None:
            return optional
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return False
        return math.isfinite(value) and (value > low if above else value >= low)

    return _Rule(requirement, accepts)


_SCHEMA = _Rule("1-48 letters, digits and underscores, not starting with a digit",
                lambda v: isinstance(v, str) and bool(_SCHEMA_RE.match(v)))
_BOOL = _Rule("True or False", lambda v: isinstance(v, bool))
_MAPPING = _Rule("a mapping of libpq parameters", lambda v: isinstance(v, Mapping), show_value=False)


def _option(default: Any, rule: _Rule, **kwargs: Any) -> Any:
    """A dataclass field whose value ``from_mapping`` checks against ``rule``."""
    if callable(default):
        return field(default_factory=default, metadata={"rule": rule}, **kwargs)
    return field(default=default, metadata={"rule": rule}, **kwargs)


class _Checked:
    """``from_mapping`` for the option dataclasses: one error type (ConfigurationError)
    and one message style for unknown options and bad values alike."""

    #: The Celery setting the options come from, and whose options they are: for errors.
    SETTING = ""
    KIND = ""

    @classmethod
    def from_mapping(cls: type[C], raw: Mapping[str, Any] | None) -> C:
        """The options in ``raw`` (the rest default); ConfigurationError on an unknown
        option (Kombu's and Celery's generic keys aside) or a value its rule refuses."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(raw) - known - GENERIC_TRANSPORT_OPTIONS
        if unknown:
            raise ConfigurationError(
                f"unknown kombu-pg option(s) {', '.join(map(repr, sorted(unknown)))} in {cls.SETTING}"
                f"{cls._misplaced(unknown, known)}; known options: {', '.join(sorted(known))}"
            )
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name in raw and not f.metadata["rule"].accepts(raw[f.name]):
                rule, value = f.metadata["rule"], raw[f.name]
                got = repr(value) if rule.show_value else f"a {type(value).__name__}"
                raise ConfigurationError(f"option {f.name!r} must be {rule.requirement}, got {got}")
        return cls(**{k: raw[k] for k in known if k in raw})

    @classmethod
    def _misplaced(cls, unknown: set[str], known: set[str]) -> str:
        """A hint when unknown options are another component's."""
        for other in (Options, BackendOptions):
            if other is not cls and unknown & ({f.name for f in fields(other)} - known):  # type: ignore[arg-type]
                return f" ({other.KIND} options belong in {other.SETTING})"
        return ""


C = TypeVar("C", bound=_Checked)


@dataclass(frozen=True)
class _Common(_Checked):
    """The options the broker and the result backend both take."""

    #: Schema holding every kombu-pg table (the result tables too).
    schema: str = _option(DEFAULT_SCHEMA, _SCHEMA)
    #: Apply missing migrations on first use (under an advisory lock).
    auto_migrate: bool = _option(True, _BOOL)
    #: Extra libpq connection parameters (e.g. ``sslrootcert``, ``keepalives_idle``),
    #: merged into the connection string; they override the URL.
    connect_kwargs: Mapping[str, Any] = _option(dict, _MAPPING, repr=False)  # may hold a password


@dataclass(frozen=True)
class Options(_Common):
    """The broker's (transport's) options, read from ``broker_transport_options``."""

    SETTING = "broker_transport_options"
    KIND = "broker"

    #: Seconds between safety polls when no NOTIFY arrives.
    polling_interval: float = _option(2.0, _number(0, above=True))
    #: Most messages claimed per round trip.  With a prefetch limit, a consumer claims
    #: again once min(claim_batch_max, prefetch/2) slots are free, so claims stay batched.
    claim_batch_max: int = _option(100, _number(1, integer=True))
    #: Seconds between recovery passes (dead consumers' messages unlocked, expiry).
    recovery_interval: float = _option(2.0, _number(0, above=True))
    #: Reclaim messages locked longer than this many seconds even if the owner lives.
    visibility_timeout: float | None = _option(None, _number(0, above=True, optional=True))
    #: A message delivered this many times is not delivered again (poison); it stays,
    #: unlocked, for the dead-letter reaper.  None turns the limit off.
    max_deliveries: int | None = _option(10, _number(1, integer=True, optional=True))
    #: Celery ETA/countdown messages stay invisible in the database until due, instead
    #: of waiting in a worker's memory (and prefetch window).
    native_delayed_delivery: bool = _option(False, _BOOL)
    #: reject(requeue=False) moves the message into the dead-letter table (celery_dlq)
    #: instead of deleting it.  celery_dlq.install() turns this on for kombu-pg brokers.
    dead_letter_rejected: bool = _option(False, _BOOL)
    #: Claims and acks wait for the WAL flush like publishes do.  Off by default: a
    #: claim or ack undone by a server crash only means a redelivery (as with
    #: RabbitMQ, whose acks are not confirmed either); publishes are always durable.
    durable_acks: bool = _option(False, _BOOL)
    #: Deprecated and ignored (accepted so existing settings keep working): publishes no
    #: longer debounce their NOTIFYs, they notify only queues with an idle consumer.
    notify_debounce: float = _option(0.02, _number(0))


@dataclass(frozen=True)
class BackendOptions(_Common):
    """The result backend's options, read from ``result_backend_transport_options``."""

    SETTING = "result_backend_transport_options"
    KIND = "result backend"

    #: Seconds between safety re-reads while waiting when no NOTIFY arrives.
    polling_interval: float = _option(5.0, _number(0, above=True))
    #: Rows deleted per statement by the result cleanup.
    cleanup_batch: int = _option(CLEANUP_BATCH, _number(1, integer=True))
    #: Seconds between the bounded cleanups a process piggy-backs on its result writes
    #: (so expired rows go away even without celery beat); None or 0 turns them off.
    cleanup_interval: float | None = _option(300.0, _number(0, optional=True))


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
