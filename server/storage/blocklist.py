"""BlocklistStore on either backend: the JIDs each account blocks (XEP-0191).

Each call is one SQL statement (several JIDs are passed as one array parameter: a JSON array
expanded with json_each on SQLite, a text[] unnested on PostgreSQL), hence atomic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from server.storage import StoreSpec
from server.storage.store import Store

_TABLE = """CREATE TABLE blocklist (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        jid TEXT NOT NULL,
        PRIMARY KEY (domain, localpart, jid),
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    )"""

MIGRATIONS = {
    "sqlite": [[_TABLE + " WITHOUT ROWID"]],  # 1 (the old global version 5)
    "postgresql": [[_TABLE]],                 # 1
}


class SQLiteBlocklistStore(Store):
    """BlocklistStore."""

    _JIDS = "SELECT value FROM json_each(?)"  # the rows of one array parameter

    def _array(self, jids: Iterable[str]) -> object:
        return json.dumps(list(jids))

    async def get(self, user: str, domain: str) -> list[str]:
        rows = await self._db.fetch(
            "SELECT jid FROM blocklist WHERE domain = ? AND localpart = ?", domain, user)
        return sorted(row[0] for row in rows)  # by code point, on both backends

    async def add(self, user: str, domain: str, jids: Iterable[str]) -> None:
        await self._write(user, domain,
                          "INSERT INTO blocklist (domain, localpart, jid) "
                          f"SELECT ?, ?, value FROM ({self._JIDS}) AS j WHERE true "
                          "ON CONFLICT DO NOTHING",  # WHERE true: SQLite's upsert needs it
                          domain, user, self._array(jids))

    async def remove(self, user: str, domain: str, jids: Iterable[str]) -> None:
        await self._db.execute(
            "DELETE FROM blocklist WHERE domain = ? AND localpart = ? "
            f"AND jid IN ({self._JIDS})", domain, user, self._array(jids))

    async def clear(self, user: str, domain: str) -> None:
        await self._db.execute(
            "DELETE FROM blocklist WHERE domain = ? AND localpart = ?", domain, user)


class PostgresBlocklistStore(SQLiteBlocklistStore):
    _JIDS = "SELECT unnest(?::text[]) AS value"

    def _array(self, jids: Iterable[str]) -> object:
        return list(jids)


SPEC: StoreSpec = StoreSpec(name="blocklists", sqlite=SQLiteBlocklistStore,
                 postgresql=PostgresBlocklistStore, migrations=MIGRATIONS, tables=("blocklist",))
