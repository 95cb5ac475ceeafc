"""Kombu's reusable transport test classes, taken from the sdist of the installed Kombu.

The classes (``t/integration/common.py``) are not in the Kombu wheel, only in its sdist.
:func:`kombu_test_root` downloads the sdist matching the *installed* Kombu version once
into ``.kombu-src/`` at the repository root (git-ignored), unpacks it, and returns the
unpacked directory, which the caller puts on ``sys.path`` so that
``from t.integration.common import ...`` works.  Nothing is vendored.

``KOMBU_SDIST_DIR`` may name an already unpacked ``kombu-X.Y.Z`` directory (offline
machines).  If the download fails the caller skips, unless ``KOMBU_PG_REQUIRE_SDIST=1``
(CI), where a missing sdist is an error.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import kombu

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".kombu-src"


class SdistUnavailable(RuntimeError):
    """The Kombu sdist could not be obtained."""


def _is_test_root(path: Path) -> bool:
    return (path / "t" / "integration" / "common.py").is_file()


def kombu_test_root(version: str | None = None) -> Path:
    """The unpacked ``kombu-<version>`` directory holding ``t/integration/common.py``."""
    version = version or kombu.__version__
    override = os.environ.get("KOMBU_SDIST_DIR")
    if override:
        path = Path(override)
        if not _is_test_root(path):
            raise SdistUnavailable(f"KOMBU_SDIST_DIR={override} has no t/integration/common.py")
        return path
    target = CACHE_DIR / f"kombu-{version}"
    if _is_test_root(target):
        return target
    CACHE_DIR.mkdir(exist_ok=True)
    # Parallel test processes (pytest -n) must not download and unpack at the same time.
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_test_root(target):
            return target
        archive = CACHE_DIR / f"kombu-{version}.tar.gz"
        if not archive.is_file():
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"kombu=={version}", "-d", str(CACHE_DIR), "--disable-pip-version-check",
                 "--quiet"],
                capture_output=True, text=True, timeout=300, check=False,
            )
            if proc.returncode != 0 or not archive.is_file():
                raise SdistUnavailable(
                    f"pip download kombu=={version} failed ({proc.returncode}): "
                    f"{proc.stderr.strip()[-2000:]}")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"kombu-{version}/t/") and m.isfile()]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12
                tar.extractall(CACHE_DIR, members=members, filter="data")
            else:
                tar.extractall(CACHE_DIR, members=members)
        if not _is_test_root(target):
            raise SdistUnavailable(f"{archive} has no t/integration/common.py")
        return target


def add_to_path() -> Path:
    """Put the Kombu test root on ``sys.path`` (once) and return it."""
    root = kombu_test_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
