"""The admin itself: routes a :class:`Request` to an endpoint and returns a :class:`Response`.

Nothing here reads an environ or a scope: :class:`DLQAdmin` only hands its :meth:`handle` to
the adapters in :mod:`.wsgi` and :mod:`.asgi`, which translate to and from it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable

from kombu_pg.config import ConfigurationError

from ..api import DLQ
from ..store import MAX_PAGE, REFUSED_STATUS, DLQError, NotFound, UsageError
from . import auth, inputs, page
from .asgi import ASGIAdapter
from .inputs import FILTERS, MAX_ID, REQUEUE_KEEPS, requeue_keeps
from .messages import HTTPError, Request, Response, bad, error_response, json_response
from .wsgi import serve_wsgi

logger = logging.getLogger("celery_dlq.http")

DEFAULT_PAGE = 50


class DLQAdmin:
    """``GET /`` the page, ``/api/...`` the JSON API; a WSGI callable, and ``.asgi`` for ASGI.

    ``app`` is the Celery app (a :class:`celery_dlq.DLQ` is built for it) or pass ``dlq=``.
    Calls into the DLQ are serialized (one database connection), so it is safe under a
    threaded server.  Mount it anywhere: links and fetches follow the mount point.
    """

    def __init__(self, app=None, *, dlq: DLQ | None = None, token: str | None = None,
                 max_page: int = MAX_PAGE, allowed_hosts: Iterable[str] | None = None) -> None:
        if dlq is None:
            if app is None:
                raise TypeError("DLQAdmin needs a Celery app or dlq=DLQ(app)")
            dlq = DLQ(app)
        self.dlq = dlq
        self.token = token or None
        self.max_page = max_page
        #: Host header names accepted (any when None): on a loopback address this stops a
        #: DNS-rebinding page from reaching an admin that has no token.
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts is not None else None
        self._lock = threading.Lock()
        #: The same admin as an ASGI 3 application.
        self.asgi = ASGIAdapter(self.handle)
        self._routes: list[tuple[re.Pattern, dict[str, Callable]]] = [
            (re.compile(r"/"), {"GET": self.page}),
            (re.compile(r"/api/entries"), {"GET": self.list_entries}),
            (re.compile(r"/api/entries/(\d{1,19})"), {"GET": self.show, "DELETE": self.delete_one}),
            (re.compile(r"/api/entries/(\d{1,19})/requeue"), {"POST": self.requeue_one}),
            (re.compile(r"/api/requeue"), {"POST": self.requeue_many}),
            (re.compile(r"/api/delete"), {"POST": self.delete_many}),
            (re.compile(r"/api/stats"), {"GET": self.stats}),
        ]

    def __call__(self, environ, start_response):
        """The WSGI application."""
        return serve_wsgi(self.handle, environ, start_response)

    def handle(self, request: Request) -> Response:
        """The response to ``request``; never raises (a bug becomes a logged 500)."""
        try:
            return self._handle(request)
        except Exception:  # never let a bug become a half-written response
            logger.exception("celery_dlq.http: unhandled error")
            return error_response(HTTPError(500, "internal error (see the server log)"))

    def _handle(self, request: Request) -> Response:
        try:
            auth.check_host(request, self.allowed_hosts)
            endpoint, args = self._route(request.method, request.path)
            if endpoint == self.page:  # served (as a 401 without data) even without the token
                if request.query:
                    raise bad("the page takes no query parameters")
                return self.page(request)
            if not auth.authorized(request, self.token):
                raise HTTPError(401, "missing or wrong bearer token", [auth.CHALLENGE])
            query = inputs.query(request)
            body = inputs.body(request)
            return json_response(*endpoint(query, body, *args))
        except HTTPError as exc:
            return error_response(exc)
        except NotFound as exc:
            return error_response(HTTPError(404, str(exc)))
        except UsageError as exc:
            return error_response(HTTPError(400, str(exc)))
        except (DLQError, ConfigurationError) as exc:
            return error_response(HTTPError(500, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # database down, permissions...
            logger.exception("celery_dlq.http: %s %s failed", request.method, request.path)
            self.dlq.runtime.reset_connection()
            return error_response(HTTPError(500, f"{type(exc).__name__}: {exc}"))

    def _route(self, method: str, path: str):
        for pattern, methods in self._routes:
            match = pattern.fullmatch(path)
            if match:
                if method not in methods:
                    raise HTTPError(405, f"{method} is not allowed on {path}",
                                    [("Allow", ", ".join(sorted(methods)))])
                args = [int(g) for g in match.groups()]
                if any(a > MAX_ID for a in args):
                    raise HTTPError(404, f"no DLQ entry with id {args[0]}")
                return methods[method], args
        raise HTTPError(404, f"no such endpoint: {path}")

    # -- the page -------------------------------------------------------------------------------

    def page(self, request: Request) -> Response:
        """The page, with the first page of entries in it when the request may see them."""
        authorized = auth.authorized(request, self.token)
        initial = None
        if authorized:
            with self._lock:
                try:
                    rows = self.dlq.list(limit=DEFAULT_PAGE)
                    initial = {"total": rows.total, "next_cursor": rows.next_cursor, "rows": rows.rows}
                except Exception as exc:  # the page still loads; its script reports the error
                    logger.warning("celery_dlq.http: initial list failed: %s", exc)
                    self.dlq.runtime.reset_connection()
        return page.render(request.root, initial, authorized)

    # -- endpoints ------------------------------------------------------------------------------

    def list_entries(self, query: dict, body: dict):
        unknown = sorted(set(query) - set(FILTERS) - {"limit", "cursor"})
        if unknown:
            raise bad(f"unknown query parameter(s) {', '.join(unknown)}; "
                      f"allowed: {', '.join(FILTERS + ('limit', 'cursor'))}")
        inputs.check_fields(body, ())
        limit = DEFAULT_PAGE
        if "limit" in query:
            limit = inputs.integer("limit", query["limit"], 1, self.max_page)
        cursor = inputs.integer("cursor", query["cursor"], 1, MAX_ID) if "cursor" in query else None
        filters = inputs.filters(query)
        with self._lock:
            rows = self.dlq.list(limit=limit, cursor=cursor, **filters)
        return 200, {"total": rows.total, "next_cursor": rows.next_cursor, "limit": limit, "rows": rows.rows}

    def show(self, query: dict, body: dict, dlq_id: int):
        inputs.no_query(query)
        inputs.check_fields(body, ())
        with self._lock:
            return 200, self.dlq.show(dlq_id)

    def stats(self, query: dict, body: dict):
        inputs.no_query(query)
        inputs.check_fields(body, ())
        with self._lock:
            return 200, self.dlq.stats()

    def requeue_one(self, query: dict, body: dict, dlq_id: int):
        inputs.no_query(query)
        inputs.check_fields(body, ("note", "force") + REQUEUE_KEEPS)
        note, force = inputs.note(body), inputs.flag(body, "force")
        with self._lock:
            result = self.dlq.requeue([dlq_id], note=note, force=force, **requeue_keeps(body))[0]
        if result.detail == "not found":
            raise NotFound(f"no DLQ entry with id {dlq_id}")
        if result.detail.startswith("error:"):
            raise HTTPError(500, result.detail)
        if not result.requeued:
            hint = "; pass force=true to requeue it anyway" if result.refused == REFUSED_STATUS else ""
            raise HTTPError(409, f"entry {dlq_id} not requeued: {result.detail}{hint}",
                            extra={"result": result.__dict__})
        return 200, result.__dict__

    def delete_one(self, query: dict, body: dict, dlq_id: int):
        inputs.no_query(query)
        inputs.check_fields(body, ())
        with self._lock:
            deleted = self.dlq.delete([dlq_id])
        if not deleted:
            raise NotFound(f"no DLQ entry with id {dlq_id}")
        return 200, {"deleted": deleted}

    @staticmethod
    def _bulk_targets(body: dict, extra: tuple[str, ...]) -> tuple[list[int] | None, dict]:
        inputs.check_fields(body, ("ids",) + FILTERS + extra)
        ids = inputs.ids(body["ids"]) if "ids" in body else None
        filters = inputs.filters(body)
        if ids and filters:
            raise bad("give either ids or filters, not both")
        if not ids and not filters:
            raise bad(f"a bulk action needs explicit ids or at least one filter ({', '.join(FILTERS)})")
        return ids, filters

    def _missing(self, ids: list[int] | None) -> None:
        """Explicit ids must all exist: a 404 naming the missing ones, nothing changed."""
        if ids:
            missing = sorted(set(ids) - set(self.dlq.delete(ids, dry_run=True)))
            if missing:
                raise HTTPError(404, f"no DLQ entry with id(s) {', '.join(map(str, missing))}")

    def requeue_many(self, query: dict, body: dict):
        inputs.no_query(query)
        ids, filters = self._bulk_targets(body, ("note", "force", "dry_run") + REQUEUE_KEEPS)
        note, force, dry_run = inputs.note(body), inputs.flag(body, "force"), inputs.flag(body, "dry_run")
        with self._lock:
            self._missing(ids)
            results = self.dlq.requeue(ids, filters=filters or None, note=note, force=force, dry_run=dry_run,
                                       **requeue_keeps(body))
        return 200, {"dry_run": dry_run, "requeued": sum(r.requeued for r in results),
                     "results": [r.__dict__ for r in results]}

    def delete_many(self, query: dict, body: dict):
        inputs.no_query(query)
        ids, filters = self._bulk_targets(body, ("dry_run",))
        dry_run = inputs.flag(body, "dry_run")
        with self._lock:
            self._missing(ids)
            deleted = self.dlq.delete(ids, filters=filters or None, dry_run=dry_run)
        return 200, {"dry_run": dry_run, "deleted": deleted}
