"""A throwaway virtualenv with kombu-pg installed from a freshly built wheel.

The ecosystem tests run users' apps that never import kombu_pg, so they need the
distribution *installed*: an editable install (setuptools' PEP 660 wheel) carries only
setuptools' own ``.pth``, not ``kombu_pg-autoload.pth``.  The venv has no pip and no
dependencies of its own: a path file puts the project venv's site-packages after its own
(a plain path entry, so the editable install's ``.pth`` there is not run and kombu_pg
comes from the wheel only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.monitor_app import REPO_ROOT, ManagedProcess


class InstalledVenv:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = str(root / "bin" / "python")

    @classmethod
    def create(cls, root: Path) -> "InstalledVenv":
        wheels = root / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO_ROOT),
                        "-w", str(wheels)], check=True, capture_output=True)
        venv.EnvBuilder(with_pip=False).create(root / "venv")
        self = cls(root / "venv")
        subprocess.run([sys.executable, "-m", "pip", "--python", self.python, "install", "-q",
                        "--no-deps", *map(str, wheels.glob("*.whl"))],
                       check=True, capture_output=True)
        purelib = subprocess.run(
            [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip()
        ours = sysconfig.get_paths()["purelib"]
        Path(purelib, "zz_kombu_pg_test_deps.pth").write_text(ours + "\n")
        return self

    def env(self, project: Path, **extra: str) -> dict[str, str]:
        """The user's environment: their project on the path, never this repository."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KOMBU_PG_AUTOLOAD")}
        env.update(PYTHONPATH=str(project), PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1",
                   KOMBU_PG_TEST_PARENT_PID=str(os.getpid()))
        env.update(extra)
        return env

    def process(self, args: list[str], env: dict[str, str], name: str) -> ManagedProcess:
        return ManagedProcess([self.python, *args], env, name)

    def run(self, args: list[str], env: dict[str, str],
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=env["PYTHONPATH"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> InstalledVenv:
    """The venv, built once per test module (a wheel build takes a few seconds)."""
    return InstalledVenv.create(tmp_path_factory.mktemp("eco"))
