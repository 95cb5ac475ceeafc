"""Network namespaces as separate "hosts", joined to this namespace by veth pairs.

Each host gets its own namespace and a veth pair: the root side carries
``10.213.<n>.1/24`` (a server here listens on it), the namespace side ``10.213.<n>.2/24``.
Names include this process's pid and subnets are picked under a file lock among those
not in use, so parallel runs do not collide.  Everything is removed on :meth:`close`
(and by the next run, for a run that died before it could clean up).

Needs root and ``ip`` (iproute2).  :func:`unavailable` says why a machine cannot do it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

#: Subnets are 10.213.<n>.0/24, inside NETWORK.
NETWORK = ipaddress.ip_network("10.213.0.0/16")
_PREFIX = "10.213"
#: Our namespaces are "kpg-<pid>-<host>" and root-side veths "kp<pid>r<n>": the pid lets
#: a later run recognise (and remove) what a dead run left behind.
NS_PREFIX = "kpg-"
_NS_RE = re.compile(r"^kpg-(\d+)-")
_VETH_RE = re.compile(r"^kp(\d+)r\d+$")


def _lock_path() -> Path:
    run_lock = Path("/run/lock")
    return (run_lock if run_lock.is_dir() else Path(tempfile.gettempdir())) / "kombu-pg-netns.lock"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip <args>``; on failure raise with ip's own message (it says what is wrong)."""
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why this machine cannot run namespace tests (None when it can): tried, not guessed."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Host:
    """One namespace: ``ip`` is its own address, ``gateway_ip`` the root side's."""

    name: str
    netns: str
    root_veth: str
    ns_veth: str
    gateway_ip: str
    ip: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` to run inside the namespace (ip execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.netns, *argv]


class Namespaces:
    """``len(names)`` hosts; use as a context manager (or call :meth:`close`)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.hosts: dict[str, Host] = {}
        try:
            with open(_lock_path(), "a") as lock:
                # Choosing free subnets and taking them must be one step for parallel runs.
                fcntl.flock(lock, fcntl.LOCK_EX)
                _remove_leftovers()
                free = self._free_subnets()
                for index, name in enumerate(names):
                    self._create(name, index, next(free))
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    @staticmethod
    def _free_subnets() -> Iterator[int]:
        used = set()
        for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
            match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", line)
            if match and ipaddress.ip_address(match.group(1)) in NETWORK:
                used.add(int(match.group(1).split(".")[2]))
        return (n for n in range(1, 255) if n not in used)

    def _create(self, name: str, index: int, subnet: int) -> Host:
        pid = os.getpid()
        base = f"{_PREFIX}.{subnet}"
        host = Host(name=name, netns=f"{NS_PREFIX}{pid}-{name}", root_veth=f"kp{pid}r{index}",
                    ns_veth=f"kp{pid}n{index}", gateway_ip=f"{base}.1", ip=f"{base}.2")
        # Registered first, so close() removes whatever part of it exists if a step fails.
        self.hosts[name] = host
        ip("netns", "add", host.netns)
        ip("link", "add", host.root_veth, "type", "veth", "peer", "name", host.ns_veth, "netns", host.netns)
        ip("addr", "add", f"{host.gateway_ip}/24", "dev", host.root_veth)
        ip("link", "set", host.root_veth, "up")
        ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.ns_veth)
        ip("-n", host.netns, "link", "set", host.ns_veth, "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """Cut ``host`` off the network without a word to its peers: no FIN, no RST.

        The namespace side of the veth goes down.  Its processes keep their sockets and
        can send nothing; packets to it are dropped on the root side's veth (no carrier),
        whose route stays in place (marked linkdown).  Taking the *root* side down instead
        would remove that route, and packets for the host would leak out of the default
        route into the real network.
        """
        ip("-n", host.netns, "link", "set", host.ns_veth, "down")

    def pids(self, host: Host) -> list[int]:
        done = ip("netns", "pids", host.netns, check=False)
        return [int(p) for p in done.stdout.split()]

    def close(self) -> None:
        """Kill what still runs in our namespaces, then delete veths and namespaces."""
        for host in self.hosts.values():
            _kill_all(self.pids(host))
            ip("link", "del", host.root_veth, check=False)  # (takes its peer with it)
            ip("netns", "del", host.netns, check=False)
        self.hosts.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_all(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL these pids (processes a test started in a namespace) and wait until gone:
    a namespace lives on, unnamed, while a process is still in it."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    # Not a synchronisation sleep: there is no event for "a non-child process is gone".
    while any(_pid_alive(p) and not _is_zombie(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _remove_leftovers() -> None:
    """Delete namespaces and veths of runs whose process is gone (killed before cleanup)."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(r"\d+: ([^:@]+)", line)
        veth = _VETH_RE.match(match.group(1)) if match else None
        if veth and not _pid_alive(int(veth.group(1))):
            ip("link", "del", match.group(1), check=False)
