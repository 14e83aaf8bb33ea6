"""A private redis-server per test module (the cluster's directory and inboxes, server/cluster).

``redis_server`` (module scope) starts Debian's ``redis-server`` on a free loopback port with no
persistence, in a temp dir, and stops it at the end of the module; ``redis_url`` is its
``redis://`` URL with a database of its own per test (flushed first). ``restart(down)`` makes it
unreachable for a while and brings it back empty on the same port. Without the binary the
tests that use them skip on a developer machine and fail under CI (env CI set), as tests/pg.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.redisserver import RedisServer
from tests.conftest import on_ci


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
