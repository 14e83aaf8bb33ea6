"""SQLite stores for small per-account data: vCards (XEP-0054), private XML (XEP-0049) and last
activity (XEP-0012). Each call is one statement, hence one transaction (autocommit).
Writes hold the storage's write lock: on the one shared connection, a statement issued while
another store's multi-statement transaction is open would otherwise become part of it.

The tables reference accounts(domain, localpart) with ON DELETE CASCADE (see sqlite.py), so
deleting an account removes its vCard, private XML and last activity; writing for an account
that no longer exists raises NoSuchAccount.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

import aiosqlite

from server.storage.base import NoSuchAccount

MIGRATION = [
    """CREATE TABLE vcards (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            vcard TEXT NOT NULL,
            avatar_hash TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (domain, localpart),
            FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
                ON DELETE CASCADE
        ) WITHOUT ROWID""",
    """CREATE TABLE private_xml (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            xml TEXT NOT NULL,
            PRIMARY KEY (domain, localpart, namespace, name),
            FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
                ON DELETE CASCADE
        ) WITHOUT ROWID""",
    """CREATE TABLE last_activity (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            logout INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (domain, localpart),
            FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
                ON DELETE CASCADE
        ) WITHOUT ROWID""",
]


class SQLiteVCardStore:
    """VCardStore."""

    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        self._db = db
        self._lock = lock

    async def get(self, user: str, domain: str) -> str | None:
        rows = await self._db.execute_fetchall(
            "SELECT vcard FROM vcards WHERE domain = ? AND localpart = ?", (domain, user))
        for row in rows:
            return str(row[0])
        return None

    async def set(self, user: str, domain: str, vcard: str, avatar_hash: str) -> None:
        try:
            async with self._lock:
                await self._db.execute(
                    "INSERT OR REPLACE INTO vcards (domain, localpart, vcard, avatar_hash) "
                    "VALUES (?, ?, ?, ?)", (domain, user, vcard, avatar_hash))
        except sqlite3.IntegrityError:
            raise NoSuchAccount(f"{user}@{domain}") from None

    async def avatar_hash(self, user: str, domain: str) -> str | None:
        rows = await self._db.execute_fetchall(
            "SELECT avatar_hash FROM vcards WHERE domain = ? AND localpart = ?", (domain, user))
        for row in rows:
            return str(row[0])
        return None


class SQLitePrivateStore:
    """PrivateStore."""

    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        self._db = db
        self._lock = lock

    async def get(self, user: str, domain: str, namespace: str, name: str) -> str | None:
        rows = await self._db.execute_fetchall(
            "SELECT xml FROM private_xml "
            "WHERE domain = ? AND localpart = ? AND namespace = ? AND name = ?",
            (domain, user, namespace, name))
        for row in rows:
            return str(row[0])
        return None

    async def set(self, user: str, domain: str, items: Sequence[tuple[str, str, str]]) -> None:
        """Store (namespace, name, xml) items, replacing earlier ones with the same key. One
        multi-row statement, so a set is stored whole or not at all."""
        if not items:
            return
        rows = ", ".join("(?, ?, ?, ?, ?)" for _ in items)
        params = [value for namespace, name, xml in items
                  for value in (domain, user, namespace, name, xml)]
        try:
            async with self._lock:
                await self._db.execute(
                    "INSERT OR REPLACE INTO private_xml "
                    f"(domain, localpart, namespace, name, xml) VALUES {rows}", params)
        except sqlite3.IntegrityError:
            raise NoSuchAccount(f"{user}@{domain}") from None


class SQLiteLastActivityStore:
    """LastActivityStore."""

    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        self._db = db
        self._lock = lock

    async def get(self, user: str, domain: str) -> tuple[int, str] | None:
        rows = await self._db.execute_fetchall(
            "SELECT logout, status FROM last_activity WHERE domain = ? AND localpart = ?",
            (domain, user))
        for row in rows:
            return int(row[0]), str(row[1])
        return None

    async def set(self, user: str, domain: str, logout: int, status: str) -> None:
        try:
            async with self._lock:
                await self._db.execute(
                    "INSERT OR REPLACE INTO last_activity (domain, localpart, logout, status) "
                    "VALUES (?, ?, ?, ?)", (domain, user, logout, status))
        except sqlite3.IntegrityError:
            raise NoSuchAccount(f"{user}@{domain}") from None
