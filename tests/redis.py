"""A private redis-server per test module (the cluster's directory and inboxes, server/cluster).

``redis_server`` (module scope) starts Debian's ``redis-server`` on a free loopback port with no
persistence, in a temp dir, and stops it at the end of the module; ``redis_url`` is its
``redis://`` URL with a database of its own per test (flushed first). ``restart(down)`` makes it
unreachable for a while and brings it back empty on the same port. Without the binary the
tests that use them skip on a developer machine and fail under CI (env CI set), as tests/pg.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import on_ci
from tests.process import free_port

HOST = "127.0.0.1"


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: redis-server)")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="presenced-redis-"))
        self.port = free_port(HOST)
        self.process: subprocess.Popen[bytes] | None = None
        self._next_db = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--bind", HOST, "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--databases", "64",
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited: {log}")
            try:
                with socket.create_connection((HOST, self.port), 0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def url(self) -> str:
        """A database of its own (flushed), so that tests of one module do not meet."""
        db = self._next_db % 64
        self._next_db += 1
        with socket.create_connection((HOST, self.port), 2) as sock:
            sock.sendall(f"SELECT {db}\r\nFLUSHDB\r\n".encode())
            sock.recv(64)
        return f"redis://{HOST}:{self.port}/{db}"

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
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    try:
        server = RedisServer()
    except FileNotFoundError as exc:
        if on_ci():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url()


__all__ = ["RedisServer", "redis_server", "redis_url"]
