"""SQLite backend: one aiosqlite connection in WAL mode, versioned schema migrations.

WAL lets the CLI write accounts while the server reads and writes the same file; busy_timeout
makes either wait for the other's write instead of failing. With WAL, synchronous=NORMAL loses at
most the last transactions on power loss, never consistency (and nothing on a process kill).

A later concern (rosters, offline messages, ...) appends a migration to MIGRATIONS and adds its
store class beside SQLiteAccountStore; its tables reference accounts(domain, localpart) with
ON DELETE CASCADE, which is how deleting an account removes everything it owns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiosqlite

from server.config import StorageConfig
from server.storage import Storage, StorageError, userdata
from server.storage import blocklist as blocklist_store
from server.storage import offline as offline_store
from server.storage import roster as roster_store
from server.storage.base import AccountExists, Credentials, NoSuchAccount, ScramKeys

# A migration is a sequence of SQL statements or a coroutine function doing the same; the
# schema version is the number of migrations applied. Never edit one that has shipped: append.
log = logging.getLogger("presenced")

Migration = Sequence[str] | Callable[[aiosqlite.Connection], Awaitable[None]]

MIGRATIONS: list[Migration] = [
    # 1: accounts, with the SCRAM keys of RFC 5802 §3 for SHA-1 and SHA-256, never a password.
    ["""CREATE TABLE accounts (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            sha1_salt BLOB NOT NULL,
            sha1_iterations INTEGER NOT NULL,
            sha1_stored_key BLOB NOT NULL,
            sha1_server_key BLOB NOT NULL,
            sha256_salt BLOB NOT NULL,
            sha256_iterations INTEGER NOT NULL,
            sha256_stored_key BLOB NOT NULL,
            sha256_server_key BLOB NOT NULL,
            created INTEGER NOT NULL DEFAULT (strftime('%s', 'now')),
            PRIMARY KEY (domain, localpart)
        ) WITHOUT ROWID"""],
    # 2: rosters (RFC 6121 §2) with subscription states and versions (XEP-0237).
    roster_store.MIGRATION,
    # 3: vCards (XEP-0054), private XML (XEP-0049), last activity (XEP-0012).
    userdata.MIGRATION,
    # 4: offline messages (XEP-0160).
    offline_store.MIGRATION,
    # 5: blocklists (XEP-0191).
    blocklist_store.MIGRATION,
]


class SQLiteAccountStore:
    """AccountStore. Each call is one statement on the primary key, in its own transaction."""

    _KEYS = ("sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, "
             "sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key")

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @staticmethod
    def _columns(c: Credentials) -> tuple[object, ...]:
        return (c.sha1.salt, c.sha1.iterations, c.sha1.stored_key, c.sha1.server_key,
                c.sha256.salt, c.sha256.iterations, c.sha256.stored_key, c.sha256.server_key)

    async def create(self, user: str, domain: str, credentials: Credentials) -> None:
        try:
            await self._db.execute(
                f"INSERT INTO accounts (domain, localpart, {self._KEYS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (domain, user, *self._columns(credentials)))
        except sqlite3.IntegrityError:
            raise AccountExists(f"{user}@{domain}") from None

    async def delete(self, user: str, domain: str) -> None:
        async with self._db.execute("DELETE FROM accounts WHERE domain = ? AND localpart = ?",
                                    (domain, user)) as cursor:
            if cursor.rowcount == 0:
                raise NoSuchAccount(f"{user}@{domain}")

    async def get_credentials(self, user: str, domain: str) -> Credentials | None:
        rows = await self._db.execute_fetchall(
            f"SELECT {self._KEYS} FROM accounts WHERE domain = ? AND localpart = ?",
            (domain, user))
        for row in rows:
            return Credentials(sha1=ScramKeys(*row[:4]), sha256=ScramKeys(*row[4:]))
        return None

    async def set_credentials(self, user: str, domain: str, credentials: Credentials) -> None:
        columns = ", ".join(f"{name} = ?" for name in self._KEYS.split(", "))
        async with self._db.execute(
                f"UPDATE accounts SET {columns} WHERE domain = ? AND localpart = ?",
                (*self._columns(credentials), domain, user)) as cursor:
            if cursor.rowcount == 0:
                raise NoSuchAccount(f"{user}@{domain}")

    async def exists(self, user: str, domain: str) -> bool:
        rows = await self._db.execute_fetchall(
            "SELECT 1 FROM accounts WHERE domain = ? AND localpart = ?", (domain, user))
        return bool(rows)

    async def list(self, domain: str) -> list[str]:
        rows = await self._db.execute_fetchall(
            "SELECT localpart FROM accounts WHERE domain = ? ORDER BY localpart", (domain,))
        return [row[0] for row in rows]


class SQLiteStorage(Storage):
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self.accounts = SQLiteAccountStore(db)
        self.write_lock = asyncio.Lock()  # serialises multi-statement transactions
        self.rosters = roster_store.SQLiteRosterStore(db, self.write_lock)
        self.vcards = userdata.SQLiteVCardStore(db, self.write_lock)
        self.private = userdata.SQLitePrivateStore(db, self.write_lock)
        self.last_activity = userdata.SQLiteLastActivityStore(db, self.write_lock)
        self.offline = offline_store.SQLiteOfflineStore(db, self.write_lock)
        self.blocklists = blocklist_store.SQLiteBlocklistStore(db, self.write_lock)

    async def close(self) -> None:
        await self._db.close()


async def connect(config: StorageConfig) -> SQLiteStorage:
    """Open the database file, creating it and its directory, and bring its schema up to date."""
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
        await _migrate(db, path)
    except sqlite3.Error as exc:
        await db.close()
        raise StorageError(f"cannot use {path}: {exc}") from None
    except BaseException:
        await db.close()
        raise
    return SQLiteStorage(db, path)


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


async def _version(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT version FROM schema_version"))
    return rows[0][0] if rows else 0


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Apply the migrations this file lacks, all in one transaction; refuse a newer schema."""
    tables = await db.execute_fetchall(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if tables and await _version(db) == len(MIGRATIONS):  # the usual case: no write lock
        return
    # IMMEDIATE: a second process opening the same file at once waits here, then sees our work.
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await _version(db)
        if version > len(MIGRATIONS):
            raise StorageError(f"{path} has schema version {version}, newer than this presenced "
                               f"knows ({len(MIGRATIONS)}): upgrade presenced")
        for migration in MIGRATIONS[version:]:
            if callable(migration):
                await migration(db)
            else:
                for statement in migration:
                    await db.execute(statement)
        await db.execute("DELETE FROM schema_version")
        await db.execute("INSERT INTO schema_version (version) VALUES (?)", (len(MIGRATIONS),))
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
