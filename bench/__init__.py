"""Side-by-side benchmark of kombu_pg against other Celery brokers: ``python -m bench``."""
