"""An embedded PostgreSQL server for demos and tests (optional extra ``kombu-pg[embedded]``).

Used only when no database URL is configured: it starts a private server from the
``pgserver`` wheel in a temporary directory, listening on a Unix socket, and stops it
when the process exits (or on :meth:`EmbeddedPostgres.stop`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

#: Environment variable naming a real server; when set, nothing is embedded.
URL_ENV = "KOMBU_PG_URL"


class EmbeddedPostgres:
    """A throwaway PostgreSQL server; ``url`` is a libpq URL for its ``postgres`` database."""

    def __init__(self, data_dir: str | os.PathLike | None = None) -> None:
        try:
            import pgserver
        except ImportError:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "no database URL is configured and the embedded server is not installed: "
                f"set {URL_ENV}=postgresql://... or pip install 'kombu-pg[embedded]'"
            ) from None
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kombu_pg_embedded_"))
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        self.url: str = self._server.get_uri()

    def restart(self) -> None:
        """Restart the server in place (crash tests); clients see their sessions end."""
        import pgserver

        pgserver.pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.data_dir, user=self._server.system_user)

    def stop(self) -> None:
        self._server.cleanup()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedPostgres":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def database_url(default: str | None = None) -> tuple[str, EmbeddedPostgres | None]:
    """The URL to use: ``$KOMBU_PG_URL``, else ``default``, else a new embedded server.

    Returns the URL and the embedded server (None when a real one is used); the caller
    stops the server when done.
    """
    url = os.environ.get(URL_ENV) or default
    if url:
        return url, None
    server = EmbeddedPostgres()
    return server.url, server
