"""A private PostgreSQL server listening on given (veth) addresses, for test_scale_out.

pgserver's own server API listens on a Unix socket only (it passes ``-h ""``), so this
uses pgserver's binaries and its ``initdb``/``pg_ctl`` wrappers directly: TCP on exactly
the addresses given (never ``*``) plus a Unix socket for the test process itself, and
trust authentication only for the given client addresses.  With ``standby_of`` the server
is a streaming standby of another one (``pg_basebackup -R`` over its Unix socket), for the
failover tests.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psycopg

from .worker import wait_until


class VethPostgres:
    """initdb + postgres in a temporary directory; :meth:`stop` removes it all."""

    def __init__(self, listen: Sequence[str], clients: Sequence[str], *,
                 standby_of: "VethPostgres | None" = None) -> None:
        import pgserver
        from pgserver.utils import find_suitable_port

        self.dir = Path(tempfile.mkdtemp(prefix="kombu_pg_scale_out_"))
        self.pgdata = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.user: str | None = None
        try:
            # postgres refuses to run as root: do what pgserver does as root, run as "pgserver".
            self.user = self._system_user()
            if standby_of is None:
                pgserver.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"],
                                pgdata=self.pgdata, user=self.user, timeout=120)
            else:
                # -R writes primary_conninfo and standby.signal; the copied postgresql.conf
                # keeps the primary's port and socket until the settings below override them.
                pgserver.pg_basebackup(["-R", "-X", "stream", "-c", "fast", "-U", "postgres",
                                        "-h", str(standby_of.dir), "-p", str(standby_of.port)],
                                       pgdata=self.pgdata, user=self.user, timeout=120)
            # A port free on the first address now; postgres binds all of them below and
            # fails loudly if another process took it in between.
            self.port = find_suitable_port(listen[0])
            settings = {
                "listen_addresses": ",".join(listen),
                "port": str(self.port),
                "unix_socket_directories": str(self.dir),
                # Throwaway data: no need to wait for the disk.
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                # Epoch time and pid on every line: the test reads when and how each of a host's
                # sessions ended.
                "log_line_prefix": "%n [%p] ",
                "log_connections": "on",
                "log_disconnections": "on",
            }
            with open(self.pgdata / "postgresql.conf", "a") as conf:
                conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())
            # "replication": a standby's pg_basebackup and walreceiver come over the socket.
            hba = ["local all all trust", "local replication all trust"]
            hba += [f"host all all {addr}/32 trust" for addr in clients]
            (self.pgdata / "pg_hba.conf").write_text("\n".join(hba) + "\n")
            if self.user:
                shutil.chown(self.pgdata / "pg_hba.conf", self.user, self.user)
            pgserver.pg_ctl(["-w", "-t", "60", "-l", str(self.log_path), "start"],
                            pgdata=self.pgdata, user=self.user, timeout=90)
        except BaseException:
            self.stop()
            raise

    def _system_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        from pgserver._commands import POSTGRES_BIN_PATH
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists("pgserver")
        ensure_prefix_permissions(self.dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam("pgserver")
        os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        return "pgserver"

    def url(self, address: str, database: str = "postgres") -> str:
        """A URL for clients reaching the server over the network at ``address``."""
        return f"postgresql://postgres@{address}:{self.port}/{database}"

    @property
    def postmaster_pid(self) -> int:
        """The postmaster's pid (first line of postmaster.pid)."""
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])

    def promote(self) -> None:
        """``pg_ctl promote -w``: returns once the standby accepts writes."""
        import pgserver

        pgserver.pg_ctl(["-w", "-t", "60", "promote"], pgdata=self.pgdata, user=self.user, timeout=90)

    @property
    def local_url(self) -> str:
        """A URL for this process, over the Unix socket."""
        return f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def log_lines(self, pid: int) -> list[str]:
        """Server log lines written by backend ``pid``."""
        if not self.log_path.exists():
            return []
        marker = re.compile(rf"\[{pid}\] ")
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if marker.search(line)]

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():  # (also after a start that failed half-way)
            import pgserver

            try:
                pgserver.pg_ctl(["-w", "-t", "30", "-m", "fast", "stop"], pgdata=self.pgdata,
                                user=self.user, timeout=60)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                try:
                    pgserver.pg_ctl(["-w", "-t", "30", "-m", "immediate", "stop"], pgdata=self.pgdata,
                                    user=self.user, timeout=60)
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                    pass  # not running after all (a start that failed): nothing to stop
        shutil.rmtree(self.dir, ignore_errors=True)


class PrimaryAndStandby:
    """A primary and a streaming standby of it, replication synchronous or not; both
    listen on 127.0.0.1 (``url`` names both, for failover) and their own Unix sockets."""

    def __init__(self, synchronous: bool) -> None:
        self.synchronous = synchronous
        self.primary = VethPostgres(["127.0.0.1"], ["127.0.0.1"])
        try:
            self.standby = VethPostgres(["127.0.0.1"], ["127.0.0.1"], standby_of=self.primary)
        except BaseException:
            self.primary.stop()
            raise
        # Set after the base backup, on the primary only: a promoted standby that inherited
        # synchronous_standby_names would wait forever for a standby of its own on every commit.
        with self.admin(self.primary) as conn:
            # synchronous_commit is off in VethPostgres (throwaway data): on here, so a commit
            # returns only once the standby has flushed it (when synchronous).
            conn.execute("ALTER SYSTEM SET synchronous_commit = on")
            if synchronous:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        state = "sync" if synchronous else "async"
        wait_until(lambda: self._sync_state() == state, timeout=60, what=f"a {state} standby")

    @staticmethod
    def admin(server) -> psycopg.Connection:
        return psycopg.connect(server.local_url, autocommit=True, application_name="failover_admin")

    def _sync_state(self) -> str | None:
        with self.admin(self.primary) as conn:
            row = conn.execute("SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'").fetchone()
            return row[0] if row else None

    @property
    def url(self) -> str:
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}/postgres"
                "?target_session_attrs=read-write")

    def replayed(self) -> bool:
        """Whether the standby has replayed everything the primary has written so far."""
        with self.admin(self.primary) as conn:
            lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        with self.admin(self.standby) as conn:
            return conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]

    def stop(self) -> None:
        self.primary.stop()
        self.standby.stop()
