"""MucRoomStore on either backend: the persistent rooms of the MUC service (XEP-0045), each
with its configuration (a JSON object), its subject and its affiliations (owner, admin,
member, outcast) by bare JID.

A room is written whole (``save``: one transaction replaces the row and its affiliations) and
read whole at start (``load``); rooms are few and small, occupants are never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from server.storage import StoreSpec
from server.storage.store import Store

_ROOMS = """CREATE TABLE muc_rooms (
        room TEXT NOT NULL PRIMARY KEY,
        config TEXT NOT NULL,
        subject TEXT,
        subject_from TEXT
    )"""
_AFFILIATIONS = """CREATE TABLE muc_affiliations (
        room TEXT NOT NULL,
        jid TEXT NOT NULL,
        affiliation TEXT NOT NULL,
        reason TEXT,
        nick TEXT,
        PRIMARY KEY (room, jid),
        FOREIGN KEY (room) REFERENCES muc_rooms (room) ON DELETE CASCADE
    )"""

MIGRATIONS = {
    "sqlite": [[_ROOMS + " WITHOUT ROWID", _AFFILIATIONS + " WITHOUT ROWID"]],  # 1
    "postgresql": [[_ROOMS, _AFFILIATIONS]],                                   # 1
}


@dataclass(frozen=True, slots=True)
class StoredRoom:
    room: str                   # the room's bare JID
    config: str                 # its configuration, a JSON object (the module's to read)
    subject: str | None = None
    subject_from: str | None = None  # the nick (or room JID) that set it
    affiliations: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # bare JID -> (affiliation, reason)
    nicks: dict[str, str] = field(default_factory=dict)  # bare JID -> registered nick
    # (muc#register; only for JIDs with an affiliation)


class MucRoomStore(Protocol):
    async def save(self, room: StoredRoom) -> None:
        """Create or replace the room, its affiliations included."""

    async def load(self, service: str) -> list[StoredRoom]:
        """Every room at this service domain (room@service), ordered by room JID."""

    async def delete(self, room: str) -> bool:
        """Forget a room and its affiliations; whether it was there."""


class SQLiteMucRoomStore(Store):
    """MucRoomStore (the SQL is the same on both backends)."""

    async def save(self, room: StoredRoom) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO muc_rooms (room, config, subject, subject_from) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (room) DO UPDATE SET config = excluded.config, "
                "subject = excluded.subject, subject_from = excluded.subject_from",
                room.room, room.config, room.subject, room.subject_from)
            await tx.execute("DELETE FROM muc_affiliations WHERE room = ?", room.room)
            if room.affiliations:
                await tx.executemany(
                    "INSERT INTO muc_affiliations (room, jid, affiliation, reason, nick) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(room.room, jid, aff, reason, room.nicks.get(jid))
                     for jid, (aff, reason) in sorted(room.affiliations.items())])

    async def load(self, service: str) -> list[StoredRoom]:
        suffix = "@" + service
        rows = await self._db.fetch("SELECT room, config, subject, subject_from FROM muc_rooms")
        affiliations: dict[str, dict[str, tuple[str, str | None]]] = {}
        nicks: dict[str, dict[str, str]] = {}
        for row in await self._db.fetch(
                "SELECT room, jid, affiliation, reason, nick FROM muc_affiliations"):
            if row[0].endswith(suffix):
                affiliations.setdefault(row[0], {})[row[1]] = (row[2], row[3])
                if row[4] is not None:
                    nicks.setdefault(row[0], {})[row[1]] = row[4]
        found = [StoredRoom(row[0], row[1], row[2], row[3], affiliations.get(row[0], {}),
                            nicks.get(row[0], {}))
                 for row in rows if row[0].endswith(suffix)]
        return sorted(found, key=lambda r: r.room)

    async def delete(self, room: str) -> bool:
        async with self._db.transaction() as tx:
            await tx.execute("DELETE FROM muc_affiliations WHERE room = ?", room)
            return await tx.execute("DELETE FROM muc_rooms WHERE room = ?", room) > 0


class PostgresMucRoomStore(SQLiteMucRoomStore):
    pass


SPEC: StoreSpec = StoreSpec(name="muc_rooms", sqlite=SQLiteMucRoomStore,
                            postgresql=PostgresMucRoomStore, migrations=MIGRATIONS,
                            tables=("muc_rooms", "muc_affiliations"), requires=())
