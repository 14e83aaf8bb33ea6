"""Admins and moderators (XEP-0045 §8, §9): affiliation and role lists, kick, ban, voice,
membership, all-or-nothing changes (§9.5)."""

from __future__ import annotations

from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza, iq_get, iq_set
from server.modules.muc.base import MucBase
from server.modules.muc.nicknames import nickname
from server.modules.muc.room import AFFILIATIONS, MUC_ADMIN, MUC_USER, ROLES, Room
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st
from server.xml.writer import addressed_copies

_ADMIN_QUERY = ns.q(MUC_ADMIN, "query")


class Admin(MucBase):
    @iq_get(MUC_ADMIN, "query", to="service-bare")
    @iq_set(MUC_ADMIN, "query", to="service-bare")
    def admin_query(self, stanza: Stanza, _origin: Session | None, to: JID) -> Any:
        room, sender, query = self.room_iq(stanza, to)
        return self._admin(room, stanza, sender, query, stanza.get("type", ""))

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
                elif room.occupant(item.get("nick", "")) is not None:
                    target = room.occupant(item.get("nick", "")).jid  # type: ignore[union-attr]
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
                    nick = nickname(item.get("nick", ""))
                    if room.nick_owner(nick) not in (None, target):
                        raise StanzaError("conflict", "that nickname is registered already")
                    reserve.append((target, nick))
            elif role is not None:
                if role not in ROLES:
                    raise StanzaError("bad-request", "no such role")
                found = room.occupant(item.get("nick", ""))
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
                if room.occupant(occupant.nick) is not occupant:
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
                    holder = room.occupant(nick)
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
