"""Integrations with tools around Celery: Flower (:mod:`.flower`), pytest (:mod:`.pytest`)."""
