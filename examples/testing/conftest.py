"""The one line that gives Celery's celery_app/celery_worker fixtures a kombu-pg broker
and result backend ($KOMBU_PG_URL, else an embedded server). See docs/testing.md."""

pytest_plugins = ["kombu_pg.contrib.pytest"]
