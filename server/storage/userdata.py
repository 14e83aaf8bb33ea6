"""Stores for small per-account data, on either backend: vCards (XEP-0054), private XML
(XEP-0049) and last activity (XEP-0012). Each call is one statement, hence one transaction.
The tables reference accounts(domain, localpart) with ON DELETE CASCADE; see store.py for
NoSuchAccount.

On SQLite the three tables came as one migration (the old global version 3); each is now its
own store, with its own version.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.storage import StoreSpec
from server.storage.store import Store

_OWNER = """domain TEXT NOT NULL,
            localpart TEXT NOT NULL,"""
_FOREIGN_KEY = """FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
                ON DELETE CASCADE"""


def _migrations(table: str) -> dict[str, list[list[str]]]:
    """The same table on both backends ({int}: SQLite's INTEGER is 64 bits)."""
    return {"sqlite": [[table.format(int="INTEGER") + " WITHOUT ROWID"]],
            "postgresql": [[table.format(int="BIGINT")]]}


_VCARDS = f"""CREATE TABLE vcards (
            {_OWNER}
            vcard TEXT NOT NULL,
            avatar_hash TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (domain, localpart),
            {_FOREIGN_KEY}
        )"""
_PRIVATE_XML = f"""CREATE TABLE private_xml (
            {_OWNER}
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            xml TEXT NOT NULL,
            PRIMARY KEY (domain, localpart, namespace, name),
            {_FOREIGN_KEY}
        )"""
_LAST_ACTIVITY = f"""CREATE TABLE last_activity (
            {_OWNER}
            logout {{int}} NOT NULL,
            status TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (domain, localpart),
            {_FOREIGN_KEY}
        )"""


class VCardStoreSQL(Store):
    """VCardStore."""

    async def get(self, user: str, domain: str) -> str | None:
        row = await self._first(
            "SELECT vcard FROM vcards WHERE domain = ? AND localpart = ?", domain, user)
        return None if row is None else str(row[0])

    async def set(self, user: str, domain: str, vcard: str, avatar_hash: str) -> None:
        await self._write(user, domain,
                          "INSERT INTO vcards (domain, localpart, vcard, avatar_hash) "
                          "VALUES (?, ?, ?, ?) ON CONFLICT (domain, localpart) DO UPDATE "
                          "SET vcard = excluded.vcard, avatar_hash = excluded.avatar_hash",
                          domain, user, vcard, avatar_hash)

    async def avatar_hash(self, user: str, domain: str) -> str | None:
        row = await self._first(
            "SELECT avatar_hash FROM vcards WHERE domain = ? AND localpart = ?", domain, user)
        return None if row is None else str(row[0])


class PrivateStoreSQL(Store):
    """PrivateStore."""

    async def get(self, user: str, domain: str, namespace: str, name: str) -> str | None:
        row = await self._first(
            "SELECT xml FROM private_xml "
            "WHERE domain = ? AND localpart = ? AND namespace = ? AND name = ?",
            domain, user, namespace, name)
        return None if row is None else str(row[0])

    async def set(self, user: str, domain: str, items: Sequence[tuple[str, str, str]]) -> None:
        """Store (namespace, name, xml) items, replacing earlier ones with the same key. One
        multi-row statement, so a set is stored whole or not at all."""
        if not items:
            return
        # The last of several items with one key wins (one statement may not touch a row
        # twice on PostgreSQL).
        latest = {(namespace, name): xml for namespace, name, xml in items}
        rows = ", ".join("(?, ?, ?, ?, ?)" for _ in latest)
        params = [value for (namespace, name), xml in latest.items()
                  for value in (domain, user, namespace, name, xml)]
        await self._write(user, domain,
                          "INSERT INTO private_xml (domain, localpart, namespace, name, xml) "
                          f"VALUES {rows} ON CONFLICT (domain, localpart, namespace, name) "
                          "DO UPDATE SET xml = excluded.xml", *params)


    async def all(self, user: str, domain: str) -> list[tuple[str, str, str]]:
        rows = await self._db.fetch(
            "SELECT namespace, name, xml FROM private_xml WHERE domain = ? AND localpart = ?",
            domain, user)
        # Sorted here, by code point, the same on both backends (whatever the collation).
        return sorted((str(row[0]), str(row[1]), str(row[2])) for row in rows)


class LastActivityStoreSQL(Store):
    """LastActivityStore."""

    async def get(self, user: str, domain: str) -> tuple[int, str] | None:
        row = await self._first(
            "SELECT logout, status FROM last_activity WHERE domain = ? AND localpart = ?",
            domain, user)
        return None if row is None else (int(row[0]), str(row[1]))

    async def set(self, user: str, domain: str, logout: int, status: str) -> None:
        await self._write(user, domain,
                          "INSERT INTO last_activity (domain, localpart, logout, status) "
                          "VALUES (?, ?, ?, ?) ON CONFLICT (domain, localpart) DO UPDATE "
                          "SET logout = excluded.logout, status = excluded.status",
                          domain, user, logout, status)


VCARDS: StoreSpec = StoreSpec(name="vcards", sqlite=VCardStoreSQL, postgresql=VCardStoreSQL,
                   migrations=_migrations(_VCARDS), tables=("vcards",))
PRIVATE: StoreSpec = StoreSpec(name="private", sqlite=PrivateStoreSQL, postgresql=PrivateStoreSQL,
                    migrations=_migrations(_PRIVATE_XML), tables=("private_xml",))
LAST_ACTIVITY: StoreSpec = StoreSpec(name="last_activity", sqlite=LastActivityStoreSQL,
                          postgresql=LastActivityStoreSQL,
                          migrations=_migrations(_LAST_ACTIVITY), tables=("last_activity",))
