"""What every SQLite store of per-account data shares: the one connection, the storage's write
lock, "the first row or None", and a write that names a vanished account.

Writes hold the write lock: on the one shared connection, a statement issued while another
store's multi-statement transaction is open would otherwise become part of it (and of its
rollback). Tables reference accounts(domain, localpart), so a write for an account that no
longer exists fails its foreign key: NoSuchAccount.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite

from server.storage.base import NoSuchAccount


class SQLiteStore:
    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        self._db = db
        self._lock = lock

    async def _first(self, sql: str, args: Sequence[Any]) -> sqlite3.Row | None:
        rows = await self._db.execute_fetchall(sql, args)
        for row in rows:
            return row
        return None

    async def _write(self, user: str, domain: str, sql: str, args: Sequence[Any]) -> None:
        try:
            async with self._lock:
                await self._db.execute(sql, args)
        except sqlite3.IntegrityError:
            raise NoSuchAccount(f"{user}@{domain}") from None
