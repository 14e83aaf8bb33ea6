"""The MUC service in a cluster ([cluster]; only imported then): every room lives on one node
(server/cluster/placement.py places it), whatever node its occupants are on.

- Stanzas for a room go to its owner; the room's output reaches occupants on other nodes
  through the session directory and the nodes' inboxes, like any stanza to a user.
- The owner mirrors each room's occupants in Redis (presenced:room-state:<room>): nick,
  affiliation, role, and per session its real JID, the incarnation of the node it came through
  and its presence; and the config, subject and affiliations of a room that is not persistent
  (a persistent one's are in the database).
- When a node dies, the owner of each room removes the occupants whose sessions were on it,
  telling the others with status code 333 (XEP-0045 §9.8 / the status codes registry: "the
  user is being removed from the room because of a technical problem", as when an occupant's
  session answers with a delivery error). The rooms the dead node owned move to the survivor
  the hashing picks, which rebuilds each from the database (persistent config), the archive
  (history, XEP-0313) and the mirror (occupants), removes the dead node's occupants the same
  way, and keeps everyone else joined without a word (they have the room already).
- A node that stops gracefully hands its rooms over before its streams close: each room's
  state goes to the mirror, its claim to the node the hashing picks among the others, which
  takes it over at once (placement.hand_over); occupants on other nodes stay joined without a
  word, those on the stopping node leave as their sessions end (plain unavailable presence,
  through the room's new node). A node fenced out of the cluster drops its rooms silently
  (its client streams were closed; the rooms are re-claimed elsewhere).

Occupants from other servers are not tied to a node (their server reaches the room through
whichever node it talks to): a node's death does not remove them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.cluster import keys
from server.cluster.placement import Placement
from server.jid import JID, InvalidJID
from server.modules.muc.room import Occupant, Room, RoomConfig, nick_key
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.cluster import Cluster
    from server.modules.muc.service import Service
    from server.sessions import Session

log = logging.getLogger("presenced.muc")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_SUBJECT = "{jabber:client}subject"
_HAND_OVER = 10.0  # seconds a graceful stop gives its rooms' hand-over at most


class PlacedRooms:
    """The placement host of the MUC service (placement.Host)."""

    def __init__(self, muc: Service, cluster: Cluster) -> None:
        self.muc = muc
        self.redis = cluster.redis
        self.membership = cluster.membership
        self.hosts = muc.server.router.hosts
        self.placement = Placement(cluster, "room", self)
        cluster.membership.room_count = lambda: len(muc.rooms)  # `presenced cluster status`
        # room -> real full JID of each occupant session -> "<node>:<incarnation>" it came
        # through ("" for a user of another server)
        self.origins: dict[JID, dict[JID, str]] = {}
        self._dirty: set[JID] = set()
        self._written: dict[JID, str] = {}
        self._writer: asyncio.Task[None] | None = None
        # our sessions (real full JID) -> rooms they joined that another node owns
        self.away: dict[JID, set[str]] = {}
        self._handing: asyncio.Future[None] | None = None  # the graceful stop's hand-over
        # account -> rooms it owns on other nodes, while a join that may create a room is
        # handled (max_rooms_per_user; Service._check_room_quota)
        self.owned_elsewhere: dict[JID, int] = {}
        # room -> stanzas being handled that may leave it unmade or destroyed (handle())
        self._unsettled: dict[JID, int] = {}

    # -- stanzas -----------------------------------------------------------------------------

    def route(self, stanza: Any, origin: Session | None, to: JID) -> Any:
        """The service's route function: the service itself here, a room at its owner."""
        if to.local is None:
            return self.muc.route(stanza, origin, to)
        name = str(to.bare)
        if stanza.tag == st.PRESENCE and origin is not None and name not in self.placement.owned:
            self._track(stanza, name)
        return self.placement.route(name, stanza, origin, to)

    def _track(self, stanza: Any, room: str) -> None:
        """The rooms our users' sessions are in, kept where the sessions are: when a session
        ends or goes unavailable here, the room's owner is told (gone())."""
        try:
            real = JID.parse(stanza.get("from", ""))
        except InvalidJID:
            return
        if real.domain not in self.hosts or real.resource is None:
            return
        type_ = stanza.get("type")
        if type_ is None:
            self.away.setdefault(real, set()).add(room)
        elif type_ == "unavailable":
            rooms = self.away.get(real)
            if rooms is not None:
                rooms.discard(room)
                if not rooms:
                    del self.away[real]

    def gone(self, real: JID) -> None:
        """A session of ours ended or went unavailable (the MUC service's own hooks): the
        rooms it is in elsewhere get its unavailable presence, as a room here hears of it
        directly (XEP-0045 §7.14: the service removes an occupant whose session is gone)."""
        for room in self.away.pop(real, ()):
            presence = st.element(st.PRESENCE, {"from": str(real), "to": room,
                                                "type": "unavailable"})
            result = self.placement.route(room, presence, None, JID.parse(room))
            if inspect.isawaitable(result):
                self.muc.server.router.spawn(result)

    def handle(self, stanza: Any, to: JID, origin: str) -> Any:
        """As the room's owner. A stanza for a room that does not exist here (a join that may
        create it, a disco#info) and an iq set (the owner's <destroy/>, XEP-0045 §10.9) are
        counted while handled: when the last of them is done and there is no room, the claim
        that brought them here goes (a refused join — max_rooms_per_user, restrict_room_creation
        — made nothing; it is not held until the node dies)."""
        room = to.bare
        if room in self.muc.rooms and not (stanza.tag == st.IQ and stanza.get("type") == "set"):
            return self._owned(stanza, to, origin)
        self._unsettled[room] = self._unsettled.get(room, 0) + 1
        try:
            result = self._owned(stanza, to, origin)
        except BaseException:
            self._settled(room)
            raise
        if inspect.isawaitable(result):
            return self._settled_after(result, room)
        self._settled(room)
        return result

    async def _settled_after(self, pending: Any, room: JID) -> Any:
        try:
            return await pending
        finally:
            self._settled(room)

    def _settled(self, room: JID) -> None:
        left = self._unsettled[room] - 1
        if left:
            self._unsettled[room] = left
            return
        del self._unsettled[room]
        if room not in self.muc.rooms and str(room) in self.placement.owned:
            self.muc.server.router.spawn(self._release_unmade(room))

    async def _release_unmade(self, room: JID) -> None:
        # Checked again as the release starts (it drops the room from `owned` before its first
        # await): a join handled since may have made the room.
        name = str(room)
        if room in self.muc.rooms or room in self._unsettled or name not in self.placement.owned:
            return
        log.info("event=muc-claim-released room=%s reason=no-room", name)
        await self.placement.release(name)

    def _owned(self, stanza: Any, to: JID, origin: str) -> Any:
        if (to.resource is not None and stanza.tag == st.PRESENCE and stanza.get("type") is None
                and self.muc.config.max_rooms_per_user and to.bare not in self.muc.rooms):
            # A join that may create the room: [muc] max_rooms_per_user counts the rooms
            # the sender owns on every node (the database and the mirrors), not just ours.
            try:
                sender = JID.parse(stanza.get("from", "")).bare
            except InvalidJID:
                sender = None
            if sender is not None and str(sender) not in self.muc.server.config.admins:
                return self._counted(sender, stanza, to, origin)
        return self._handle(stanza, to, origin)

    async def _counted(self, sender: JID, stanza: Any, to: JID, origin: str) -> Any:
        local = {room.jid_str for room in self.muc.rooms.values()}
        elsewhere = sum(1 for name, (_config, affiliations) in (await self.all_rooms()).items()
                        if name not in local and affiliations.get(str(sender)) == "owner")
        self.owned_elsewhere[sender] = elsewhere
        try:
            result = self._handle(stanza, to, origin)
            return await result if inspect.isawaitable(result) else result
        finally:
            self.owned_elsewhere.pop(sender, None)

    async def all_rooms(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Every room of the service on every node, as name -> (config JSON, bare JID ->
        affiliation): the persistent ones from the database (loaded on a node or not), the
        temporary ones from the mirrors of the live nodes' claims, ours as they are now."""
        muc = self.muc
        rooms: dict[str, tuple[str, dict[str, str]]] = {}
        for service in sorted(muc.services):
            for stored in await muc.store.load(service):
                rooms[stored.room] = (stored.config,
                                      {j: a for j, (a, _r) in stored.affiliations.items()})
        names: set[str] = set()
        for node, incarnation in self.membership.live.items():
            for raw in await self.redis.smembers(keys.placed_by("room", f"{node}:{incarnation}")):
                names.add(raw.decode())
        wanted = sorted(names - set(rooms))
        if wanted:
            for name, raw in zip(wanted, await self.redis.mget(
                    [keys.room_state(name) for name in wanted]), strict=True):
                if raw is None:
                    continue
                state = json.loads(raw)
                rooms[name] = (state["c"], {j: a for j, (a, _r) in state.get("a", {}).items()})
        for room in muc.rooms.values():
            if not room.destroyed:
                rooms[room.jid_str] = (room.config.to_json(),
                                       {str(j): a for j, a in room.affiliations.items()})
        return rooms

    async def items(self, stanza: Any) -> Any:
        """disco#items on the service (XEP-0045 §6.3): the public rooms of every node."""
        service = stanza.get("to", "")
        listed = []
        for name, (config_json, _affiliations) in (await self.all_rooms()).items():
            jid = JID.parse(name)
            config = RoomConfig.from_json(config_json)
            if jid.domain == service and config.public:
                listed.append((name, config.name or jid.local or ""))
        return self.muc.items_result(stanza, sorted(listed))

    def _handle(self, stanza: Any, to: JID, origin: str) -> Any:
        result = self.muc.route(stanza, None, to)
        tag = stanza.tag
        if tag == st.PRESENCE or (tag == st.IQ and stanza.get("type") == "set") or (
                tag == st.MESSAGE and (stanza.get("type") == "error"
                                       or stanza.find(_SUBJECT) is not None)):
            # What may change who is in the room (or the state a new owner needs).
            if inspect.isawaitable(result):
                return self._after(result, to.bare, origin)
            self._changed(to.bare, origin)
        return result

    async def _after(self, pending: Any, room: JID, origin: str) -> Any:
        try:
            return await pending
        finally:
            self._changed(room, origin)

    def _changed(self, room_jid: JID, origin: str) -> None:
        room = self.muc.rooms.get(room_jid)
        if room is None:
            self.origins.pop(room_jid, None)
        else:
            known = self.origins.setdefault(room_jid, {})
            for real in room.by_jid:
                if real not in known:
                    known[real] = origin if real.domain in self.hosts else ""
            for real in [r for r in known if r not in room.by_jid]:
                del known[real]
        self._mark(room_jid)

    def forgotten(self, room: Room) -> None:
        """An empty temporary room is gone: its claim and its mirror go too."""
        self.origins.pop(room.jid, None)
        self._mark(room.jid)
        self.muc.server.router.spawn(self.placement.release(room.jid_str))

    # -- the mirror --------------------------------------------------------------------------

    def _mark(self, room: JID) -> None:
        self._dirty.add(room)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        """One writer: the latest state of each room marked since, in Redis."""
        while self._dirty:
            room_jid = self._dirty.pop()
            room = self.muc.rooms.get(room_jid)
            key = keys.room_state(str(room_jid))
            try:
                if room is None or room.destroyed:
                    if self._written.pop(room_jid, None) is not None:
                        await self.redis.delete(key)
                    continue
                text = json.dumps(self.state(room))
                if self._written.get(room_jid) != text:
                    await self.redis.set(key, text)
                    self._written[room_jid] = text
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event=muc-mirror-failed room=%s error=%s", room_jid,
                            type(exc).__name__)

    def state(self, room: Room) -> dict[str, Any]:
        return self.state_with(room, self.origins.get(room.jid, {}))

    def state_with(self, room: Room, origins: dict[JID, str]) -> dict[str, Any]:
        return {
            "c": room.config.to_json(), "s": room.subject, "f": room.subject_from,
            "a": {str(j): [a, room.reasons.get(j)] for j, a in room.affiliations.items()},
            "k": {str(j): n for j, n in room.nicks.items()},
            "o": [{"n": o.nick, "j": str(o.jid), "f": o.affiliation, "r": o.role,
                   "s": [[str(real), origins.get(real, ""),
                          etree.tostring(presence, encoding="unicode")]
                         for real, presence in o.sessions.items()]}
                  for o in room.occupants.values()],
        }

    # -- placement.Host ----------------------------------------------------------------------

    async def adopt(self, name: str) -> None:
        """This node owns the room now: config from the database (a persistent room) or the
        mirror, history from the archive, occupants from the mirror, minus those whose node
        is gone (told to the others with 333)."""
        muc = self.muc
        room_jid = JID.parse(name)
        stored = next((s for s in await muc.store.load(room_jid.domain) if s.room == name),
                      None)
        raw = await self.redis.get(keys.room_state(name))
        state = json.loads(raw) if raw else None
        if stored is not None:
            room = muc._restore(stored)
        elif state is not None:
            room = Room(room_jid, RoomConfig.from_json(state["c"]), muc.id_key,
                        muc.config.max_occupants)
            room.subject, room.subject_from = state.get("s"), state.get("f")
            for jid, (affiliation, reason) in state.get("a", {}).items():
                room.set_affiliation(JID.parse(jid), affiliation, reason)
            for jid, nick in state.get("k", {}).items():
                room.nicks[JID.parse(jid)] = nick
        else:
            muc.rooms.pop(room_jid, None)
            return  # no such room (yet): a join makes it here
        await muc._restore_history(room)
        origins: dict[JID, str] = {}
        for entry in (state or {}).get("o", ()):
            occupant = Occupant(entry["n"], JID.parse(entry["j"]), entry["f"], entry["r"])
            for real_text, origin, xml in entry["s"]:
                real = JID.parse(real_text)
                occupant.sessions[real] = etree.fromstring(xml, _PARSER)
                room.by_jid[real] = occupant
                origins[real] = origin
                muc.joined.setdefault(real, set()).add(room)
            if occupant.sessions:
                room.occupants[nick_key(occupant.nick)] = occupant
        muc.rooms[room_jid] = room
        self.origins[room_jid] = origins
        live = {f"{node}:{inc}" for node, inc in self.membership.live.items()}
        self._remove(room, [real for real, origin in origins.items()
                            if origin and origin not in live])
        log.info("event=muc-room-adopted room=%s occupants=%d", name, len(room.occupants))
        self._mark(room_jid)

    def _remove(self, room: Room, reals: list[JID]) -> None:
        """Sessions whose node died: gone from the room, the others told with status 333."""
        for real in reals:
            self.origins.get(room.jid, {}).pop(real, None)
            if real in room.by_jid:
                log.info("event=muc-occupant-lost room=%s jid=%s", room.jid_str, real)
                self.muc._left(room, real, room.leave(real, None, ("333",)))

    def exists(self, name: str) -> bool:
        return JID.parse(name) in self.muc.rooms

    def died(self, owners: set[str]) -> None:
        for room_jid, origins in list(self.origins.items()):
            gone = [real for real, origin in origins.items() if origin in owners]
            room = self.muc.rooms.get(room_jid)
            if gone and room is not None:
                self._remove(room, gone)
                self._mark(room_jid)

    def drop_all(self) -> None:
        muc = self.muc
        muc.rooms.clear()
        muc.joined.clear()
        muc.relayed.clear()
        self.origins.clear()
        self._written.clear()

    def stopping(self) -> asyncio.Future[None]:
        """Graceful stop, before the streams close: no more take-overs here, and the rooms
        handed over (bounded: a stop never hangs on Redis)."""
        if self._handing is None:
            self.placement.close()
            me = self.membership.name
            if any(node != me for node in self.membership.live):
                self._handing = asyncio.ensure_future(self._bounded(self.placement.hand_over()))
            else:  # the last node: the service goes away, as in a single process
                self.muc.close_rooms()
                self._handing = asyncio.ensure_future(self._bounded(self._give_up()))
        return self._handing

    async def _give_up(self) -> None:
        """The last node stops: its claims and mirrors go."""
        names = list(self.placement.owned)
        await self.placement.release_all()
        if names:
            await self.redis.delete(*[keys.room_state(name) for name in names])

    async def _bounded(self, step: Any) -> None:
        try:
            await asyncio.wait_for(step, _HAND_OVER)
        except Exception as exc:
            log.warning("event=muc-hand-over-failed error=%s", type(exc).__name__)

    async def handing_over(self, names: list[str]) -> None:
        """Graceful stop (placement.hand_over): each room's state in the mirror as it is now,
        for its next owner; the room dropped here without a word (its occupants stay joined
        there). Our own sessions in it are remembered in `away`, so that their unavailable
        presence, when their streams close, reaches the room where it went."""
        muc = self.muc
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        me = self.placement.me
        for name in names:
            room_jid = JID.parse(name)
            room = muc.rooms.pop(room_jid, None)
            self._dirty.discard(room_jid)
            self._written.pop(room_jid, None)
            origins = self.origins.pop(room_jid, {})
            if room is None:
                continue
            if not room.destroyed:
                await self.redis.set(keys.room_state(name), json.dumps(self.state_with(
                    room, origins)))
            for real in room.by_jid:
                muc.unjoin(real, room)
                if origins.get(real) == me:
                    self.away.setdefault(real, set()).add(name)

    async def stop(self) -> None:
        """Graceful stop, after the hand-over: the mirror writer and placement's work end."""
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        await self.placement.stop()
