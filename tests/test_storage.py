"""Storage: one behavioural suite every backend must pass, then SQLite's own concerns
(migrations, WAL and a second process writing while the server holds the file)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.config import StorageConfig, default_config
from server.storage import BACKENDS, Storage, StorageError, open_storage
from server.storage import sqlite as sqlite_backend
from server.storage.base import AccountExists, Credentials, NoSuchAccount, ScramKeys


def credentials(seed: int) -> Credentials:
    """Distinct bytes in every field, so that a swapped column cannot go unnoticed."""
    def keys(kind: int, size: int) -> ScramKeys:
        return ScramKeys(salt=bytes([seed, kind, 1]) * 6, iterations=4096 + seed * 10 + kind,
                         stored_key=bytes([seed, kind, 2]) * size,
                         server_key=bytes([seed, kind, 3]) * size)
    return Credentials(sha1=keys(1, 7), sha256=keys(2, 11))


def storage_config(tmp_path: Path, backend: str) -> StorageConfig:
    return dataclasses.replace(default_config().storage, backend=backend,
                               path=tmp_path / "data" / "presenced.sqlite")


@pytest.fixture(params=sorted(BACKENDS))
def config(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    return storage_config(tmp_path, request.param)


@pytest.fixture
async def storage(config: StorageConfig) -> AsyncIterator[Storage]:
    opened = await open_storage(config)
    try:
        yield opened
    finally:
        await opened.close()


# -- every backend ------------------------------------------------------------------------------


async def test_create_and_read(storage: Storage) -> None:
    accounts = storage.accounts
    assert await accounts.get_credentials("alice", "a.test") is None
    assert not await accounts.exists("alice", "a.test")
    await accounts.create("alice", "a.test", credentials(1))
    assert await accounts.get_credentials("alice", "a.test") == credentials(1)
    assert await accounts.exists("alice", "a.test")
    assert await accounts.list("a.test") == ["alice"]


async def test_accounts_are_per_domain(storage: Storage) -> None:
    accounts = storage.accounts
    await accounts.create("bob", "a.test", credentials(1))
    await accounts.create("bob", "b.test", credentials(2))
    await accounts.create("alice", "a.test", credentials(3))
    assert await accounts.list("a.test") == ["alice", "bob"]
    assert await accounts.list("b.test") == ["bob"]
    assert await accounts.list("c.test") == []
    assert await accounts.get_credentials("bob", "b.test") == credentials(2)
    assert not await accounts.exists("alice", "b.test")
    assert not await accounts.exists("a.test", "alice")


async def test_duplicate_is_refused_and_changes_nothing(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    with pytest.raises(AccountExists):
        await storage.accounts.create("alice", "a.test", credentials(2))
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(1)


async def test_set_credentials(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.accounts.create("alice", "b.test", credentials(1))
    await storage.accounts.set_credentials("alice", "a.test", credentials(2))
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(2)
    assert await storage.accounts.get_credentials("alice", "b.test") == credentials(1)
    with pytest.raises(NoSuchAccount):
        await storage.accounts.set_credentials("nobody", "a.test", credentials(2))
    assert not await storage.accounts.exists("nobody", "a.test")


async def test_delete(storage: Storage) -> None:
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.accounts.create("bob", "a.test", credentials(2))
    await storage.accounts.delete("alice", "a.test")
    assert await storage.accounts.get_credentials("alice", "a.test") is None
    assert await storage.accounts.list("a.test") == ["bob"]
    with pytest.raises(NoSuchAccount):
        await storage.accounts.delete("alice", "a.test")
    await storage.accounts.create("alice", "a.test", credentials(3))  # the name is free again
    assert await storage.accounts.get_credentials("alice", "a.test") == credentials(3)


async def test_non_ascii_names(storage: Storage) -> None:
    await storage.accounts.create("jürgen", "bücher.test", credentials(1))
    assert await storage.accounts.list("bücher.test") == ["jürgen"]
    assert await storage.accounts.get_credentials("jürgen", "bücher.test") == credentials(1)


async def test_survives_reopening(config: StorageConfig) -> None:
    first = await open_storage(config)
    await first.accounts.create("alice", "a.test", credentials(1))
    await first.close()
    second = await open_storage(config)
    try:
        assert await second.accounts.get_credentials("alice", "a.test") == credentials(1)
    finally:
        await second.close()


async def test_second_connection_sees_writes_at_once(config: StorageConfig) -> None:
    """The CLI changes accounts while the server holds the database open."""
    server = await open_storage(config)
    cli = await open_storage(config)
    try:
        assert await server.accounts.get_credentials("alice", "a.test") is None
        await cli.accounts.create("alice", "a.test", credentials(1))
        assert await server.accounts.get_credentials("alice", "a.test") == credentials(1)
        await cli.accounts.set_credentials("alice", "a.test", credentials(2))
        assert await server.accounts.get_credentials("alice", "a.test") == credentials(2)
        await server.accounts.delete("alice", "a.test")
        assert not await cli.accounts.exists("alice", "a.test")
        # Writers on both connections at once: every write lands.
        await asyncio.gather(*(
            (server if n % 2 else cli).accounts.create(f"user{n:02}", "a.test", credentials(n))
            for n in range(20)))
        assert await server.accounts.list("a.test") == [f"user{n:02}" for n in range(20)]
        assert await cli.accounts.get_credentials("user13", "a.test") == credentials(13)
    finally:
        await cli.close()
        await server.close()


async def test_open_creates_the_directory(tmp_path: Path, config: StorageConfig) -> None:
    assert not config.path.parent.exists()
    storage = await open_storage(config)
    await storage.close()
    assert config.path.parent.is_dir()


async def test_open_with_a_whole_config(tmp_path: Path) -> None:
    config = dataclasses.replace(default_config(), storage=storage_config(tmp_path, "sqlite"))
    storage = await open_storage(config)
    try:
        await storage.accounts.create("alice", "a.test", credentials(1))
    finally:
        await storage.close()
    assert (tmp_path / "data" / "presenced.sqlite").exists()


async def test_unusable_location_is_a_storage_error(tmp_path: Path,
                                                    config: StorageConfig) -> None:
    (tmp_path / "file").write_text("")
    blocked = dataclasses.replace(config, path=tmp_path / "file" / "sub" / "db.sqlite")
    with pytest.raises(StorageError, match="cannot create"):
        await open_storage(blocked)


# -- SQLite: files, pragmas, migrations ---------------------------------------------------------


def sqlite_config(tmp_path: Path) -> StorageConfig:
    return storage_config(tmp_path, "sqlite")


def schema_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT version FROM schema_version").fetchone()[0])


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


async def test_sqlite_file_settings(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    storage = await open_storage(config)
    try:
        assert isinstance(storage, sqlite_backend.SQLiteStorage)

        async def pragma(name: str) -> object:
            (row,) = await storage._db.execute_fetchall(f"PRAGMA {name}")
            return row[0]

        assert await pragma("journal_mode") == "wal"
        assert await pragma("foreign_keys") == 1
        assert await pragma("busy_timeout") == 5000
        assert await pragma("synchronous") == 1  # NORMAL
    finally:
        await storage.close()
    # It holds the SCRAM keys: only its owner reads it.
    assert config.path.stat().st_mode & 0o777 == 0o600
    assert config.path.parent.stat().st_mode & 0o777 == 0o700


async def test_migrates_an_empty_database(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    config.path.parent.mkdir()
    config.path.write_bytes(b"")  # an empty file is an empty SQLite database
    storage = await open_storage(config)
    await storage.close()
    assert schema_version(config.path) == len(sqlite_backend.MIGRATIONS)
    assert {"schema_version", "accounts"} <= tables(config.path)


async def test_applies_only_missing_migrations(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = sqlite_config(tmp_path)
    storage = await open_storage(config)
    await storage.accounts.create("alice", "a.test", credentials(1))
    await storage.close()
    current = len(sqlite_backend.MIGRATIONS)

    applied: list[str] = []

    async def by_function(db: object) -> None:
        applied.append("function")

    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", [
        *sqlite_backend.MIGRATIONS,
        ["CREATE TABLE later (domain TEXT, localpart TEXT, FOREIGN KEY (domain, localpart) "
         "REFERENCES accounts (domain, localpart) ON DELETE CASCADE)",
         "INSERT INTO later SELECT domain, localpart FROM accounts"],
        by_function,
    ])
    storage = await open_storage(config)
    await storage.close()
    assert schema_version(config.path) == current + 2
    assert applied == ["function"]
    with sqlite3.connect(config.path) as db:
        assert db.execute("SELECT * FROM later").fetchall() == [("a.test", "alice")]
    # Up to date: nothing runs again.
    storage = await open_storage(config)
    try:
        assert applied == ["function"]
        # Foreign keys are on: deleting the account removes what it owns.
        await storage.accounts.delete("alice", "a.test")
    finally:
        await storage.close()
    with sqlite3.connect(config.path) as db:
        assert db.execute("SELECT count(*) FROM later").fetchone()[0] == 0


async def test_a_failing_migration_changes_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = sqlite_config(tmp_path)
    storage = await open_storage(config)
    await storage.close()
    current = len(sqlite_backend.MIGRATIONS)
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", [
        *sqlite_backend.MIGRATIONS,
        ["CREATE TABLE half (x)", "INSERT INTO no_such_table VALUES (1)"],
    ])
    with pytest.raises(StorageError, match="no_such_table"):
        await open_storage(config)
    assert schema_version(config.path) == current
    assert "half" not in tables(config.path)


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    storage = await open_storage(config)
    await storage.close()
    newer = len(sqlite_backend.MIGRATIONS) + 1
    with sqlite3.connect(config.path) as db:
        db.execute("UPDATE schema_version SET version = ?", (newer,))
    with pytest.raises(StorageError, match=f"schema version {newer}, newer than this presenced"):
        await open_storage(config)
    assert schema_version(config.path) == newer


async def test_not_a_database(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    config.path.parent.mkdir()
    config.path.write_bytes(b"this is not an SQLite file, it is plain text" * 100)
    with pytest.raises(StorageError, match="cannot use"):
        await open_storage(config)


async def test_waits_for_another_process_writing(tmp_path: Path) -> None:
    """busy_timeout: a write while another connection holds the write lock waits, not fails."""
    config = sqlite_config(tmp_path)
    storage = await open_storage(config)
    other = sqlite3.connect(config.path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO accounts SELECT 'a.test', 'held', x'00', 1, x'00', x'00', "
                      "x'00', 1, x'00', x'00', 0")
        release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
        release.start()
        started = asyncio.get_running_loop().time()
        await storage.accounts.create("alice", "a.test", credentials(1))
        assert asyncio.get_running_loop().time() - started >= 0.25
        release.join()
        assert await storage.accounts.list("a.test") == ["alice", "held"]
    finally:
        other.close()
        await storage.close()


async def test_two_processes_opening_a_new_file_at_once(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path)
    first, second = await asyncio.gather(open_storage(config), open_storage(config))
    try:
        await first.accounts.create("alice", "a.test", credentials(1))
        assert await second.accounts.exists("alice", "a.test")
    finally:
        await first.close()
        await second.close()
    assert schema_version(config.path) == len(sqlite_backend.MIGRATIONS)

