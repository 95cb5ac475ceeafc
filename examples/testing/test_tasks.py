"""Run with ``cd examples/testing && pytest`` (add ``-p no:celery`` only when passing the
plugin with ``-p`` while pytest-celery is installed)."""


def test_mul(celery_app, celery_worker):
    @celery_app.task
    def mul(x, y):
        return x * y

    celery_worker.reload()
    assert mul.delay(4, 4).get(timeout=30) == 16
