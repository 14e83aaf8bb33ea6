"""Invitations (XEP-0045 §7.8.2): mediated by the room, with XEP-0249's element for clients
without them; declines passed back to the inviter."""

from __future__ import annotations

from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza
from server.modules.muc.base import MucBase
from server.modules.muc.room import MUC_USER, Room
from server.xml import ns
from server.xml import stanza as st


class Invitations(MucBase):
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
