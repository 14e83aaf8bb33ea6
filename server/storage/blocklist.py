"""SQLite BlocklistStore: the JIDs each account blocks (XEP-0191).

Each call is one SQL statement (several JIDs are passed as one JSON array and expanded with
json_each), hence one transaction of its own on the shared autocommit connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from server.storage.store import SQLiteStore

# Appended to sqlite.MIGRATIONS.
MIGRATION = [
    """CREATE TABLE blocklist (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        jid TEXT NOT NULL,
        PRIMARY KEY (domain, localpart, jid),
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    ) WITHOUT ROWID""",
]


class SQLiteBlocklistStore(SQLiteStore):
    """BlocklistStore. Writes hold the storage's write lock (see store.py)."""

    async def get(self, user: str, domain: str) -> list[str]:
        rows = await self._db.execute_fetchall(
            "SELECT jid FROM blocklist WHERE domain = ? AND localpart = ? ORDER BY jid",
            (domain, user))
        return [row[0] for row in rows]

    async def add(self, user: str, domain: str, jids: Iterable[str]) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT OR IGNORE INTO blocklist (domain, localpart, jid) "
                "SELECT ?, ?, value FROM json_each(?)", (domain, user, json.dumps(list(jids))))

    async def remove(self, user: str, domain: str, jids: Iterable[str]) -> None:
        async with self._lock:
            await self._db.execute(
                "DELETE FROM blocklist WHERE domain = ? AND localpart = ? "
                "AND jid IN (SELECT value FROM json_each(?))",
                (domain, user, json.dumps(list(jids))))

    async def clear(self, user: str, domain: str) -> None:
        async with self._lock:
            await self._db.execute(
                "DELETE FROM blocklist WHERE domain = ? AND localpart = ?", (domain, user))
