"""kombu-pg: PostgreSQL as a Celery broker and result backend.

Importing this package registers the ``postgresql://`` and ``postgres://`` URL schemes
with Kombu (Kombu has no entry-point discovery for transports).
"""

from kombu.transport import TRANSPORT_ALIASES

__version__ = "0.1.0"

TRANSPORT_PATH = "kombu_pg.transport:Transport"

for _scheme in ("postgresql", "postgres"):
    TRANSPORT_ALIASES[_scheme] = TRANSPORT_PATH

__all__ = ["TRANSPORT_PATH", "__version__"]
