"""Multi-User Chat (XEP-0045) at muc.<domain>: rooms made on first join, occupants from here and
from other servers, groupchat and private messages, subject, discussion history, the
muc#roomconfig form, persistent rooms (stored, back after a restart), affiliations and roles
(muc#admin: lists, kick, ban, voice), nickname registration (muc#register), mediated
invitations, voice requests (muc#request), iqs relayed to occupants, destroy; XEP-0410
self-ping, XEP-0421 occupant ids, XEP-0359 stanza ids, XEP-0313 room archive (the MAM store),
XEP-0425 moderation (a tombstone in the archive); limits on rooms per user, occupants and
message rate. Room stanzas to our users pass the router's `filter/user` chain (blocking).

    [muc]
    enabled = true                   # the default
    subdomain = "muc"
    restrict_room_creation = false   # or "local" (users of our domains), "admins" ([admins])
    history_length = 20              # messages a new room keeps for joiners
    max_history_length = 100         # the most a room's owner may configure
    max_rooms_per_user = 100         # rooms one user may create (and own); 0: no limit
    max_occupants = 1000             # per room (muc#roomconfig_maxusers may lower it)
    message_rate = 5.0               # messages per second per occupant (0: no limit) ...
    message_burst = 20               # ... with bursts of up to this many

Room logic is in room.py (a plain object returning the stanzas to send); this file routes
stanzas to rooms, answers the iqs and delivers what rooms return.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import os
import secrets
import stringprep
import time
import unicodedata
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import precis_i18n
from lxml import etree

from server.config import _Context, _Invalid, int_option, option, service_fields
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza, hook
from server.modules import archive_query as aq
from server.modules.muc.room import (
    AFFILIATIONS,
    MUC,
    MUC_ADMIN,
    MUC_OWNER,
    MUC_USER,
    OCCUPANT_ID,
    ROLES,
    SELF_PING,
    SID,
    Occupant,
    Room,
    RoomConfig,
    apply_form,
    config_form,
    field_values,
)
from server.services import ServiceHost, ServiceModule
from server.sessions import Session
from server.storage import archive as archive_store
from server.storage import muc as muc_store
from server.storage.archive import ArchiveEntry, ArchiveQuery, ArchiveStore, UnknownArchiveId
from server.storage.muc import MucRoomStore, StoredRoom
from server.xml import ns
from server.xml import stanza as st
from server.xml.writer import addressed_copies

log = logging.getLogger("presenced.muc")
_NICKNAME = precis_i18n.get_profile("NicknameCasePreserved")

_X_MUC = ns.q(MUC, "x")
_PING = ns.q(ns.PING, "ping")
_INFO = ns.q(ns.DISCO_INFO, "query")
_ITEMS = ns.q(ns.DISCO_ITEMS, "query")
_OWNER_QUERY = ns.q(MUC_OWNER, "query")
_ADMIN_QUERY = ns.q(MUC_ADMIN, "query")
_FORM = ns.q(ns.DATA_FORMS, "x")
_MAM_QUERY = ns.q(aq.MAM2, "query")
REGISTER = "jabber:iq:register"
_REGISTER = ns.q(REGISTER, "query")
_MAX_PAGE = 100  # the largest page of a room archive query (XEP-0313 with RSM)
_MAX_RELAYED = 10000  # iqs relayed to occupants and not answered yet, at most
MODERATE = "urn:xmpp:message-moderate:1"  # XEP-0425
RETRACT = "urn:xmpp:message-retract:1"    # XEP-0424
_MODERATE = ns.q(MODERATE, "moderate")
REQUEST = MUC + "#request"  # XEP-0045 §7.13, §8.6: voice requests


def _is_true(values: list[str]) -> bool:
    return bool(values) and values[0].strip() in ("1", "true")


def _tombstone(original: Stanza, author: etree._Element | None, moderated: etree._Element,
               reason: str | None) -> Stanza:
    """XEP-0425 §6: what the archive keeps of a moderated message: its attributes and its
    author's occupant id; the body and everything else that might leak it give way to
    <retracted stamp/> holding the <moderated/> of the retraction (and its reason)."""
    tomb = st.element(st.MESSAGE, {k: v for k, v in original.attrib.items() if k != "to"})
    if author is not None:
        st.child(tomb, ns.q(OCCUPANT_ID, "occupant-id"), {"id": author.get("id", "")})
    retracted = st.child(tomb, ns.q(RETRACT, "retracted"),
                         {"stamp": aq.stamp(time.time_ns() // 1000)})
    retracted.append(copy.deepcopy(moderated))
    if reason:
        st.child(retracted, ns.q(RETRACT, "reason"), text=reason)
    return tomb


# Errors that say an occupant's session cannot be reached (RFC 6120 §8.3.3): its server
# vanished or the resource went away without the room hearing of it.
_UNREACHABLE = frozenset({"gone", "item-not-found", "jid-malformed", "recipient-unavailable",
                          "redirect", "remote-server-not-found", "remote-server-timeout",
                          "service-unavailable"})


def _delivery_failed(error: Stanza) -> bool:
    """XEP-0045 (status code 333): the room removes an occupant whose session answers what
    the room sent it with a delivery error, so that no ghost stays behind."""
    element = error.find(st.ERROR)
    if element is None:
        return True
    return any(etree.QName(child).localname in _UNREACHABLE for child in element
               if isinstance(child.tag, str)
               and etree.QName(child).namespace == ns.STANZA_ERRORS)


def _error(stanza: Stanza, err: StanzaError, to: JID) -> Any:
    """The error reply, by the room (RFC 6120 §8.3.2 'by', as XEP-0045's examples have it)."""
    if st.is_error(stanza):
        return True  # RFC 6120 §8.3.1: never answer an error
    reply = st.error_reply(stanza, err)
    if isinstance(err, _NickRefused):
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


class _NickRefused(StanzaError):
    """A nickname that fails strict validation; the error comes from the occupant JID as
    resourceprep maps it (Prosody's muc_nickname_robotface.scs)."""

    def __init__(self, prepared: str) -> None:
        super().__init__("jid-malformed", "Nickname must pass strict validation")
        self.prepared = prepared


def _resourceprep(text: str) -> tuple[str, bool]:
    """RFC 3920 Resourceprep (RFC 3454 stringprep, Unicode 3.2): the mapped string, and
    whether it passes strictly (no prohibited or unassigned code points, bidi rules kept)."""
    mapped = unicodedata.ucd_3_2_0.normalize(
        "NFKC", "".join(c for c in text if not stringprep.in_table_b1(c)))
    ok = bool(mapped) and not any(
        stringprep.in_table_a1(c) or stringprep.in_table_c12(c) or stringprep.in_table_c21(c)
        or stringprep.in_table_c22(c) or stringprep.in_table_c3(c) or stringprep.in_table_c4(c)
        or stringprep.in_table_c5(c) or stringprep.in_table_c6(c) or stringprep.in_table_c7(c)
        or stringprep.in_table_c8(c) or stringprep.in_table_c9(c) for c in mapped)
    if ok and any(stringprep.in_table_d1(c) for c in mapped):
        # RFC 3454 §6: RandALCat text has no LCat and starts and ends with RandALCat
        ok = not any(stringprep.in_table_d2(c) for c in mapped) and \
            stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])
    return mapped, ok


