"""DLQ admin over HTTP: a JSON API and a small HTML page, for WSGI and ASGI.

    from celery_dlq.http import DLQAdmin
    admin = DLQAdmin(celery_app, token="s3cret")   # a WSGI callable
    admin.asgi                                     # the same admin as an ASGI callable

Standard library only (``wsgiref`` for ``celery -A proj dlq serve``).  Every input is
checked: an unknown query parameter or JSON field is a 400, a bulk action needs explicit
ids or at least one filter, an unknown id is a 404.  With a token, every request without
``Authorization: Bearer <token>`` is a 401.  Errors are always
``{"error": code, "message": text, "status": n}``.

One handler (:meth:`DLQAdmin.handle`, in :mod:`.handler`) takes a :class:`Request` and
returns a :class:`Response`; :mod:`.wsgi` and :mod:`.asgi` only translate.  Input checks are
in :mod:`.inputs`, host and token checks in :mod:`.auth`, the page in :mod:`.page` and
``static/``.
"""

from .asgi import ASGIAdapter, mount_asgi
from .auth import LOOPBACK_HOSTS
from .handler import DEFAULT_PAGE, DLQAdmin
from .inputs import FILTERS, MAX_BODY, MAX_IDS
from .messages import HTTPError, Request, Response, dumps
from .wsgi import make_http_server, mount_wsgi

__all__ = ["ASGIAdapter", "DEFAULT_PAGE", "DLQAdmin", "FILTERS", "HTTPError", "LOOPBACK_HOSTS", "MAX_BODY",
           "MAX_IDS", "Request", "Response", "dumps", "make_http_server", "mount_asgi", "mount_wsgi"]
