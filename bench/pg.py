"""presenced on PostgreSQL, for the benchmark's side-by-side storage comparison: the same
PresencedPeer, its [storage] on a private cluster (bench/pgcluster.py) started with it.

Its server CPU includes the PostgreSQL processes': with SQLite the database's work is done in
presenced's own process, so only the sum compares.
"""

from __future__ import annotations

from typing import Any

from bench.peers import PresencedPeer, cpu_seconds
from bench.pgcluster import PostgresCluster


class PostgresPresencedPeer(PresencedPeer):
    kind = "presenced-pg"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.cluster: PostgresCluster | None = None
        self.base_extra = self.extra_config

    def _ensure_cluster(self) -> None:
        if self.cluster is None:
            self.cluster = PostgresCluster().start()
            dsn = self.cluster.dsn(self.cluster.create_database())
            self.extra_config = (f'{self.base_extra}\n[storage]\nbackend = "postgresql"\n'
                                 f'dsn = "{dsn}"\npool_size = 10\n')

    def write_accounts(self, domain: str, users: Any, password: str) -> int:
        self._ensure_cluster()
        return super().write_accounts(domain, users, password)

    def start(self, timeout: float = 30.0) -> None:
        self._ensure_cluster()
        super().start(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        try:
            super().stop(timeout)
        finally:
            if self.cluster is not None:
                self.cluster.stop()
                self.cluster = None

    def cpu_seconds(self) -> float:
        database = self.cluster.pids() if self.cluster is not None else []
        return super().cpu_seconds() + cpu_seconds(database)

    def version(self) -> str:
        return f"(this tree) on PostgreSQL {PostgresCluster().bin.parent.name}"
