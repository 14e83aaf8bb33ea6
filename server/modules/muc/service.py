"""The MUC service: rooms made on first join and restored at start, joins and leaves,
presence and messages routed to rooms, iqs to rooms and relayed to occupants, limits."""

from __future__ import annotations

import asyncio
import copy
import inspect
import time
import uuid
from typing import Any

from lxml import etree

from server import events
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Handler, Stanza, hook, iq_get
from server.modules.muc.archive import Archive
from server.modules.muc.base import _error, _errors_later, log
from server.modules.muc.invite import Invitations
from server.modules.muc.nicknames import nickname
from server.modules.muc.room import (
    MUC_USER,
    Occupant,
    Room,
    RoomConfig,
    field_values,
)
from server.modules.muc.voice import REQUEST, Voice
from server.services import ServiceHost
from server.sessions import Session
from server.storage.keystore import shared_secret
from server.storage.muc import StoredRoom
from server.xml import ns
from server.xml import stanza as st

_PING = ns.q(ns.PING, "ping")
_INFO = ns.q(ns.DISCO_INFO, "query")
_ITEMS = ns.q(ns.DISCO_ITEMS, "query")
_FORM = ns.q(ns.DATA_FORMS, "x")
_MAX_RELAYED = 10000  # iqs relayed to occupants and not answered yet, at most


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


