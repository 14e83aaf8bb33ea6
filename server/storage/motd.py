"""MotdStore on either backend: the message of the day of each hosted domain (XEP-0133
§4.26-4.28 set-motd, edit-motd, delete-motd), sent to users when they log in.

Kept in the database, not in memory, so that it survives a restart and every node of one
domain sends the same. Not owned by an account: the table has no foreign key.
"""

from __future__ import annotations

from typing import Protocol

from server.storage import StoreSpec
from server.storage.store import Store

_TABLE = """CREATE TABLE motd (
        domain TEXT NOT NULL PRIMARY KEY,
        text TEXT NOT NULL
    )"""

MIGRATIONS = {
    "sqlite": [[_TABLE + " WITHOUT ROWID"]],  # 1
    "postgresql": [[_TABLE]],                 # 1
}


class MotdStore(Protocol):
    async def get(self, domain: str) -> str | None:
        """The domain's message of the day, or None when there is none."""

    async def set(self, domain: str, text: str) -> None:
        """Set or replace it."""

    async def delete(self, domain: str) -> bool:
        """Remove it; whether there was one."""


class SQLiteMotdStore(Store):
    """MotdStore (the SQL is the same on both backends)."""

    async def get(self, domain: str) -> str | None:
        row = await self._first("SELECT text FROM motd WHERE domain = ?", domain)
        return None if row is None else str(row[0])

    async def set(self, domain: str, text: str) -> None:
        await self._db.execute(
            "INSERT INTO motd (domain, text) VALUES (?, ?) "
            "ON CONFLICT (domain) DO UPDATE SET text = excluded.text", domain, text)

    async def delete(self, domain: str) -> bool:
        return await self._db.execute("DELETE FROM motd WHERE domain = ?", domain) > 0


class PostgresMotdStore(SQLiteMotdStore):
    pass


SPEC: StoreSpec = StoreSpec(name="motd", sqlite=SQLiteMotdStore, postgresql=PostgresMotdStore,
                            migrations=MIGRATIONS, tables=("motd",), requires=())
