"""SQLite stores for small per-account data: vCards (XEP-0054), private XML (XEP-0049) and last
activity (XEP-0012). Each call is one statement, hence one transaction (autocommit).
The tables reference accounts(domain, localpart) with ON DELETE CASCADE (see sqlite.py), so
deleting an account removes its vCard, private XML and last activity; see store.py for the
write lock and NoSuchAccount.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.storage.store import SQLiteStore

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


class SQLiteVCardStore(SQLiteStore):
    """VCardStore."""

    async def get(self, user: str, domain: str) -> str | None:
        row = await self._first(
            "SELECT vcard FROM vcards WHERE domain = ? AND localpart = ?", (domain, user))
        return None if row is None else str(row[0])

    async def set(self, user: str, domain: str, vcard: str, avatar_hash: str) -> None:
        await self._write(user, domain,
                          "INSERT OR REPLACE INTO vcards (domain, localpart, vcard, avatar_hash) "
                          "VALUES (?, ?, ?, ?)", (domain, user, vcard, avatar_hash))

    async def avatar_hash(self, user: str, domain: str) -> str | None:
        row = await self._first(
            "SELECT avatar_hash FROM vcards WHERE domain = ? AND localpart = ?", (domain, user))
        return None if row is None else str(row[0])


class SQLitePrivateStore(SQLiteStore):
    """PrivateStore."""

    async def get(self, user: str, domain: str, namespace: str, name: str) -> str | None:
        row = await self._first(
            "SELECT xml FROM private_xml "
            "WHERE domain = ? AND localpart = ? AND namespace = ? AND name = ?",
            (domain, user, namespace, name))
        return None if row is None else str(row[0])

    async def set(self, user: str, domain: str, items: Sequence[tuple[str, str, str]]) -> None:
        """Store (namespace, name, xml) items, replacing earlier ones with the same key. One
        multi-row statement, so a set is stored whole or not at all."""
        if not items:
            return
        rows = ", ".join("(?, ?, ?, ?, ?)" for _ in items)
        params = [value for namespace, name, xml in items
                  for value in (domain, user, namespace, name, xml)]
        await self._write(user, domain,
                          "INSERT OR REPLACE INTO private_xml "
                          f"(domain, localpart, namespace, name, xml) VALUES {rows}", params)


class SQLiteLastActivityStore(SQLiteStore):
    """LastActivityStore."""

    async def get(self, user: str, domain: str) -> tuple[int, str] | None:
        row = await self._first(
            "SELECT logout, status FROM last_activity WHERE domain = ? AND localpart = ?",
            (domain, user))
        return None if row is None else (int(row[0]), str(row[1]))

    async def set(self, user: str, domain: str, logout: int, status: str) -> None:
        await self._write(user, domain,
                          "INSERT OR REPLACE INTO last_activity (domain, localpart, logout, "
                          "status) VALUES (?, ?, ?, ?)", (domain, user, logout, status))
