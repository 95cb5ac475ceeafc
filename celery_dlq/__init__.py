"""celery_dlq: a dead-letter queue for Celery on PostgreSQL."""
