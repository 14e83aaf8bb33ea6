"""PushStore on either backend: each account's XEP-0357 push registrations, one per (app
server JID, node), with the publish-options form the client gave (serialised XML, or none).

Each call is one SQL statement. Registrations go with their account (ON DELETE CASCADE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.storage import StoreSpec
from server.storage.store import Store

_TABLE = """CREATE TABLE push_registrations (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        service TEXT NOT NULL,
        node TEXT NOT NULL,
        options {blob},
        PRIMARY KEY (domain, localpart, service, node),
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    )"""

MIGRATIONS = {
    "sqlite": [[_TABLE.format(blob="BLOB") + " WITHOUT ROWID"]],  # 1
    "postgresql": [[_TABLE.format(blob="BYTEA")]],                # 1
}


@dataclass(frozen=True, slots=True)
class PushRegistration:
    service: str            # the app server's JID (XEP-0357 'jid')
    node: str               # its PubSub node
    options: bytes | None   # the <x xmlns='jabber:x:data'/> publish-options, as given


class PushStore(Protocol):
    async def put(self, user: str, domain: str, registration: PushRegistration) -> None:
        """Add a registration, or replace the options of the one with its service and node.
        NoSuchAccount when the account is gone."""

    async def get(self, user: str, domain: str) -> list[PushRegistration]:
        """The account's registrations, ordered by service, then node."""

    async def remove(self, user: str, domain: str, service: str, node: str | None) -> int:
        """Remove one registration (node None: every one of that service); how many went."""


class SQLitePushStore(Store):
    """PushStore (the SQL is the same on both backends)."""

    async def put(self, user: str, domain: str, registration: PushRegistration) -> None:
        await self._write(
            user, domain,
            "INSERT INTO push_registrations (domain, localpart, service, node, options) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain, localpart, service, node) "
            "DO UPDATE SET options = excluded.options",
            domain, user, registration.service, registration.node, registration.options)

    async def get(self, user: str, domain: str) -> list[PushRegistration]:
        rows = await self._db.fetch(
            "SELECT service, node, options FROM push_registrations "
            "WHERE domain = ? AND localpart = ?", domain, user)
        found = [PushRegistration(row[0], row[1], None if row[2] is None else bytes(row[2]))
                 for row in rows]
        return sorted(found, key=lambda r: (r.service, r.node))  # by code point on both

    async def remove(self, user: str, domain: str, service: str, node: str | None) -> int:
        if node is None:
            return await self._db.execute(
                "DELETE FROM push_registrations WHERE domain = ? AND localpart = ? "
                "AND service = ?", domain, user, service)
        return await self._db.execute(
            "DELETE FROM push_registrations WHERE domain = ? AND localpart = ? "
            "AND service = ? AND node = ?", domain, user, service, node)


class PostgresPushStore(SQLitePushStore):
    pass


SPEC: StoreSpec = StoreSpec(name="push", sqlite=SQLitePushStore, postgresql=PostgresPushStore,
                            migrations=MIGRATIONS, tables=("push_registrations",))
