"""A private, throw-away PostgreSQL cluster (as /work/shared/INTEROP.md describes): initdb in
a temp dir, listening on a loopback port and a Unix socket in that dir. Used by the tests
(tests/pg.py) and by the benchmark's presenced-on-PostgreSQL column.

PostgreSQL refuses to run as root: as root, its programs run as the ``postgres`` user (or
``nobody``) in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.ports import free_port

SUPERUSER = "postgres"
PASSWORD = "pg-test-password"  # the superuser's: TCP connections must give one (scram-sha-256)


class ClusterError(Exception):
    pass


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian keeps them versioned)."""
    def version(path: str) -> int:
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else 0
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _runner() -> list[str]:
    """The command prefix that runs PostgreSQL's programs as a user it accepts (not root)."""
    if os.geteuid() != 0:
        return []
    for user in (SUPERUSER, "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"]
    raise ClusterError("running as root without a postgres or nobody user")



class PostgresCluster:
    """``start()``, then ``create_database()`` and ``dsn(...)``; ``stop()`` removes it all.

    fsync is off: the tests and the benchmark kill presenced, never PostgreSQL, and a benchmark
    of presenced should not measure this machine's disk flushes."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        binaries = bin_dir()
        if binaries is None or not (binaries / "pg_ctl").exists():
            raise ClusterError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = binaries
        self.host = host
        self.port = port or free_port(host)
        self.dir: Path | None = None
        self._prefix = _runner()
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._prefix, *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise ClusterError(f"{Path(args[0]).name} failed: {result.stdout}{result.stderr}")

    def start(self) -> PostgresCluster:
        self.dir = base = Path(tempfile.mkdtemp(prefix="presenced-pg-"))
        (base / "pw").write_text(PASSWORD + "\n")
        if self._prefix:
            entry = pwd.getpwnam(self._prefix[2])
            for path in (base, base / "pw"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        data = base / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "--auth-local=trust",
                  "--auth-host=scram-sha-256", f"--pwfile={base / 'pw'}", "-U", SUPERUSER,
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again, after pause()) on the same data, port and options."""
        assert self.dir is not None
        base = self.dir
        options = (f"-p {self.port} -k {base} -c listen_addresses={self.host} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log"),
                  "-w", "-t", "60", "-o", options, "start")

    def pause(self) -> None:
        """Stop the server, keeping its data (a restart under a running client: resume())."""
        assert self.dir is not None
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w",
                  "stop")

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m",
                      "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def dsn(self, database: str = "postgres", user: str = SUPERUSER,
            password: str | None = None) -> str:
        """The superuser's DSN carries its password; another role's only the one given."""
        password = PASSWORD if user == SUPERUSER and password is None else password
        secret = f":{password}" if password else ""
        return f"postgresql://{user}{secret}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(database), "-c", sql],
            capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise ClusterError(f"psql {sql!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, owner: str = SUPERUSER) -> str:
        """A new empty database; its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.psql(f'CREATE DATABASE "{name}" OWNER "{owner}"')
        return name

    def pids(self) -> list[int]:
        """The postmaster and its children (for CPU accounting)."""
        if self.dir is None:
            return []
        try:
            postmaster = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        children = []
        with contextlib.suppress(OSError):
            children = [int(p) for p in
                        Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()]
        return [postmaster, *children]
