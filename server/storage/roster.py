"""SQLite RosterStore: one row per (account, contact), a version per account (XEP-0237)."""

from __future__ import annotations

import json

from server.storage.base import RosterItem
from server.storage.store import SQLiteStore

MIGRATION = [
    """CREATE TABLE roster_items (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        contact TEXT NOT NULL,
        name TEXT,
        groups TEXT NOT NULL DEFAULT '[]',
        subscription TEXT NOT NULL DEFAULT 'none',
        pending_out INTEGER NOT NULL DEFAULT 0,
        pending_in INTEGER NOT NULL DEFAULT 0,
        approved INTEGER NOT NULL DEFAULT 0,
        listed INTEGER NOT NULL DEFAULT 1,
        request TEXT,
        PRIMARY KEY (domain, localpart, contact),
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    ) WITHOUT ROWID""",
    """CREATE TABLE roster_versions (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (domain, localpart),
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    ) WITHOUT ROWID""",
]

_COLUMNS = "contact, name, groups, subscription, pending_out, pending_in, approved, listed, request"


class SQLiteRosterStore(SQLiteStore):
    """RosterStore. Changes are multi-statement transactions under the write lock."""

    async def load(self, user: str, domain: str) -> tuple[int, list[RosterItem]]:
        rows = await self._db.execute_fetchall(
            f"SELECT {_COLUMNS} FROM roster_items WHERE domain = ? AND localpart = ?",
            (domain, user))
        version = await self._db.execute_fetchall(
            "SELECT version FROM roster_versions WHERE domain = ? AND localpart = ?",
            (domain, user))
        items = [RosterItem(contact=r[0], name=r[1], groups=tuple(json.loads(r[2])),
                            subscription=r[3], pending_out=bool(r[4]), pending_in=bool(r[5]),
                            approved=bool(r[6]), listed=bool(r[7]), request=r[8]) for r in rows]
        versions = list(version)
        return (versions[0][0] if versions else 0), items

    async def put(self, user: str, domain: str, item: RosterItem) -> int:
        return await self._change_and_bump(
            user, domain,
            f"INSERT OR REPLACE INTO roster_items (domain, localpart, {_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (domain, user, item.contact, item.name, json.dumps(list(item.groups)),
             item.subscription, item.pending_out, item.pending_in, item.approved, item.listed,
             item.request))

    async def delete(self, user: str, domain: str, contact: str) -> int:
        return await self._change_and_bump(
            user, domain,
            "DELETE FROM roster_items WHERE domain = ? AND localpart = ? AND contact = ?",
            (domain, user, contact))

    async def _change_and_bump(self, user: str, domain: str, sql: str,
                               args: tuple[object, ...]) -> int:
        """One change and the new roster version, in one transaction."""
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                await self._db.execute(sql, args)
                version = await self._bump(user, domain)
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")
        return version

    async def _bump(self, user: str, domain: str) -> int:
        await self._db.execute(
            "INSERT INTO roster_versions (domain, localpart, version) VALUES (?, ?, 1) "
            "ON CONFLICT (domain, localpart) DO UPDATE SET version = version + 1",
            (domain, user))
        rows = await self._db.execute_fetchall(
            "SELECT version FROM roster_versions WHERE domain = ? AND localpart = ?",
            (domain, user))
        return int(next(iter(rows))[0])