def _kicked(error: Stanza) -> Stanza:
    """What the others are told of an occupant removed for an error (status 333): its
    condition and text, as Prosody words it ("Kicked: service unavailable: Test error")."""
    condition, text = "error", None
    element = error.find(st.ERROR)
    if element is not None:
        for child in element:
            if isinstance(child.tag, str) and etree.QName(child).namespace == ns.STANZA_ERRORS:
                if etree.QName(child).localname == "text":
                    text = child.text
                else:
                    condition = etree.QName(child).localname.replace("-", " ")
    presence = st.element(st.PRESENCE)
    st.child(presence, ns.q(ns.CLIENT, "status"),
             text=f"Kicked: {condition}" + (f": {text}" if text else ""))
    return presence


def _nickname(resource: str) -> str:
    """XEP-0045 §7.2: nicknames are compared as RFC 8266 Nicknames (NFKC, spaces folded);
    a nickname the profile rejects is jid-malformed."""
    mapped, strict = _resourceprep(resource)
    if not strict:
        # XEP-0045 §7.2 and Prosody: the nickname must pass strict resourceprep too
        raise _NickRefused(mapped)
    try:
        return str(_NICKNAME.enforce(resource))
    except UnicodeError:
        raise StanzaError("jid-malformed", "not a valid nickname") from None


