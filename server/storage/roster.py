"""RosterStore on either backend: one row per (account, contact), a version per account
(XEP-0237). A change and its version bump are one transaction."""

from __future__ import annotations

import json

from server.storage import StoreSpec
from server.storage.base import NoSuchAccount, RosterItem
from server.storage.db import ForeignKeyViolation
from server.storage.store import Store

_ROSTER_ITEMS = """CREATE TABLE roster_items (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            contact TEXT NOT NULL,
            name TEXT,
            groups {json} NOT NULL DEFAULT '[]',
            subscription TEXT NOT NULL DEFAULT 'none',
            pending_out {bool} NOT NULL DEFAULT {false},
            pending_in {bool} NOT NULL DEFAULT {false},
            approved {bool} NOT NULL DEFAULT {false},
            listed {bool} NOT NULL DEFAULT {true},
            request TEXT,
            PRIMARY KEY (domain, localpart, contact),
            FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
                ON DELETE CASCADE
        ){table}"""
_ROSTER_VERSIONS = """CREATE TABLE roster_versions (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            version {int} NOT NULL,
            PRIMARY KEY (domain, localpart),
            FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
                ON DELETE CASCADE
        ){table}"""
# SQLite keeps the statements of the old global version 2 (booleans as 0/1, JSON as text).
_TYPES = {"sqlite": dict(json="TEXT", bool="INTEGER", false="0", true="1", int="INTEGER",
                         table=" WITHOUT ROWID"),
          "postgresql": dict(json="JSONB", bool="BOOLEAN", false="false", true="true",
                             int="BIGINT", table="")}
MIGRATIONS = {backend: [[_ROSTER_ITEMS.format(**types), _ROSTER_VERSIONS.format(**types)]]
              for backend, types in _TYPES.items()}  # 1

_COLUMNS = "contact, name, groups, subscription, pending_out, pending_in, approved, listed, request"
_ITEM_COLUMNS = ", ".join(f"i.{c}" for c in _COLUMNS.split(", "))
_UPDATE = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ")[1:])


class RosterStoreSQL(Store):
    """RosterStore."""

    async def load(self, user: str, domain: str) -> tuple[int, list[RosterItem]]:
        # One statement, one round trip (it is read at every initial presence, RFC 6121 §4.2.2,
        # and the stream's next stanzas wait for it): the version joined to the items, from a
        # one-row table so that an account without items still gets its version (a row of
        # NULL items then).
        rows = await self._db.fetch(
            f"SELECT v.version, {_ITEM_COLUMNS} FROM (SELECT 1 AS one) AS one "
            "LEFT JOIN roster_versions AS v ON v.domain = ? AND v.localpart = ? "
            "LEFT JOIN roster_items AS i ON i.domain = ? AND i.localpart = ?",
            domain, user, domain, user)
        version = rows[0][0] if rows else None
        items = [RosterItem(contact=r[1], name=r[2], groups=tuple(json.loads(r[3])),
                            subscription=r[4], pending_out=bool(r[5]), pending_in=bool(r[6]),
                            approved=bool(r[7]), listed=bool(r[8]), request=r[9])
                 for r in rows if r[1] is not None]
        return (0 if version is None else int(version)), items

    async def put(self, user: str, domain: str, item: RosterItem) -> int:
        return await self._change_and_bump(
            user, domain,
            f"INSERT INTO roster_items (domain, localpart, {_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (domain, localpart, contact) DO UPDATE SET {_UPDATE}",
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
        """One change and the new roster version, in one transaction. The version row stays
        locked by the upsert until commit: writers of one roster take turns, each seeing the
        version the one before it left."""
        try:
            async with self._db.transaction() as tx:
                await tx.execute(sql, *args)
                row = await tx.fetchrow(
                    "INSERT INTO roster_versions (domain, localpart, version) VALUES (?, ?, 1) "
                    "ON CONFLICT (domain, localpart) DO UPDATE "
                    "SET version = roster_versions.version + 1 RETURNING version",
                    domain, user)
        except ForeignKeyViolation:
            raise NoSuchAccount(f"{user}@{domain}") from None
        assert row is not None
        return int(row[0])


SPEC: StoreSpec = StoreSpec(name="rosters", sqlite=RosterStoreSQL, postgresql=RosterStoreSQL,
                 migrations=MIGRATIONS, tables=("roster_items", "roster_versions"))
