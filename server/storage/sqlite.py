"""SQLite backend: one aiosqlite connection in WAL mode, per-store versioned migrations.

WAL lets the CLI write accounts while the server reads and writes the same file; busy_timeout
makes either wait for the other's write instead of failing. With WAL, synchronous=NORMAL loses at
most the last transactions on power loss, never consistency (and nothing on a process kill).

Writes hold the write lock: on the one shared autocommit connection, a statement issued while
another store's multi-statement transaction is open would otherwise become part of it (and of
its rollback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from server.config import StorageConfig
from server.storage import StorageError
from server.storage import migrate as migrations
from server.storage.db import (
    Database,
    ForeignKeyViolation,
    Outage,
    Row,
    StorageUnavailable,
    UniqueViolation,
)

if TYPE_CHECKING:
    from server.storage import StoreSpec

log = logging.getLogger("presenced")

# The schema before per-store versions: one table schema_version with one global version, the
# number of these migrations applied. Its migration N became migration 1 of these stores.
LEGACY_VERSIONS: tuple[tuple[str, ...], ...] = (
    ("accounts",), ("rosters",), ("vcards", "private", "last_activity"), ("offline",),
    ("blocklists",))


# SQLite result codes of a database that cannot work now, whatever the statement: BUSY, LOCKED
# (another process past busy_timeout), READONLY (a read-only file or file system), IOERR,
# CORRUPT, FULL (the disk), CANTOPEN. Anything else (a syntax error, a missing table) is a bug.
_UNAVAILABLE = frozenset({5, 6, 8, 10, 11, 13, 14})


# Python's sqlite3 binds exact ints, floats, strings and bytearrays directly and anything else
# through its adapter lookup, which for a value without an adapter fails through two
# AttributeErrors (~0.6 us a value here). bytes registered as their own adapter bind the same
# (a BLOB) with one dict lookup and a call: the archive binds one for each message copy.
sqlite3.register_adapter(bytes, bytes)


def _unavailable(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _UNAVAILABLE


def _integrity(exc: sqlite3.IntegrityError) -> Exception:
    if "FOREIGN KEY" in str(exc):
        return ForeignKeyViolation(str(exc))
    if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
        return UniqueViolation(str(exc))
    return exc


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: Path, lock: asyncio.Lock | None = None,
                 *, in_transaction: bool = False, outage: Outage | None = None) -> None:
        self._db = db
        self.path = path
        self.write_lock = lock or asyncio.Lock()  # serialises writes and transactions
        self._in_transaction = in_transaction
        self.outage = outage or Outage(f"sqlite:{path}")

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            rows: list[Row] = list(await self._db.execute_fetchall(sql, args))
        except sqlite3.Error as exc:  # an IntegrityError too: INSERT ... RETURNING
            raise self._error(exc, write=False) from None
        if self.outage.down:
            self.outage.succeeded(write=False)
        return rows

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            if self._in_transaction:
                count = await self._execute(sql, args)
            else:
                async with self.write_lock:
                    count = await self._execute(sql, args)
        except sqlite3.Error as exc:
            raise self._error(exc, write=True) from None
        if self.outage.down and not self._in_transaction:
            self.outage.succeeded(write=True)
        return count

    def _error(self, exc: sqlite3.Error, *, write: bool) -> Exception:
        """What to raise for a statement's error: UniqueViolation / ForeignKeyViolation,
        StorageUnavailable (counted by the Outage), or the error itself (a bug)."""
        if isinstance(exc, sqlite3.IntegrityError):
            return _integrity(exc)
        if _unavailable(exc):
            return self.outage.failed(str(exc), write=write)
        return exc

    async def _execute(self, sql: str, args: Sequence[Any]) -> int:
        async with self._db.execute(sql, args) as cursor:
            return int(cursor.rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            if self._in_transaction:
                await self._db.executemany(sql, rows)
            else:
                async with self.write_lock:
                    await self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise self._error(exc, write=True) from None
        if self.outage.down and not self._in_transaction:
            self.outage.succeeded(write=True)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        if self._in_transaction:
            raise RuntimeError("transactions do not nest")
        async with self.write_lock:
            # IMMEDIATE: take the file's write lock now (waiting busy_timeout for another
            # process), not at the first write, where a deadlock could only fail.
            try:
                await self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._error(exc, write=True) from None
            try:
                yield SQLiteDatabase(self._db, self.path, self.write_lock, in_transaction=True,
                                     outage=self.outage)
            except BaseException:
                await self._rollback()
                raise
            try:
                await self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                raise self._error(exc, write=True) from None
        if self.outage.down:
            self.outage.succeeded(write=True)

    async def _rollback(self) -> None:
        # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR): then ROLLBACK
        # fails with "no transaction is active", which must not hide the first error.
        with contextlib.suppress(sqlite3.Error):
            await self._db.execute("ROLLBACK")

    async def columns(self, table: str) -> list[tuple[str, str]]:
        rows = await self._db.execute_fetchall(f'PRAGMA table_info("{table}")')
        return [(str(r[1]), str(r[2])) for r in rows]

    async def migrate(self, specs: Sequence[StoreSpec]) -> migrations.Applied:
        """Apply the migrations this file lacks, all in one transaction; refuse a newer schema.
        Upgrades in place a file written before per-store versions (table schema_version)."""
        try:
            if await self._table_exists("schema_versions") and not migrations.pending(
                    specs, await migrations.read_versions(self), self.dialect, str(self.path)):
                return []  # the usual case: no write lock
            async with self.transaction() as tx:
                await tx.execute(migrations.CREATE_TABLE)
                await self._upgrade_legacy(tx)
                steps = migrations.pending(specs, await migrations.read_versions(tx),
                                           self.dialect, str(self.path))
                applied = await migrations.apply(tx, steps)
        except (sqlite3.Error, ForeignKeyViolation, UniqueViolation, StorageUnavailable) as exc:
            raise StorageError(f"cannot use {self.path}: {exc}") from None
        return applied

    async def _table_exists(self, name: str) -> bool:
        return bool(await self.fetch(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", name))

    async def _upgrade_legacy(self, tx: Database) -> None:
        if not await self._table_exists("schema_version"):
            return
        rows = await tx.fetch("SELECT version FROM schema_version")
        version = int(rows[0][0]) if rows else 0
        if version > len(LEGACY_VERSIONS):
            raise StorageError(f"{self.path} has schema version {version}, newer than this "
                               f"presenced knows ({len(LEGACY_VERSIONS)}): upgrade presenced")
        for stores in LEGACY_VERSIONS[:version]:
            for store in stores:
                await tx.execute("INSERT INTO schema_versions (store, version) VALUES (?, 1)",
                                 store)
        await tx.execute("DROP TABLE schema_version")
        log.info("event=storage-upgraded path=%s from_version=%d", self.path, version)

    async def close(self) -> None:
        await self._db.close()


async def connect(config: StorageConfig) -> SQLiteDatabase:
    """Open the database file, creating it and its directory."""
    path = config.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite does (0644): it holds the SCRAM keys. SQLite gives its
        # -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from None
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {path}: {exc}") from None
    try:
        await db.execute("PRAGMA busy_timeout = 5000")
        await _use_wal(db)
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        await db.close()
        raise StorageError(f"cannot use {path}: {exc}") from None
    except BaseException:
        await db.close()
        raise
    return SQLiteDatabase(db, path)


async def _use_wal(db: aiosqlite.Connection) -> None:
    """Switching a new file to WAL takes an exclusive lock for which SQLite does not wait
    (busy_timeout does not apply): when two processes create the file at once, retry."""
    for attempt in range(50):
        try:
            (mode,) = next(iter(await db.execute_fetchall("PRAGMA journal_mode = WAL")))
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            await asyncio.sleep(0.1)
            continue
        if mode != "wal":  # e.g. a file system without shared memory: still correct, slower
            log.warning("event=sqlite-no-wal journal_mode=%s", mode)
        return
