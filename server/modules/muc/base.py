"""What the parts of the MUC service share: the [muc] settings, the rooms and who is in
which, storage (rooms and their archive), and delivery of what rooms send."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.config import Invalid, int_option, option, service_fields
from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza
from server.modules.muc.nicknames import NickRefused
from server.modules.muc.room import Occupant, Room
from server.services import ServiceModule
from server.storage import archive as archive_store
from server.storage import muc as muc_store
from server.storage.archive import ArchiveStore
from server.storage.muc import MucRoomStore, StoredRoom
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.modules.muc.cluster import PlacedRooms

log = logging.getLogger("presenced.muc")


def _rate(value: Any, _ctx: object) -> float:
    if type(value) not in (int, float) or not 0 <= value < float("inf"):
        raise Invalid
    return float(value)


def _restriction(value: Any, _ctx: object) -> bool | str:
    if value is False or value in ("local", "admins"):
        return value
    raise Invalid


@dataclass(frozen=True, slots=True, kw_only=True)
class MucSettings:
    # Off by default for now: on, it adds muc.<domain> to every installation's service domains
    # (certificate names, disco#items), which tests of other features still pin down.
    enabled: bool = field(metadata=service_fields.enabled(True))
    subdomain: str = field(metadata=service_fields.subdomain("muc"))
    # Who may create rooms: anyone (false), users of our domains ("local"), [admins] only.
    restrict_room_creation: bool | str = field(metadata=option(
        'false, "local" or "admins"', _restriction, False))
    history_length: int = field(metadata=int_option(0, 1000, 20))
    max_history_length: int = field(metadata=int_option(0, 1000, 100))
    # Limits (0: none). Over max_rooms_per_user a join that would create a room, over
    # message_rate/message_burst a message, get <resource-constraint/> (RFC 6120 §8.3.3.18).
    max_rooms_per_user: int = field(metadata=int_option(0, 1_000_000, 100))
    max_occupants: int = field(metadata=int_option(0, 1_000_000, 1000))
    message_rate: float = field(metadata=option("a number of messages per second >= 0",
                                                _rate, 5.0))
    message_burst: int = field(metadata=int_option(1, 1_000_000, 20))
    # Presence updates an occupant may send per second, in bursts of up to presence_burst.
    # One over it is not broadcast: the room keeps it as the occupant's current presence
    # and sends the latest one to the others once the rate allows (joins and leaves are
    # never held back).
    presence_rate: float = field(metadata=option("a number of presences per second >= 0",
                                                 _rate, 1.0))
    presence_burst: int = field(metadata=int_option(1, 1_000_000, 10))
    # Rooms one account (bare JID, all its sessions together) may be in at once; one more
    # join is refused with <resource-constraint/> ([admins] are exempt).
    max_rooms_joined: int = field(metadata=int_option(0, 1_000_000, 100))


def _error(stanza: Stanza, err: StanzaError, to: JID) -> Any:
    """The error reply, by the room (RFC 6120 §8.3.2 'by', as XEP-0045's examples have it)."""
    if st.is_error(stanza):
        return True  # RFC 6120 §8.3.1: never answer an error
    reply = st.error_reply(stanza, err)
    if isinstance(err, NickRefused):
        reply.set("from", f"{to.bare}/{err.prepared}")
    error = reply.find(st.ERROR)
    if error is not None:
        error.set("by", str(to.bare))
    return reply


async def _errors_later(pending: Any, stanza: Stanza, to: JID) -> Any:
    try:
        return await pending
    except StanzaError as err:
        return _error(stanza, err, to)


class MucBase(ServiceModule):
    """The state every part works on; the parts (service.py, admin.py, ...) add behaviour."""

    name = "muc"
    settings = MucSettings
    # The room archive (XEP-0313 on room JIDs) is kept in the archive store, which MAM uses
    # for accounts too: declared here as well (Server.start opens a spec once however many
    # modules declare it), so room archives do not depend on the mam module running.
    stores = (muc_store.SPEC, archive_store.SPEC)
    config: MucSettings

    def __init__(self, server: Any, config: Any) -> None:
        super().__init__(server, config)
        self.rooms: dict[JID, Room] = {}
        self.joined: dict[JID, set[Room]] = {}   # real full JID -> rooms it is in
        self.services: set[str] = set()
        self.id_key = b""
        # relayed iq id -> (asker's JID, its iq id, the occupant's real JID, room, nick)
        self.relayed: dict[str, tuple[str, str, JID, JID, str]] = {}
        self._held: set[int] = set()  # occupants (id()) whose held presence goes out later
        # [cluster]: rooms placed on one node each (cluster.py); None in a single process
        self.placed: PlacedRooms | None = None

    def room_iq(self, stanza: Stanza, to: JID) -> tuple[Room, JID, etree._Element]:
        """An iq to a room (its handlers are called by Service.call_iq, which checked that
        the room exists): the room, the sender, the payload."""
        payload = st.payload(stanza)
        assert payload is not None
        return self.rooms[to.bare], JID.parse(stanza.get("from", "")), payload

    @property
    def store(self) -> MucRoomStore:
        store: MucRoomStore = self.store_of(muc_store.SPEC)
        return store

    @property
    def archive(self) -> ArchiveStore:
        store: ArchiveStore = self.store_of(archive_store.SPEC)
        return store

    async def _save(self, room: Room) -> None:
        if room.destroyed:
            return
        if not room.config.persistent:
            await self.store.delete(room.jid_str)
            return
        await self.store.save(StoredRoom(
            room.jid_str, room.config.to_json(), room.subject, room.subject_from,
            {str(j): (a, room.reasons.get(j)) for j, a in room.affiliations.items()},
            {str(j): n for j, n in room.nicks.items()}))

    def _deliver(self, stanzas: list[Stanza]) -> None:
        """Everything a room sends is routed like any stanza to a user, through the router's
        `filter/user` chain (blocking, XEP-0191: a user who blocked the room or an occupant
        does not get its stanzas; CSI; MAM for private messages), in order: a local session
        gets its stanzas at once unless a filter has to wait."""
        router = self.server.router
        for stanza in stanzas:
            to = JID.parse(stanza.get("to", ""))
            if to.resource is not None and to.domain in router.hosts:
                # To a local session: the filter chain, then the session, in order.
                # (Through route(), presence would take the presence module's inbound path,
                # a coroutine, and lose the order XEP-0045 §7.2.3 needs; and a blocked
                # message's error would come back to the room as a failed delivery, 333.)
                router.deliver_in_order(stanza, to)
                continue
            pending = router.route(stanza, None)
            if pending is not None:
                router.spawn(pending)

    def _left(self, room: Room, real: JID, out: list[Stanza]) -> None:
        self._deliver(out)
        self.unjoin(real, room)
        self._maybe_forget(room)

    def unjoin(self, real: JID, room: Room) -> None:
        """The session `real` is no longer counted in `room` (self.joined)."""
        rooms = self.joined.get(real)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self.joined[real]

    def _maybe_forget(self, room: Room) -> None:
        if not room.occupants and not room.config.persistent and not room.destroyed:
            self.rooms.pop(room.jid, None)
            room.destroyed = True
            self.server.router.spawn(self.archive.delete_owner(room.jid_str))
            if self.placed is not None:
                self.placed.forgotten(room)
            log.info("event=muc-room-gone room=%s", room.jid_str)

    def _forget_sessions(self, room: Room, occupant: Occupant) -> None:
        for real in occupant.sessions:
            self.unjoin(real, room)
