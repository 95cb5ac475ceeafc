"""Named priority bands, mapped onto Celery's 0-9 (AMQP semantics: higher runs first).

Celery's ``priority=`` is 0-9 on kombu-pg and RabbitMQ, **higher first**. Redis's
transport reverses it (0 is the most urgent), so code moved from Redis must flip its
numbers: ``9 - redis_priority``.  These bands come from the reference design.
"""

EMERGENCY = 9
FAST_HIGH = 8
FAST_DEFAULT = 7
BULK_DEFAULT = 3
BULK_LOW = 1
BULK_LOWEST = 0

#: Celery's own default when a task sets no priority (and kombu-pg's).
DEFAULT = 0


def from_redis(priority: int) -> int:
    """The kombu-pg priority that orders like ``priority`` did on Redis (0 = most urgent)."""
    if not 0 <= priority <= 9:
        raise ValueError("Celery priorities are 0-9")
    return 9 - priority
