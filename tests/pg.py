"""The PostgreSQL fixtures: one private cluster for the test run (bench/pgcluster.py: initdb in
a temp dir, a free loopback port), stopped at the end of the session.

``pg_cluster`` (session) and ``pg_dsn`` (a fresh, empty database per test), registered for
every test file by ``pytest_plugins`` in tests/conftest.py. Without PostgreSQL's binaries the
tests that use them skip on a developer machine and fail under CI (env CI set).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.pgcluster import ClusterError, PostgresCluster
from tests.conftest import on_ci

Cluster = PostgresCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    try:
        cluster = PostgresCluster()
    except ClusterError as exc:
        if on_ci():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: PostgresCluster) -> str:
    """The DSN of a fresh, empty database (owned by the superuser, who connects)."""
    return pg_cluster.dsn(pg_cluster.create_database())


__all__ = ["Cluster", "pg_cluster", "pg_dsn"]
