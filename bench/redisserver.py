"""A private, throw-away redis-server (Debian's) on a loopback port with no persistence, for the
cluster benchmark (bench/cluster.py) and the cluster tests (tests/redis.py), as bench/pgcluster.py
is for PostgreSQL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.ports import free_port


class RedisServer:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: redis-server)")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.dir = Path(tempfile.mkdtemp(prefix="presenced-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._next_db = 0

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [self.binary, "--bind", self.host, "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--databases", "64",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited: {log}")
            try:
                with socket.create_connection((self.host, self.port), 0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def url(self, db: int | None = None) -> str:
        """redis:// for database db; without one, the next database of its own, flushed (so
        that tests of one module do not meet)."""
        if db is None:
            db = self._next_db % 64
            self._next_db += 1
            with socket.create_connection((self.host, self.port), 2) as sock:
                sock.sendall(f"SELECT {db}\r\nFLUSHDB\r\n".encode())
                sock.recv(64)
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def halt(self) -> None:
        """Stop the process (its data is lost: no persistence); start() brings it back on the
        same port."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, down: float) -> None:
        """Redis unreachable for `down` seconds, then back, empty, on the same port (as a
        restart without persistence)."""
        self.halt()
        time.sleep(down)
        self.start()

    def stop(self) -> None:
        self.halt()
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)