class Service(Archive, Invitations, Voice):
    """Joins, routing and the rest of what is not an owner's, admin's or moderator's."""

    identity = ("conference", "text")
    display_name = "Chatrooms"

    async def start(self) -> None:
        if not self.config.enabled:
            return
        # XEP-0421: the same ids after a restart and on every node of a cluster; the key file
        # of an older version is imported once (server/storage/keystore.py).
        self.id_key = await shared_secret(
            self.server.storage.secrets, "muc-occupant-id",
            legacy=self.server.config.data_dir / "muc-occupant-id.key")
        route = self.route
        cluster = self.server.cluster
        if cluster is not None:
            # [cluster]: each room on one node, loaded there when it is claimed (cluster.py)
            from server.modules.muc.cluster import PlacedRooms
            self.placed = PlacedRooms(self, cluster)
            route = self.placed.route
        components = set(self.server.config.components)
        for domain in self.server.config.domains:
            service = f"{self.config.subdomain}.{domain}"
            if service in components:
                continue  # an external component serves that domain
            self.services.add(service)
            if self.placed is None:
                for stored in await self.store.load(service):
                    room = self._restore(stored)
                    await self._restore_history(room)
                    self.rooms[room.jid] = room
            self.server.add_service(ServiceHost(service, domain, self.display_name), route)

    @hook(events.SERVER_STOPPING)
    def stopping(self, _server: Any) -> Any:
        # Occupants are told the service is going away (status 332, XEP-0045 §17.5... §7.2)
        # first thing in a graceful stop, while their streams (c2s, and s2s to the servers of
        # remote occupants) are still open: stop() comes after they are closed.
        if self.placed is not None:
            # [cluster]: the rooms go to other nodes instead, before the streams close.
            return self.placed.stopping()
        self.close_rooms()
        return None

    def close_rooms(self) -> None:
        """The service goes away: every occupant told so (332)."""
        for room in list(self.rooms.values()):
            for occupant in list(room.occupants.values()):
                self._deliver(room.remove(occupant, ("332",)))
        self.joined.clear()

    async def stop(self) -> None:
        if self.placed is not None:
            await self.placed.stopping()  # done already when the server stopped
            await self.placed.stop()
        else:
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

    def items(self, stanza: Stanza, _origin: Session | None) -> Any:
        if stanza[0].get("node") is not None:
            raise StanzaError("item-not-found", "no such node")
        if self.placed is not None:
            return self.placed.items(stanza)  # [cluster]: every node's rooms
        service = stanza.get("to", "")
        return self.items_result(stanza, [
            (room.jid_str, room.config.name or jid.local or "")
            for jid, room in sorted(self.rooms.items(), key=lambda item: str(item[0]))
            if jid.domain == service and room.config.public])

    @staticmethod
    def items_result(stanza: Stanza, rooms: list[tuple[str, str]]) -> Stanza:
        """The disco#items result listing these (room JID, name)."""
        query = st.element(_ITEMS)
        for jid, name in rooms:
            st.child(query, ns.q(ns.DISCO_ITEMS, "item"), {"jid": jid, "name": name})
        return st.result(stanza, query)

    # -- iqs to the service and to rooms (the parts declare theirs) ------------------------------

    def call_iq(self, handler: Handler, stanza: Stanza, origin: Session | None,
                to: JID) -> Any:
        """A declared handler of an iq to the service or to a room: for a room, only once it
        is known to exist, and with its errors from the room (see _error)."""
        if to.local is None:
            return handler(stanza, origin, to)
        try:
            JID.parse(stanza.get("from", ""))
        except InvalidJID:
            return True
        try:
            if to.bare not in self.rooms:
                raise StanzaError("item-not-found", "no such room")
            result = handler(stanza, origin, to)
        except StanzaError as err:
            return _error(stanza, err, to)
        if inspect.isawaitable(result):
            return _errors_later(result, stanza, to)
        return result

    @iq_get(ns.PING, "ping", to=("service", "service-bare"))
    def ping(self, stanza: Stanza, _origin: Session | None, _to: JID) -> Stanza:
        return st.result(stanza)

    @iq_get(ns.DISCO_ITEMS, "query", to="service-bare")
    def room_items(self, stanza: Stanza, _origin: Session | None, _to: JID) -> Stanza:
        return st.result(stanza, st.element(_ITEMS))

    @iq_get(ns.DISCO_INFO, "query", to="service-bare")
    def room_info(self, stanza: Stanza, _origin: Session | None, to: JID) -> Stanza:
        room, sender, query = self.room_iq(stanza, to)
        node = query.get("node")
        if node is None:
            return self._room_info(room, stanza)
        if node == "x-roomuser-item":
            # XEP-0045 §7.12: the nickname the asker registered here, if any
            reply = st.element(_INFO, {"node": "x-roomuser-item"})
            registered = room.nicks.get(sender.bare)
            if registered is not None:
                st.child(reply, ns.q(ns.DISCO_INFO, "identity"),
                         {"category": "conference", "type": "text", "name": registered})
            return st.result(stanza, reply)
        raise StanzaError("service-unavailable")

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if to.local is None:
            if stanza.tag == st.IQ and stanza.get("type") in ("get", "set"):
                return None  # none of the declared handlers took it: service-unavailable
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
        if self.placed is not None:  # [cluster]: and those on the other nodes
            owned += self.placed.owned_elsewhere.get(bare, 0)
        if owned >= limit:
            raise StanzaError("resource-constraint", f"you own {owned} rooms already")

    def _within_rate(self, occupant: Occupant) -> None:
        """[muc] message_rate, message_burst: a token bucket per occupant; a message over it
        is refused with <resource-constraint/> (RFC 6120 §8.3.3.18, type wait), not dropped."""
        rate = self.config.message_rate
        if rate and not occupant.messages.take(rate, self.config.message_burst,
                                               time.monotonic()):
            raise StanzaError("resource-constraint", "you are sending too fast; wait a moment")

    def _check_rooms_joined(self, sender: JID, room: Room | None) -> None:
        """[muc] max_rooms_joined: the rooms one account is in at once, all its sessions
        together (admins of the server excepted); one more join is refused."""
        limit = self.config.max_rooms_joined
        if not limit or str(sender.bare) in self.server.config.admins:
            return
        bare = sender.bare
        rooms = {r for real, joined in self.joined.items() if real.bare == bare for r in joined}
        if room not in rooms and len(rooms) >= limit:
            log.info("event=muc-join-refused reason=max-rooms-joined account=%s rooms=%d",
                     bare, len(rooms))
            raise StanzaError("resource-constraint", f"you are in {len(rooms)} rooms already")

    def _presence_update(self, room: Room, occupant: Occupant, real: JID,
                         presence: Stanza) -> None:
        """A presence update of an occupant (status, show): broadcast within [muc]
        presence_rate/presence_burst. One over the rate is kept as the occupant's current
        presence (joiners and probes see it) but not broadcast; the latest then goes out once
        the rate allows, so a flood costs the others one presence per interval. XEP-0045
        §7.7 asks for no answer to an update, and an error presence from its own occupant
        JID would tell the client it had left the room (§7.2.6), so nothing is answered."""
        rate = self.config.presence_rate
        if not rate or occupant.presences.take(rate, self.config.presence_burst,
                                               time.monotonic()):
            self._deliver(room.update_presence(real, presence))
            return
        # (A rejoin presence, <x xmlns='muc'/> from a session already in, held too: the
        # flush sends the others its presence; the session asked for nothing else it needs.)
        occupant.sessions[real] = presence
        key = id(occupant)
        if key in self._held:
            return
        self._held.add(key)
        log.info("event=muc-presence-held room=%s nick=%s", room.jid_str, occupant.nick)

        def flush() -> None:
            self._held.discard(key)
            if room.occupant(occupant.nick) is not occupant or room.destroyed:
                return
            occupant.presences.take(rate, self.config.presence_burst, time.monotonic())
            self._deliver(room.broadcast_presence(occupant))
        asyncio.get_running_loop().call_later(occupant.presences.wait(rate), flush)

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
        nick = nickname(to.resource)
        if sender not in (room.by_jid if room is not None else ()):
            self._check_rooms_joined(sender, room)
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
                self._presence_update(room, occupant, sender, st.standalone(stanza))
                return True
            rate = self.config.presence_rate
            if rate and not occupant.presences.take(rate, self.config.presence_burst,
                                                    time.monotonic()):
                # A nick change over the rate is refused (XEP-0045 §7.6: the occupant stays
                # under its nick and is told), not broadcast.
                raise StanzaError("resource-constraint", "too many presence changes; wait")
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
        nick = nickname(to.resource)
        asker = room.by_jid[sender]
        to_moderator = asker.role == "moderator"
        target = room.occupant(nick)
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

    @hook(events.SESSION_CLOSED)
    def session_closed(self, session: Session, _reason: str) -> None:
        self._gone(session.jid)

    @hook(events.PRESENCE_UNAVAILABLE)
    def went_unavailable(self, session: Session, _stanza: Stanza | None) -> None:
        self._gone(session.jid)

    def _gone(self, real: JID) -> None:
        for room in list(self.joined.get(real, ())):
            if real in room.by_jid:
                self._left(room, real, room.leave(real, None))
        self.joined.pop(real, None)
        if self.placed is not None:
            self.placed.gone(real)  # rooms on other nodes

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
                if room.config.archive and room.is_historic(prepared):
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
        self._deliver(room.private(sender, nickname(to.resource), stanza))
        return True

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
            nick = nickname(to.resource)
            # XEP-0410: a ping to one's own occupant JID says whether one is still joined
            if room is None or sender not in room.by_jid:
                raise StanzaError("not-acceptable", "you are not in this room")
            target = room.occupant(nick)
            if target is None:
                raise StanzaError("item-not-found", "no such occupant")
            if payload.tag == _PING and target is room.by_jid[sender]:
                return st.result(stanza)
            return self._relay_iq(room, stanza, room.by_jid[sender], target)
        if room is None:
            raise StanzaError("item-not-found", "no such room")
        # The iqs to the room itself are the parts' declared handlers (call_iq): none took it.
        raise StanzaError("service-unavailable")

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
            st.child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
        query.append(room.info_form())
        return st.result(stanza, query)
