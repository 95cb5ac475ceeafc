"""pytest fixtures: Celery's ``celery_app``/``celery_worker`` on a kombu-pg broker.

One line in the user's ``conftest.py`` (or ``-p kombu_pg.contrib.pytest``)::

    pytest_plugins = ["kombu_pg.contrib.pytest"]

loads Celery's own plugin (``celery.contrib.pytest``) and replaces its ``celery_config``
with a PostgreSQL broker and result backend: ``$KOMBU_PG_URL`` if set, else an embedded
server (``kombu-pg[embedded]``) for the session, in a schema of its own that is dropped at
the end.  Not registered as a ``pytest11`` entry point on purpose: it would reconfigure
every test suite in an environment where kombu-pg happens to be installed.
"""

# Celery's plugin first, then this module's fixtures, which must be registered after it:
# of two plugins' fixtures with one name, pytest uses the later one.
pytest_plugins = ["celery.contrib.pytest", "kombu_pg.contrib._pytest_fixtures"]
