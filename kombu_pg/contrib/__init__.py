"""Integrations with the tools around Celery: Flower (:mod:`.flower`) and pytest (:mod:`.pytest`)."""
