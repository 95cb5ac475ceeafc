"""``broker_url = "postgresql://..."`` alone, in apps that never import kombu_pg.

kombu-pg is installed from a wheel into a throwaway venv (tests/ecosystem_venv.py); the
apps live in a temporary project directory and run in subprocesses of that venv: a
``celery worker``, ``celery inspect ping``, a plain script calling ``delay().get()``, and
a Django-style project configured from ``CELERY_BROKER_URL``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.ecosystem_venv import installed  # noqa: F401  (a fixture)

PROJ = '''
import os
from celery import Celery

app = Celery("proj")
app.conf.broker_url = os.environ["PROJ_URL"]
app.conf.result_backend = os.environ["PROJ_URL"]
app.conf.broker_transport_options = {"schema": os.environ["PROJ_SCHEMA"], "polling_interval": 0.5}
app.conf.result_backend_transport_options = {"schema": os.environ["PROJ_SCHEMA"]}

@app.task(name="proj.add")
def add(x, y):
    return x + y
'''

# The Django way (https://docs.celeryq.dev/en/stable/django/): settings from the
# environment, read through django.conf with the CELERY_ namespace.
DJANGO_SETTINGS = '''
import os
SECRET_KEY = "test"
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
CELERY_RESULT_BACKEND = os.environ["CELERY_BROKER_URL"]
CELERY_BROKER_TRANSPORT_OPTIONS = {"schema": os.environ["PROJ_SCHEMA"], "polling_interval": 0.5}
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"schema": os.environ["PROJ_SCHEMA"]}
'''
DJANGO_CELERY = '''
import os
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj.settings")
app = Celery("djproj")
app.config_from_object("django.conf:settings", namespace="CELERY")

@app.task(name="proj.add")
def add(x, y):
    return x + y
'''

CLIENT = '''
import sys
from {module} import add

print("result", add.delay(2, 3).get(timeout=60))
print("kombu_pg from", sys.modules["kombu_pg"].__file__)
'''


@pytest.fixture
def project(tmp_path):
    (tmp_path / "proj.py").write_text(PROJ)
    (tmp_path / "djproj").mkdir()
    (tmp_path / "djproj" / "__init__.py").write_text("")
    (tmp_path / "djproj" / "settings.py").write_text(DJANGO_SETTINGS)
    (tmp_path / "djproj" / "celery.py").write_text(DJANGO_CELERY)
    for module in ("proj", "djproj.celery"):
        (tmp_path / f"client_{module.split('.')[0]}.py").write_text(CLIENT.format(module=module))
    return tmp_path


def _assert_no_import(project) -> None:
    # The point of the test: nothing the user wrote mentions kombu_pg.
    for path in project.rglob("*.py"):
        text = path.read_text()
        assert "import kombu_pg" not in text and "from kombu_pg" not in text, path


@pytest.mark.parametrize("module", ["proj", "djproj.celery"])
def test_the_url_alone_runs_worker_inspect_and_delay(
        installed, project, pg_url, schema, module):  # noqa: F811
    _assert_no_import(project)
    env = installed.env(project, PROJ_URL=pg_url, CELERY_BROKER_URL=pg_url, PROJ_SCHEMA=schema)
    node = f"eco{uuid.uuid4().hex[:8]}@localhost"
    worker = installed.process(["-m", "celery", "-A", module, "worker", "-P", "threads", "-c", "2",
                                "-n", node, "-l", "info"], env, name="worker").start()
    try:
        worker.wait_for_line(r"\bready\.$", timeout=60)
        ping = installed.run(["-m", "celery", "-A", module, "inspect", "ping", "-d", node,
                              "-t", "10"], env)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "pong" in ping.stdout
        client = installed.run([f"client_{module.split('.')[0]}.py"], env)
        assert client.returncode == 0, client.stdout + client.stderr
        assert "result 5" in client.stdout
        # The distribution under test is the installed wheel, not this checkout.
        assert f"kombu_pg from {installed.root}" in client.stdout
    finally:
        worker.stop()


def test_autoload_off_means_no_such_transport(installed, project, pg_url, schema):  # noqa: F811
    """KOMBU_PG_AUTOLOAD=0: the documented switch works, and without the .pth the URL fails
    exactly as it did before (the test above would fail without the hook)."""
    env = installed.env(project, PROJ_URL=pg_url, PROJ_SCHEMA=schema, KOMBU_PG_AUTOLOAD="0")
    client = installed.run(["client_proj.py"], env)
    assert client.returncode != 0
    assert "No such transport: postgresql" in client.stderr


def test_a_process_without_kombu_imports_nothing_heavy(installed, project):  # noqa: F811
    script = textwrap.dedent("""
        import sys
        roots = ("kombu", "celery", "kombu_pg", "psycopg", "typing")
        print(sorted(m for m in sys.modules if m.split(".")[0] in roots))
        from kombu.transport import TRANSPORT_ALIASES
        print(TRANSPORT_ALIASES["postgresql"], TRANSPORT_ALIASES["postgres"],
              "kombu_pg.transport" in sys.modules)
    """)
    out = installed.run(["-c", script], installed.env(project))
    assert out.returncode == 0, out.stderr
    loaded, aliases = out.stdout.splitlines()
    assert loaded == "['kombu_pg', 'kombu_pg._hooks']"
    # The alias is a string: the transport module loads only when a connection needs it.
    assert aliases == "kombu_pg.transport:Transport kombu_pg.transport:Transport False"


SHARED_LOADER = '''
import importlib.machinery, importlib.util, sys
import kombu_pg  # the hook, before kombu.transport is imported

class Shared:
    """One loader for many modules, like pytest's assertion-rewriting hook."""
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        with open(module.__spec__.origin) as f:
            exec(compile(f.read(), module.__spec__.origin, "exec"), module.__dict__)

shared = Shared()

class Finder:
    def find_spec(self, name, path=None, target=None):
        if name not in ("kombu.transport", "colorsys"):
            return None
        real = importlib.machinery.PathFinder.find_spec(name, path)
        return importlib.util.spec_from_file_location(
            name, real.origin, loader=shared,
            submodule_search_locations=real.submodule_search_locations)

sys.meta_path.insert(1, Finder())
from kombu.transport import TRANSPORT_ALIASES
import colorsys  # through the same loader: must not get kombu's hook
print(TRANSPORT_ALIASES["postgresql"], colorsys.__name__)
'''


def test_a_shared_loader_runs_the_hook_for_its_module_only():
    out = subprocess.run([sys.executable, "-c", SHARED_LOADER], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "KOMBU_PG_AUTOLOAD": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kombu_pg.transport:Transport", "colorsys"]