def _load_key(path: Path) -> bytes:
    """The occupant-id key (XEP-0421: the same ids after a restart), made when absent."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def _rate(value: Any, _ctx: _Context) -> float:
    if type(value) not in (int, float) or not 0 <= value < float("inf"):
        raise _Invalid
    return float(value)


def _restriction(value: Any, _ctx: _Context) -> bool | str:
    if value is False or value in ("local", "admins"):
        return value
    raise _Invalid


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


class Muc(ServiceModule):
    name = "muc"
    settings = MucSettings
    # The room archive uses the MAM module's store (archive_store.SPEC) when that module runs:
    # declaring it here too would open it twice (Server.start keeps duplicates of a spec that
    # two modules declare).
    stores = (muc_store.SPEC,)
    identity = ("conference", "text")
    display_name = "Chatrooms"
    service_features = (MUC, SID, OCCUPANT_ID, SELF_PING)

    def __init__(self, server: Any, config: Any) -> None:
        super().__init__(server, config)
        self.rooms: dict[JID, Room] = {}
        # Stanzas to a session that wait behind one held up by an awaiting filter (in order).
        self._backlogs: dict[JID, list[Stanza]] = {}
        self.joined: dict[JID, set[Room]] = {}   # real full JID -> rooms it is in
        self.services: set[str] = set()
        self.id_key = b""
        # relayed iq id -> (asker's JID, its iq id, the occupant's real JID, room, nick)
        self.relayed: dict[str, tuple[str, str, JID, JID, str]] = {}

    @property
    def store(self) -> MucRoomStore:
        store: MucRoomStore = getattr(self.server.storage, muc_store.SPEC.name)
        return store

    @property
    def archive(self) -> ArchiveStore | None:
        store: ArchiveStore | None = getattr(self.server.storage, archive_store.SPEC.name, None)
        return store

    async def start(self) -> None:
        if not self.config.enabled:
            return
        self.id_key = _load_key(self.server.config.data_dir / "muc-occupant-id.key")
        components = set(self.server.config.components)
        for domain in self.server.config.domains:
            service = f"{self.config.subdomain}.{domain}"
            if service in components:
                continue  # an external component serves that domain
            self.services.add(service)
            for stored in await self.store.load(service):
                room = self._restore(stored)
                self.rooms[room.jid] = room
            self.server.add_service(ServiceHost(service, domain, self.display_name), self.route)

    @hook("server-stopping")
    def stopping(self, _server: Any) -> None:
        # Occupants are told the service is going away (status 332, XEP-0045 §17.5... §7.2)
        # first thing in a graceful stop, while their streams (c2s, and s2s to the servers of
        # remote occupants) are still open: stop() comes after they are closed.
        for room in list(self.rooms.values()):
            for occupant in list(room.occupants.values()):
                self._deliver(room.remove(occupant, ("332",)))
        self.joined.clear()

    async def stop(self) -> None:
        self.stopping(self.server)
        self.rooms.clear()

    def _restore(self, stored: StoredRoom) -> Room:
        room = Room(JID.parse(stored.room), RoomConfig.from_json(stored.config), self.id_key,
                    self.config.max_occupants)
        room.subject, room.subject_from = stored.subject, stored.subject_from
        for jid, (affiliation, reason) in stored.affiliations.items():
            room.set_affiliation(JID.parse(jid), affiliation, reason)
        for jid, nick in stored.nicks.items():
            room.nicks[JID.parse(jid)] = nick
        return room

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

    # -- delivery ------------------------------------------------------------------------------

    def _deliver(self, stanzas: list[Stanza]) -> None:
        """Everything a room sends is routed like any stanza to a user, through the router's
        `filter/user` chain (blocking, XEP-0191: a user who blocked the room or an occupant
        does not get its stanzas; CSI; MAM for private messages), in order: a local session
        gets its stanzas at once unless a filter has to wait."""
        router = self.server.router
        hooks = self.server.hooks
        for stanza in stanzas:
            to = JID.parse(stanza.get("to", ""))
            if to.resource is not None and to.domain in router.hosts:
                # To a local session: the chain here (the filters for this kind of stanza),
                # then the session. (Through the router, presence would take the presence
                # module's inbound path, a coroutine, and lose the order XEP-0045 §7.2.3
                # needs; and a blocked message's error would come back to the room as a
                # failed delivery, status 333.)
                self._filter_and_send(hooks.chain("filter/user", stanza.tag), 0, stanza, to)
                continue
            pending = router.route(stanza, None)
            if pending is not None:
                router.spawn(pending)

    def _filter_and_send(self, chain: tuple[Any, ...], start: int, stanza: Stanza,
                         to: JID) -> None:
        """The filter/user chain as the router runs it (None: on; an awaitable: on once it
        is done; anything else: consumed; StanzaError: refused, which a room is never told),
        then the session, if it is still there. While one stanza to a session waits for a
        filter, later ones to that session wait behind it (XEP-0045 §7.2.3/§7.2.16 order)."""
        backlog = self._backlogs.get(to)
        if backlog is not None:
            backlog.append(stanza)
            return
        verdict, index = self._run_filters(chain, start, stanza, to)
        if verdict is not None:
            self._backlogs[to] = []
            self.server.router.spawn(self._filter_later(verdict, chain, index, stanza, to))

    def _run_filters(self, chain: tuple[Any, ...], start: int, stanza: Stanza,
                     to: JID) -> tuple[Any, int]:
        """Runs the chain from start and sends; or returns the awaitable verdict it stopped at
        and the index to go on from (None, 0 when done)."""
        for index in range(start, len(chain)):
            try:
                verdict = chain[index](stanza, None, to)
            except StanzaError:
                return None, 0
            if verdict is None:
                continue
            if inspect.isawaitable(verdict):
                return verdict, index + 1
            return None, 0
        session = self.server.sessions.get(to)
        if session is not None:
            session.send(stanza)
        return None, 0

    async def _filter_later(self, pending: Any, chain: tuple[Any, ...], start: int,
                            stanza: Stanza, to: JID) -> None:
        backlog = self._backlogs[to]
        try:
            while True:
                try:
                    verdict = await pending
                except StanzaError:
                    verdict = False
                while verdict is None:
                    pending, start = self._run_filters(chain, start, stanza, to)
                    if pending is None:
                        break
                    try:
                        verdict = await pending
                    except StanzaError:
                        verdict = False
                # The next one waiting for this session, from the start of its chain.
                while backlog:
                    stanza = backlog.pop(0)
                    chain = self.server.hooks.chain("filter/user", stanza.tag)
                    pending, start = self._run_filters(chain, 0, stanza, to)
                    if pending is not None:
                        break
                else:
                    return
        finally:
            del self._backlogs[to]

    # -- routing -------------------------------------------------------------------------------

    def items(self, stanza: Stanza, _origin: Session | None) -> Any:
        if stanza[0].get("node") is not None:
            raise StanzaError("item-not-found", "no such node")
        query = st.element(_ITEMS)
        service = stanza.get("to", "")
        for jid in sorted(self.rooms, key=str):
            room = self.rooms[jid]
            if jid.domain == service and room.config.public:
                st.child(query, ns.q(ns.DISCO_ITEMS, "item"),
                         {"jid": room.jid_str, "name": room.config.name or jid.local or ""})
        return st.result(stanza, query)

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if to.local is None:
            if stanza.tag == st.IQ and stanza.get("type") in ("get", "set"):
                payload = st.payload(stanza)
                if payload is not None and payload.tag == _PING:
                    return st.result(stanza)
                return None
            return True  # presence and messages to the service itself: nothing to do
        try:
            sender = JID.parse(stanza.get("from", ""))
        except InvalidJID:
            return True
        try:
            result = self._room_stanza(stanza, sender, to)
        except StanzaError as err:
            return _error(stanza, err, to)
        if inspect.isawaitable(result):
            return _errors_later(result, stanza, to)
        return result

    def _room_stanza(self, stanza: Stanza, sender: JID, to: JID) -> Any:
        tag = stanza.tag
        if tag == st.PRESENCE:
            return self._presence(stanza, sender, to)
        if tag == st.MESSAGE:
            return self._message(stanza, sender, to)
        if tag == st.IQ:
            return self._iq(stanza, sender, to)
        return True

    # -- presence -----------------------------------------------------------------------------

    def _may_create(self, sender: JID) -> bool:
        restriction = self.config.restrict_room_creation
        if restriction == "local":
            return sender.domain in self.server.config.domains
        if restriction == "admins":
            return str(sender.bare) in self.server.config.admins
        return True

    def _check_room_quota(self, sender: JID) -> None:
        """[muc] max_rooms_per_user: a user owning that many rooms creates no more (admins
        of the server excepted)."""
        limit = self.config.max_rooms_per_user
        if not limit or str(sender.bare) in self.server.config.admins:
            return
        bare = sender.bare
        owned = sum(1 for room in self.rooms.values() if room.affiliations.get(bare) == "owner")
        if owned >= limit:
            raise StanzaError("resource-constraint", f"you own {owned} rooms already")

    def _within_rate(self, occupant: Occupant) -> None:
        """[muc] message_rate, message_burst: a token bucket per occupant; a message over it
        is refused with <resource-constraint/> (RFC 6120 §8.3.3.18, type wait), not dropped."""
        rate = self.config.message_rate
        if not rate:
            return
        burst = float(self.config.message_burst)
        now = time.monotonic()
        tokens = burst if occupant.tokens < 0 else min(
            burst, occupant.tokens + (now - occupant.refilled) * rate)
        occupant.refilled = now
        if tokens < 1.0:
            occupant.tokens = tokens
            raise StanzaError("resource-constraint", "you are sending too fast; wait a moment")
        occupant.tokens = tokens - 1.0

    def _presence(self, stanza: Stanza, sender: JID, to: JID) -> Any:
        type_ = stanza.get("type")
        room_jid = to.bare
        room = self.rooms.get(room_jid)
        if type_ == "error":
            if room is not None and sender in room.by_jid:  # status 333: see _delivery_failed
                self._left(room, sender, room.leave(sender, _kicked(stanza), ("333",)))
            return True
        if type_ == "probe":
            return self._probe(room, sender, to)
        if type_ not in (None, "unavailable"):
            return True  # subscriptions: nothing to do
        if to.resource is None:
            if type_ is None:
                raise StanzaError("jid-malformed", "join with room@service/nickname")
            if room is not None and sender in room.by_jid:
                # unavailable to the room's bare JID: leaving all the same (Prosody, issue505)
                self._left(room, sender, room.leave(sender, stanza))
            return True
        if type_ == "unavailable":
            if room is not None and sender in room.by_jid:
                self._left(room, sender, room.leave(sender, stanza))
            return True
        nick = _nickname(to.resource)
        created = False
        if room is None:
            if not self._may_create(sender):
                raise StanzaError("not-allowed", "you may not create rooms here")
            self._check_room_quota(sender)
            room = Room(room_jid, RoomConfig(history_length=self.config.history_length),
                        self.id_key, self.config.max_occupants)
            room.set_affiliation(sender, "owner")
            created = True
        occupant = room.by_jid.get(sender)
        if occupant is not None:
            if occupant.nick == nick:
                self._deliver(room.update_presence(sender, st.standalone(stanza)))
            else:
                self._deliver(room.change_nick(sender, nick))
            return True
        out = room.join(sender, nick, st.standalone(stanza), created=created,
                        renamed=nick != to.resource)
        if created:
            room.fresh = True  # not configured yet (see _owner)
            self.rooms[room_jid] = room
            log.info("event=muc-room-created room=%s", room.jid_str)
        self.joined.setdefault(sender, set()).add(room)
        self._deliver(out)
        return True

    def _probe(self, room: Room | None, sender: JID, to: JID) -> bool:
        """An occupant asks for another one's current presence (Prosody's behaviour,
        muc_presence_probe.scs; XEP-0045 does not say): the presence as the room would send
        it (no 110), a registered nick's holder who is not there as unavailable, and
        not-acceptable to someone not in the room."""
        if room is None or sender not in room.by_jid:
            raise StanzaError("not-acceptable", "you are not in this room", type="cancel")
        if to.resource is None:
            return True
        nick = _nickname(to.resource)
        asker = room.by_jid[sender]
        to_moderator = asker.role == "moderator"
        target = room.occupants.get(nick)
        if target is not None:
            presence = room.presence_for(target, to_moderator)
        else:
            holder = room.nick_owner(nick)
            if holder is None:
                return True
            presence = st.element(st.PRESENCE, {"from": f"{room.jid_str}/{nick}",
                                                "type": "unavailable"})
            x = st.child(presence, ns.q(MUC_USER, "x"))
            attrs = {"nick": nick, "affiliation": room.affiliation(holder), "role": "none"}
            if to_moderator or room.config.whois == "anyone":
                attrs["jid"] = str(holder)
            st.child(x, ns.q(MUC_USER, "item"), attrs)
        presence.set("to", str(sender))
        self._deliver([presence])
        return True

    def _left(self, room: Room, real: JID, out: list[Stanza]) -> None:
        self._deliver(out)
        rooms = self.joined.get(real)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self.joined[real]
        self._maybe_forget(room)

    def _maybe_forget(self, room: Room) -> None:
        if not room.occupants and not room.config.persistent and not room.destroyed:
            self.rooms.pop(room.jid, None)
            room.destroyed = True
            if self.archive is not None:
                self.server.router.spawn(self.archive.delete_owner(room.jid_str))
            log.info("event=muc-room-gone room=%s", room.jid_str)

    @hook("session-closed")
    def session_closed(self, session: Session, _reason: str) -> None:
        self._gone(session.jid)

    @hook("presence/unavailable")
    def went_unavailable(self, session: Session, _stanza: Stanza | None) -> None:
        self._gone(session.jid)

    def _gone(self, real: JID) -> None:
        for room in list(self.joined.get(real, ())):
            if real in room.by_jid:
                self._left(room, real, room.leave(real, None))
        self.joined.pop(real, None)

    # -- messages -----------------------------------------------------------------------------

    def _message(self, stanza: Stanza, sender: JID, to: JID) -> Any:
        type_ = stanza.get("type")
        room = self.rooms.get(to.bare)
        if type_ == "error":
            if room is not None and sender in room.by_jid and _delivery_failed(stanza):
                self._left(room, sender, room.leave(sender, _kicked(stanza), ("333",)))
            return True
        if room is None:
            raise StanzaError("item-not-found", "no such room")
        speaker = room.by_jid.get(sender)
        if speaker is not None:
            self._within_rate(speaker)
        if to.resource is None:
            if type_ == "groupchat":
                prepared = room.prepare(sender, stanza)
                if room.is_subject_change(stanza):
                    self._deliver(room.fan_out(prepared, str(uuid.uuid4())))
                    return self._save(room) if room.config.persistent else True
                if room.config.archive and self.archive is not None and \
                        room.is_historic(prepared):
                    return self._archive_and_send(room, prepared)
                self._deliver(room.fan_out(prepared, str(uuid.uuid4())))
                return True
            invite = stanza.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}invite")
            if invite is not None:
                return self._invite(room, sender, stanza, invite)
            decline = stanza.find(f"{{{MUC_USER}}}x/{{{MUC_USER}}}decline")
            if decline is not None:
                return self._decline(room, sender, decline)
            form = stanza.find(_FORM)
            if form is not None and (field_values(form).get("FORM_TYPE") or [""])[0] == REQUEST:
                return self._voice_request(room, sender, form)
            raise StanzaError("bad-request", "send groupchat messages to the room")
        if type_ == "groupchat":
            raise StanzaError("bad-request", "groupchat messages go to the room's bare JID")
        self._deliver(room.private(sender, _nickname(to.resource), stanza))
        return True

    async def _archive_and_send(self, room: Room, prepared: Stanza) -> None:
        """XEP-0313 on the room JID: the archive id is the message's stanza id."""
        nick = prepared.get("from", "").partition("/")[2]
        entry = ArchiveEntry(owner=room.jid_str, with_bare=room.jid_str, with_resource=nick,
                             outgoing=False, ts=time.time_ns() // 1000,
                             stanza=etree.tostring(prepared), account=False)
        assert self.archive is not None
        ids = await self.archive.append([entry])
        self._deliver(room.fan_out(prepared, ids[0] or str(uuid.uuid4())))

    async def _mam_query(self, room: Room, stanza: Stanza, sender: JID,
                         query: etree._Element) -> Stanza:
        archive = self.archive
        if not room.config.archive or archive is None:
            raise StanzaError("feature-not-implemented", "this room is not archived")
        affiliation = room.affiliation(sender)
        if affiliation == "outcast" or (room.config.members_only and affiliation == "none"):
            raise StanzaError("forbidden", "members only")
        q, flip = aq.parse_query(query, aq.MAM2, _MAX_PAGE)
        try:
            page = await archive.query(room.jid_str, q)
        except UnknownArchiveId as exc:
            raise StanzaError("item-not-found", f"no message {exc.args[0]!r}") from None
        queryid = query.get("queryid")
        items = list(reversed(page.items)) if flip else page.items
        self._deliver([aq.result_message(item.id, item.ts, item.stanza, aq.MAM2, queryid,
                                         str(sender), room.jid_str) for item in items])
        return st.result(stanza, aq.fin(page, aq.MAM2, queryid))

    async def _moderate(self, room: Room, stanza: Stanza, sender: JID,
                        moderate: etree._Element) -> Stanza:
        """XEP-0425: a moderator retracts a message for everyone. The room tells the
        occupants, forgets it from the history and archives the retraction."""
        actor = room.by_jid.get(sender)
        if actor is None or actor.role != "moderator":
            raise StanzaError("forbidden", "moderators only")
        if moderate.find(ns.q(RETRACT, "retract")) is None:
            raise StanzaError("bad-request", "only <retract/> is supported")
        target = moderate.get("id", "")
        if not target:
            raise StanzaError("bad-request", "which message?")
        original = room.forget_message(target)
        stanza_id = None
        if original is not None:
            found = original.find(ns.q(SID, "stanza-id"))
            stanza_id = found.get("id") if found is not None else None
        archive = self.archive
        if stanza_id is None and archive is not None and room.config.archive:
            page = await archive.query(room.jid_str, ArchiveQuery(ids=(target,), max=1))
            if page.items:
                stanza_id = page.items[0].id
                original = etree.fromstring(page.items[0].stanza)
        if stanza_id is None or original is None:
            raise StanzaError("item-not-found", "no such message")
        if original.find(ns.q(RETRACT, "retracted")) is not None:
            raise StanzaError("item-not-found", "that message was moderated already")
        author = original.find(ns.q(OCCUPANT_ID, "occupant-id"))
        notice = st.element(st.MESSAGE, {"type": "groupchat", "from": room.jid_str,
                                         "id": str(uuid.uuid4())})
        retract = st.child(notice, ns.q(RETRACT, "retract"), {"id": stanza_id})
        moderated = st.child(retract, ns.q(MODERATE, "moderated"),
                             {"by": f"{room.jid_str}/{actor.nick}"})
        # XEP-0425 §4: the moderator's occupant id (XEP-0421) in <moderated/>
        st.child(moderated, ns.q(OCCUPANT_ID, "occupant-id"), {"id": room.occupant_id(actor)})
        reason = moderate.findtext(ns.q(MODERATE, "reason"))
        if reason:
            st.child(retract, ns.q(RETRACT, "reason"), text=reason)
        # The same for clients of XEP-0425's first version (message-moderate:0 through an
        # XEP-0422 <apply-to/>), as Prosody sends it too; slixmpp's own tests read it.
        apply_to = st.child(notice, "{urn:xmpp:fasten:0}apply-to", {"id": stanza_id})
        old = st.child(apply_to, "{urn:xmpp:message-moderate:0}moderated",
                       {"by": f"{room.jid_str}/{actor.nick}"})
        st.child(old, "{urn:xmpp:message-retract:0}retract")
        if reason:
            st.child(old, "{urn:xmpp:message-moderate:0}reason", text=reason)
        if archive is not None and room.config.archive:
            await archive.append([ArchiveEntry(
                owner=room.jid_str, with_bare=room.jid_str, with_resource="", outgoing=False,
                ts=time.time_ns() // 1000, stanza=etree.tostring(notice), account=False)])
            tombstone = _tombstone(original, author, moderated, reason)
            await archive.replace(room.jid_str, stanza_id, etree.tostring(tombstone))
        out = []
        for occupant in room.occupants.values():
            for session in occupant.sessions:
                copy_ = copy.deepcopy(notice)
                copy_.set("to", str(session))
                out.append(copy_)
        self._deliver(out)
        return st.result(stanza)

    def _voice_request(self, room: Room, sender: JID, form: etree._Element) -> bool:
        """XEP-0045 §7.13: a visitor asks for voice; §8.6: the moderators get the muc#request
        form, and one who submits it with muc#request_allow true makes the visitor a
        participant."""
        occupant = room.by_jid.get(sender)
        if occupant is None:
            raise StanzaError("not-acceptable", "you are not in this room")
        values = field_values(form)
        if "muc#request_allow" in values:
            if occupant.role != "moderator":
                raise StanzaError("forbidden", "moderators decide on voice requests")
            if form.get("type") == "cancel" or not _is_true(values["muc#request_allow"]):
                return True  # §8.6: declined (or skipped); the visitor is not told
            nick = (values.get("muc#roomnick") or [""])[0]
            target = room.occupants.get(nick) if nick else None
            if target is None and values.get("muc#jid"):
                try:
                    target = room.by_jid.get(JID.parse(values["muc#jid"][0]))
                except InvalidJID:
                    raise StanzaError("jid-malformed", "muc#jid") from None
            if target is None:
                raise StanzaError("item-not-found", "no such occupant")
            if target.role == "visitor":
                target.role = "participant"
                self._deliver(room.broadcast_presence(target, actor=occupant.nick))
            return True
        if occupant.role != "visitor":
            return True  # voice already: nothing to ask for
        if (values.get("muc#role") or ["participant"])[0] != "participant":
            raise StanzaError("not-acceptable", "only voice (the participant role) is granted")
        out = []
        for moderator in room.occupants.values():
            if moderator.role != "moderator":
                continue
            for session in moderator.sessions:
                out.append(self._voice_form(room, occupant, sender, str(session)))
        self._deliver(out)
        return True

    @staticmethod
    def _voice_form(room: Room, occupant: Occupant, real: JID, to: str) -> Stanza:
        """XEP-0045 §8.6 (example 90): the approval form a moderator gets."""
        message = st.element(st.MESSAGE, {"from": room.jid_str, "to": to,
                                          "id": str(uuid.uuid4())})
        x = st.child(message, _FORM, {"type": "form"})
        st.child(x, ns.q(ns.DATA_FORMS, "title"), text="Voice request")
        st.child(x, ns.q(ns.DATA_FORMS, "instructions"),
                 text="To approve this request for voice, select the 'Grant voice to this "
                      "person?' checkbox and submit the form.")
        for var, kind, label, value in (
                ("FORM_TYPE", "hidden", None, REQUEST),
                ("muc#role", "list-single", "Requested role", "participant"),
                ("muc#jid", "jid-single", "User ID", str(real)),
                ("muc#roomnick", "text-single", "Room Nickname", occupant.nick),
                ("muc#request_allow", "boolean", "Grant voice to this person?", "false")):
            attrs = {"var": var, "type": kind}
            if label is not None:
                attrs["label"] = label
            el = st.child(x, ns.q(ns.DATA_FORMS, "field"), attrs)
            st.child(el, ns.q(ns.DATA_FORMS, "value"), text=value)
        return message

    def _invite(self, room: Room, sender: JID, stanza: Stanza, invite: etree._Element) -> Any:
        """Mediated invitation (XEP-0045 §7.8.2): the room passes it on."""
        occupant = room.by_jid.get(sender)
        if occupant is None:
            raise StanzaError("not-acceptable", "you are not in this room")
        if not room.config.allow_invites and occupant.role != "moderator" and \
                room.affiliation(sender) not in ("owner", "admin"):
            raise StanzaError("forbidden", "invitations are not allowed here")
        try:
            invitee = JID.parse(invite.get("to", ""))
        except InvalidJID:
            raise StanzaError("jid-malformed", "invite whom?") from None
        if room.config.members_only and room.affiliation(invitee) in ("none",):
            room.set_affiliation(invitee, "member")
        message = st.element(st.MESSAGE, {"from": room.jid_str, "to": str(invitee)})
        if stanza.get("id") is not None:
            message.set("id", stanza.get("id", ""))
        x = st.child(message, ns.q(MUC_USER, "x"))
        # From the inviter's occupant JID in a semi-anonymous room (its real JID stays
        # hidden, as Prosody does), its bare JID where everyone sees JIDs.
        inviter = str(sender.bare) if room.config.whois == "anyone" else \
            f"{room.jid_str}/{occupant.nick}"
        forwarded = st.child(x, ns.q(MUC_USER, "invite"), {"from": inviter})
        st.child(forwarded, ns.q(MUC_USER, "reason"),
                 text=invite.findtext(ns.q(MUC_USER, "reason")) or None)
        if room.config.password:
            st.child(x, ns.q(MUC_USER, "password"), text=room.config.password)
        # For clients without mediated invitations: a body, and XEP-0249's element.
        st.child(message, st.BODY, text=f"{inviter} invited you to the room {room.jid_str}")
        direct = {"jid": room.jid_str}
        if room.config.password:
            direct["password"] = room.config.password
        st.child(message, "{jabber:x:conference}x", direct)
        self._deliver([message])
        return self._save(room) if room.config.persistent else True

    def _decline(self, room: Room, sender: JID, decline: etree._Element) -> bool:
        """XEP-0045 §7.8.2: the invitee declines; the room tells the inviter."""
        try:
            inviter = JID.parse(decline.get("to", ""))
        except InvalidJID:
            raise StanzaError("jid-malformed", "decline to whom?") from None
        message = st.element(st.MESSAGE, {"from": room.jid_str, "to": str(inviter)})
        x = st.child(message, ns.q(MUC_USER, "x"))
        forwarded = st.child(x, ns.q(MUC_USER, "decline"), {"from": str(sender.bare)})
        reason = decline.findtext(ns.q(MUC_USER, "reason"))
        if reason:
            st.child(forwarded, ns.q(MUC_USER, "reason"), text=reason)
        self._deliver([message])
        return True

    # -- iqs ----------------------------------------------------------------------------------

    def _iq(self, stanza: Stanza, sender: JID, to: JID) -> Any:
        type_ = stanza.get("type")
        if type_ not in ("get", "set"):
            if to.resource is not None:
                self._relayed_response(stanza, sender, to)
            return True
        payload = st.payload(stanza)
        if payload is None:
            raise StanzaError("bad-request", "one payload element")
        room = self.rooms.get(to.bare)
        if to.resource is not None:
            nick = _nickname(to.resource)
            # XEP-0410: a ping to one's own occupant JID says whether one is still joined
            if room is None or sender not in room.by_jid:
                raise StanzaError("not-acceptable", "you are not in this room")
            target = room.occupants.get(nick)
            if target is None:
                raise StanzaError("item-not-found", "no such occupant")
            if payload.tag == _PING and target is room.by_jid[sender]:
                return st.result(stanza)
            return self._relay_iq(room, stanza, room.by_jid[sender], target)
        if room is None:
            raise StanzaError("item-not-found", "no such room")
        tag = payload.tag
        if type_ == "get" and tag == _INFO and payload.get("node") is None:
            return self._room_info(room, stanza)
        if type_ == "get" and tag == _INFO and payload.get("node") == "x-roomuser-item":
            # XEP-0045 §7.12: the nickname the asker registered here, if any
            query = st.element(_INFO, {"node": "x-roomuser-item"})
            registered = room.nicks.get(sender.bare)
            if registered is not None:
                st.child(query, ns.q(ns.DISCO_INFO, "identity"),
                         {"category": "conference", "type": "text", "name": registered})
            return st.result(stanza, query)
        if tag == _REGISTER:
            return self._register(room, stanza, sender, payload, type_)
        if type_ == "get" and tag == _ITEMS:
            return st.result(stanza, st.element(_ITEMS))
        if type_ == "get" and tag == _PING:
            return st.result(stanza)
        if type_ == "set" and tag == _MODERATE:
            return self._moderate(room, stanza, sender, payload)
        if type_ == "get" and tag == _MAM_QUERY and room.config.archive:
            return st.result(stanza, aq.form(aq.MAM2))  # XEP-0313 §4.1.1: the fields
        if type_ == "set" and tag == _MAM_QUERY:
            return self._mam_query(room, stanza, sender, payload)
        if tag == _OWNER_QUERY:
            return self._owner(room, stanza, sender, payload, type_)
        if tag == _ADMIN_QUERY:
            return self._admin(room, stanza, sender, payload, type_)
        raise StanzaError("service-unavailable")

    def _register(self, room: Room, stanza: Stanza, sender: JID, query: etree._Element,
                  type_: str) -> Any:
        """XEP-0045 §7.10: registering a nickname with the room makes one a member."""
        bare = sender.bare
        affiliation = room.affiliation(bare)
        if affiliation == "outcast":
            raise StanzaError("forbidden", "you are banned from this room")
        if type_ == "get":
            reply = st.element(_REGISTER)
            nick = room.nicks.get(bare)
            if nick is not None:
                st.child(reply, ns.q(REGISTER, "registered"))
                st.child(reply, ns.q(REGISTER, "username"), text=nick)
                return st.result(stanza, reply)
            if room.config.members_only and affiliation == "none":
                raise StanzaError("registration-required", "members only")
            x = st.child(reply, _FORM, {"type": "form"})
            hidden = st.child(x, ns.q(ns.DATA_FORMS, "field"),
                              {"var": "FORM_TYPE", "type": "hidden"})
            st.child(hidden, ns.q(ns.DATA_FORMS, "value"), text=MUC + "#register")
            nick_field = st.child(x, ns.q(ns.DATA_FORMS, "field"), {
                "var": "muc#register_roomnick", "type": "text-single", "label": "Nickname"})
            st.child(nick_field, ns.q(ns.DATA_FORMS, "required"))
            return st.result(stanza, reply)
        if query.find(ns.q(REGISTER, "remove")) is not None:
            if bare not in room.nicks and affiliation == "none":
                raise StanzaError("item-not-found", "not registered")
            if affiliation == "owner" and room.owners() == [bare]:
                raise StanzaError("conflict", "a room keeps at least one owner")
            self._set_affiliation(room, bare, "none", None, None)
        else:
            form = query.find(_FORM)
            values = field_values(form) if form is not None else {}
            given = (values.get("muc#register_roomnick") or [""])[0]
            if not given:
                raise StanzaError("not-acceptable", "a nickname is needed")
            nick = _nickname(given)
            holder = room.nick_owner(nick)
            present = room.occupants.get(nick)
            if (holder not in (None, bare)) or (present is not None and present.jid != bare):
                raise StanzaError("conflict", "that nickname is taken")
            if room.config.members_only and affiliation == "none":
                raise StanzaError("registration-required", "members only")
            if affiliation == "none":
                self._set_affiliation(room, bare, "member", None, None)
            else:
                # already affiliated: the occupant's presence goes out again all the same, as
                # after any affiliation change (Prosody, muc_register)
                for occupant in room.occupants.values():
                    if occupant.jid == bare:
                        self._deliver(room.broadcast_presence(occupant))
            room.nicks[bare] = nick

        async def save() -> Stanza:
            await self._save(room)
            return st.result(stanza)
        return save()

    def _relay_iq(self, room: Room, stanza: Stanza, sender: Occupant, target: Occupant) -> bool:
        """XEP-0045 §7.5 (vCards, version, pings, caps of occupants): an iq to room/nick goes
        to that occupant's latest session, from the sender's occupant JID, with an id of ours
        that maps its answer back."""
        real = next(reversed(target.sessions))
        relay_id = "muc-" + uuid.uuid4().hex
        first = next(iter(sender.sessions))
        original = stanza.get("from", str(first))
        self.relayed[relay_id] = (original, stanza.get("id", ""), real, room.jid, target.nick)
        while len(self.relayed) > _MAX_RELAYED:
            self.relayed.pop(next(iter(self.relayed)))
        forwarded = copy.deepcopy(stanza)
        forwarded.set("from", f"{room.jid_str}/{sender.nick}")
        forwarded.set("to", str(real))
        forwarded.set("id", relay_id)
        self._deliver([forwarded])
        return True

    def _relayed_response(self, stanza: Stanza, sender: JID, to: JID) -> None:
        pending = self.relayed.get(stanza.get("id", ""))
        if pending is None or pending[2] != sender or pending[3] != to.bare:
            return
        del self.relayed[stanza.get("id", "")]
        original, original_id, _real, room, nick = pending
        answer = copy.deepcopy(stanza)
        answer.set("from", f"{room}/{nick}")
        answer.set("to", original)
        answer.set("id", original_id)
        self._deliver([answer])

    def _room_info(self, room: Room, stanza: Stanza) -> Stanza:
        query = st.element(_INFO)
        st.child(query, ns.q(ns.DISCO_INFO, "identity"),
                 {"category": "conference", "type": "text",
                  "name": room.config.name or room.jid.local or ""})
        for feature in room.features():
            if feature == aq.MAM2 and self.archive is None:
                continue
            st.child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
        query.append(room.info_form())
        return st.result(stanza, query)

    def _owner(self, room: Room, stanza: Stanza, sender: JID, query: etree._Element,
               type_: str) -> Any:
        if room.affiliation(sender) != "owner":
            raise StanzaError("forbidden", "only owners configure the room")
        if type_ == "get":
            reply = st.element(_OWNER_QUERY)
            reply.append(config_form(room.config, room.jid))
            return st.result(stanza, reply)
        destroy = query.find(ns.q(MUC_OWNER, "destroy"))
        if destroy is not None:
            return self._destroy(room, stanza, destroy)
        form = query.find(_FORM)
        if form is None:
            raise StanzaError("bad-request", "a form or <destroy/>")
        kind = form.get("type")
        if kind == "cancel":
            return st.result(stanza)
        if kind != "submit":
            raise StanzaError("bad-request", "submit or cancel the form")
        values = field_values(form)
        form_type = values.get("FORM_TYPE")
        if form_type and form_type[0] != MUC + "#roomconfig":
            raise StanzaError("bad-request", "not a muc#roomconfig form")
        before = room.config
        config = apply_form(before, form, self.config.max_history_length)
        cap = self.config.max_occupants
        if cap and config.max_users > cap:
            config = replace(config, max_users=cap)  # the room may lower the limit, not raise it
        room.set_config(config)
        # What occupants are told goes out after the owner's answer (in Prosody's order).
        later: list[Stanza] = []
        # (Turning moderation off leaves visitors visitors, as in Prosody,
        # muc_nickname_change: a moderator gives them voice; newcomers are participants.)
        if config.members_only and not before.members_only:
            for occupant in list(room.occupants.values()):
                if occupant.affiliation == "none":
                    later += room.remove(occupant, ("322",))
                    self._forget_sessions(room, occupant)
        # XEP-0045 §10.2.1: occupants hear of changes (status 104; 172/173 when whois changed).
        # As Prosody does: not of the first configuration of a new room unless it touches
        # privacy, and after the owner has the answer.
        first, room.fresh = room.fresh, False
        codes: list[str] = []
        if before.whois != config.whois:
            codes = ["104", "172" if config.whois == "anyone" else "173"]
        elif before != config and not first:
            codes = ["104"]
        notices = (self._status_message(room, tuple(codes)) if codes else []) + later

        async def save() -> Stanza:
            if config.persistent or before.persistent:
                await self._save(room)
            self._maybe_forget(room)
            if notices:
                asyncio.get_running_loop().call_soon(self._deliver, notices)
            return st.result(stanza)
        return save()

    def _status_message(self, room: Room, codes: tuple[str, ...]) -> list[Stanza]:
        out = []
        for occupant in room.occupants.values():
            for session in occupant.sessions:
                message = st.element(st.MESSAGE, {"type": "groupchat", "from": room.jid_str,
                                                  "to": str(session)})
                x = st.child(message, ns.q(MUC_USER, "x"))
                for code in codes:
                    st.child(x, ns.q(MUC_USER, "status"), {"code": code})
                out.append(message)
        return out

    def _forget_sessions(self, room: Room, occupant: Occupant) -> None:
        for real in occupant.sessions:
            rooms = self.joined.get(real)
            if rooms is not None:
                rooms.discard(room)
                if not rooms:
                    del self.joined[real]

    def _destroy(self, room: Room, stanza: Stanza, destroy: etree._Element) -> Any:
        venue = destroy.get("jid")
        reason = destroy.findtext(ns.q(MUC_OWNER, "reason"))
        for occupant in room.occupants.values():
            self._forget_sessions(room, occupant)
        self._deliver(room.destroy(reason, venue))
        self.rooms.pop(room.jid, None)
        log.info("event=muc-room-destroyed room=%s", room.jid_str)

        async def forget() -> Stanza:
            await self.store.delete(room.jid_str)
            if self.archive is not None:
                await self.archive.delete_owner(room.jid_str)
            return st.result(stanza)
        return forget()

    # -- muc#admin: affiliations and roles (XEP-0045 §8, §9) ------------------------------------

    def _admin(self, room: Room, stanza: Stanza, sender: JID, query: etree._Element,
               type_: str) -> Any:
        items = query.findall(ns.q(MUC_ADMIN, "item"))
        if not items:
            raise StanzaError("bad-request", "no <item/>")
        mine = room.affiliation(sender)
        actor = room.by_jid.get(sender)
        if type_ == "get":
            reply = st.element(_ADMIN_QUERY)
            for item in items:
                if item.get("affiliation") in AFFILIATIONS:
                    # admins; members too where everyone sees JIDs anyway (as Prosody
                    # allows it, muc_whois_anyone_member; XEP-0045 §9.5 lets the room choose)
                    if mine not in ("owner", "admin") and not (
                            mine == "member" and room.config.whois == "anyone"):
                        raise StanzaError("forbidden", "admins only")
                    wanted = item.get("affiliation")
                    for jid, aff in sorted(room.affiliations.items(), key=lambda p: str(p[0])):
                        if aff == wanted:
                            # XEP-0045 §9.5: by bare JID; the registered nick, if any (not
                            # the occupant's nick and role: Prosody's scripts expect none)
                            attrs = {"affiliation": aff, "jid": str(jid)}
                            if jid in room.nicks:
                                attrs["nick"] = room.nicks[jid]
                            st.child(reply, ns.q(MUC_ADMIN, "item"), attrs)
                elif item.get("role") in ROLES:
                    if actor is None or actor.role != "moderator":
                        raise StanzaError("forbidden", "moderators only")
                    for occupant in room.occupants.values():
                        if occupant.role == item.get("role"):
                            st.child(reply, ns.q(MUC_ADMIN, "item"), {
                                "affiliation": occupant.affiliation, "role": occupant.role,
                                "nick": occupant.nick, "jid": str(occupant.jid)})
                else:
                    raise StanzaError("bad-request", "an affiliation or a role")
            return st.result(stanza, reply)
        # Check every item before changing anything (§9.5: all or nothing).
        changes: list[tuple[str, Any, str, str | None]] = []
        reserve: list[tuple[JID, str]] = []
        for item in items:
            reason = item.findtext(ns.q(MUC_ADMIN, "reason"))
            affiliation = item.get("affiliation")
            role = item.get("role")
            if affiliation is not None:
                if affiliation not in AFFILIATIONS:
                    raise StanzaError("bad-request", "no such affiliation")
                target: Any
                if item.get("jid"):
                    try:
                        target = JID.parse(item.get("jid", "")).bare
                    except InvalidJID:
                        raise StanzaError("jid-malformed", "bad jid") from None
                elif item.get("nick") in room.occupants:
                    target = room.occupants[item.get("nick", "")].jid
                else:
                    raise StanzaError("bad-request", "whose affiliation?")
                current = room.affiliation(target)
                if mine not in ("owner", "admin"):
                    raise StanzaError("forbidden", "admins only")
                if mine != "owner" and (current in ("owner", "admin") or
                                        affiliation in ("owner", "admin")):
                    raise StanzaError("not-allowed", "only owners change owners and admins")
                if current == "owner" and affiliation != "owner" and \
                        room.owners() == [target]:
                    raise StanzaError("conflict", "a room keeps at least one owner")
                changes.append(("affiliation", target, affiliation, reason))
                if item.get("jid") and item.get("nick") and affiliation not in ("none",
                                                                                 "outcast"):
                    # a nick given with the JID is reserved for it (as muc#register does)
                    nick = _nickname(item.get("nick", ""))
                    if room.nick_owner(nick) not in (None, target):
                        raise StanzaError("conflict", "that nickname is registered already")
                    reserve.append((target, nick))
            elif role is not None:
                if role not in ROLES:
                    raise StanzaError("bad-request", "no such role")
                found = room.occupants.get(item.get("nick", ""))
                if found is None:
                    raise StanzaError("item-not-found", "no such occupant")
                if actor is None or actor.role != "moderator":
                    raise StanzaError("forbidden", "moderators only")
                if found.affiliation in ("owner", "admin") and role != "moderator" and \
                        mine != "owner":
                    raise StanzaError("not-allowed", "admins and owners cannot be kicked")
                if found.affiliation == "owner" and role != "moderator":
                    raise StanzaError("not-allowed", "owners cannot lose moderation")
                if role == "moderator" and mine not in ("owner", "admin"):
                    raise StanzaError("forbidden", "admins grant moderation")
                changes.append(("role", found, role, reason))
            else:
                raise StanzaError("bad-request", "an affiliation or a role")
        # <actor/>: the nick, and the real JID for those who may see it (as Prosody sends it)
        by = (actor.nick if actor is not None else None, str(sender))
        for kind, target, value, reason in changes:
            if kind == "role":
                occupant = target
                if occupant.nick not in room.occupants:
                    continue
                if value == "none":
                    self._forget_sessions(room, occupant)
                    self._deliver(room.remove(occupant, ("307",), reason=reason,
                                              actor=by[0], actor_jid=by[1]))
                else:
                    occupant.role = value
                    self._deliver(room.broadcast_presence(occupant, reason=reason,
                                                          actor=by[0], actor_jid=by[1]))
            else:
                for jid, nick in reserve:
                    holder = room.occupants.get(nick)
                    if jid == target and holder is not None and holder.jid != jid:
                        # someone else in the room under the nick now reserved: out it goes
                        # (status 307, as Prosody does it, muc_register)
                        self._forget_sessions(room, holder)
                        self._deliver(room.remove(holder, ("307",),
                                                  reason="This nickname is reserved"))
                self._set_affiliation(room, target, value, reason, by)
        for jid, nick in reserve:
            room.nicks[jid] = nick

        async def save() -> Stanza:
            if any(kind == "affiliation" for kind, *_ in changes):
                await self._save(room)
            self._maybe_forget(room)
            return st.result(stanza)
        return save()

    def _set_affiliation(self, room: Room, target: JID, affiliation: str, reason: str | None,
                         by: tuple[str | None, str | None] | None) -> None:
        """by: the actor's nick and real JID, when someone did it."""
        by = by or (None, None)
        room.set_affiliation(target, affiliation, reason)
        present = [o for o in room.occupants.values() if o.jid == target]
        for occupant in present:
            occupant.affiliation = affiliation
            if affiliation == "outcast":
                self._forget_sessions(room, occupant)
                self._deliver(room.remove(occupant, ("301",), reason=reason, actor=by[0],
                                          actor_jid=by[1]))
            elif room.config.members_only and affiliation == "none":
                self._forget_sessions(room, occupant)
                self._deliver(room.remove(occupant, ("321",), reason=reason, actor=by[0],
                                          actor_jid=by[1]))
            else:
                occupant.role = room.default_role(affiliation) if (
                    occupant.role != "moderator" or affiliation not in ("owner", "admin")
                ) else occupant.role
                self._deliver(room.broadcast_presence(occupant, reason=reason, actor=by[0],
                                                      actor_jid=by[1]))
        if not present:
            # XEP-0045 §9.3, §9.4: occupants hear of a change of someone not in the room:
            # those who may see JIDs (a notice without the JID says nothing; Prosody sends
            # none, muc_affiliation_notify)
            notice = st.element(st.MESSAGE, {"from": room.jid_str})
            x = st.child(notice, ns.q(MUC_USER, "x"))
            st.child(x, ns.q(MUC_USER, "item"), {"affiliation": affiliation, "jid": str(target)})
            self._deliver(addressed_copies(notice, [
                str(session) for occupant in room.occupants.values()
                if occupant.role == "moderator" or room.config.whois == "anyone"
                for session in occupant.sessions]))


__all__ = ["Muc", "MucSettings"]
