"""Owners (XEP-0045 §10): the muc#roomconfig form, what occupants are told of a change
(§10.2.1), destroying a room (§10.9)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza, iq_get, iq_set
from server.modules.muc.base import MucBase, log
from server.modules.muc.room import (
    MUC,
    MUC_OWNER,
    MUC_USER,
    Room,
    apply_form,
    config_form,
    field_values,
)
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

_OWNER_QUERY = ns.q(MUC_OWNER, "query")
_FORM = ns.q(ns.DATA_FORMS, "x")


class Owner(MucBase):
    @iq_get(MUC_OWNER, "query", to="service-bare")
    @iq_set(MUC_OWNER, "query", to="service-bare")
    def owner_query(self, stanza: Stanza, _origin: Session | None, to: JID) -> Any:
        room, sender, query = self.room_iq(stanza, to)
        return self._owner(room, stanza, sender, query, stanza.get("type", ""))

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
            await self.archive.delete_owner(room.jid_str)
            return st.result(stanza)
        return forget()
