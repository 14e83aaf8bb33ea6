"""Registering with a room (XEP-0045 §7.10): a reserved nickname and membership; the
reserved nickname asked for by disco#info node x-roomuser-item (§7.12) is in service.py."""

from __future__ import annotations

from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza, iq_get, iq_set
from server.modules.muc.admin import Admin
from server.modules.muc.nicknames import nickname
from server.modules.muc.room import MUC, Room, field_values
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

REGISTER = "jabber:iq:register"
_REGISTER = ns.q(REGISTER, "query")
_FORM = ns.q(ns.DATA_FORMS, "x")


class Register(Admin):
    @iq_get(REGISTER, "query", to="service-bare")
    @iq_set(REGISTER, "query", to="service-bare")
    def register_query(self, stanza: Stanza, _origin: Session | None, to: JID) -> Any:
        room, sender, query = self.room_iq(stanza, to)
        return self._register(room, stanza, sender, query, stanza.get("type", ""))

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
            nick = nickname(given)
            holder = room.nick_owner(nick)
            present = room.occupant(nick)
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
