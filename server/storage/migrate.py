"""Per-store schema migrations, the part both backends share.

The table ``schema_versions(store, version)`` holds, per store, how many of its migrations have
run. Each backend runs ``pending()``'s steps inside one transaction under its own lock (SQLite's
write lock, a PostgreSQL advisory lock), so two processes starting at once on an empty database
do not race: the second waits, then finds nothing left to do. Never edit a migration that has
shipped: append one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from server.storage.db import Database

if TYPE_CHECKING:
    from server.storage import Migration, StoreSpec

CREATE_TABLE = """CREATE TABLE IF NOT EXISTS schema_versions (
    store TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)"""


def check_specs(specs: Sequence[StoreSpec]) -> None:
    """Names are unique, and a store comes after the stores it requires."""
    from server.storage import StorageError

    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise StorageError(f"store {spec.name!r} is declared twice")
        missing = [r for r in spec.requires if r not in seen and r != spec.name]
        if missing:
            raise StorageError(f"store {spec.name!r} requires {', '.join(missing)}, which "
                               "must be opened before it")
        seen.add(spec.name)


def pending(specs: Sequence[StoreSpec], versions: Mapping[str, int], backend: str,
            where: str) -> list[tuple[StoreSpec, int, Sequence[Migration]]]:
    """(spec, new version, migrations to run) for every store behind; StorageError for a store
    written by a newer presenced (where: the database, for the message)."""
    from server.storage import StorageError

    steps = []
    for spec in specs:
        migrations = spec.migrations.get(backend)
        if migrations is None:
            raise StorageError(f"store {spec.name!r} has no {backend} implementation")
        have = versions.get(spec.name, 0)
        if have > len(migrations):
            raise StorageError(f"{where}: store {spec.name!r} has schema version {have}, newer "
                               f"than this presenced knows ({len(migrations)}): upgrade "
                               "presenced")
        if have < len(migrations):
            steps.append((spec, len(migrations), migrations[have:]))
    return steps


async def read_versions(db: Database) -> dict[str, int]:
    return {str(store): int(version) for store, version in
            await db.fetch("SELECT store, version FROM schema_versions")}


Applied = list[tuple[str, int, int]]  # (store, from version, to version)


async def apply(db: Database, steps: Sequence[tuple[StoreSpec, int, Sequence[Migration]]]
                ) -> Applied:
    """Run the steps on db (a transaction) and record the stores' new versions."""
    applied = []
    for spec, version, migrations in steps:
        applied.append((spec.name, version - len(migrations), version))
        for migration in migrations:
            if callable(migration):
                await migration(db)
            else:
                for statement in migration:
                    await db.execute(statement)
        await db.execute("INSERT INTO schema_versions (store, version) VALUES (?, ?) "
                         "ON CONFLICT (store) DO UPDATE SET version = excluded.version",
                         spec.name, version)
    return applied
