"""kombu-pg: PostgreSQL as a Celery broker and result backend.

Importing this package registers the ``postgresql://`` and ``postgres://`` URL schemes
with Kombu (Kombu has no entry-point discovery for transports) and a Flower broker
client for them.  Both happen when Kombu's (Flower's) module is imported, so importing
this package imports neither: the installed ``kombu_pg-autoload.pth`` imports it in every
interpreter (off with ``KOMBU_PG_AUTOLOAD=0``), and that must cost next to nothing.
"""

from ._hooks import TRANSPORT_PATH, install

__version__ = "0.1.0"

install()

__all__ = ["TRANSPORT_PATH", "__version__"]
