"""Voice requests (XEP-0045 §7.13, §8.6): a visitor asks, the moderators get the muc#request
form, one who approves it makes the visitor a participant."""

from __future__ import annotations

import uuid

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza
from server.modules.muc.base import MucBase
from server.modules.muc.room import MUC, Occupant, Room, field_values
from server.xml import ns
from server.xml import stanza as st

REQUEST = MUC + "#request"  # XEP-0045 §7.13, §8.6: voice requests
_FORM = ns.q(ns.DATA_FORMS, "x")


def _is_true(values: list[str]) -> bool:
    return bool(values) and values[0].strip() in ("1", "true")


class Voice(MucBase):
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
            target = room.occupant(nick) if nick else None
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
            if label is not None:  # none on the hidden FORM_TYPE (XEP-0004 §3.3)
                attrs["label"] = label
            el = st.child(x, ns.q(ns.DATA_FORMS, "field"), attrs)
            st.child(el, ns.q(ns.DATA_FORMS, "value"), text=value)
            if kind == "list-single":  # XEP-0004 §3.3: a list field offers its options
                opt = st.child(el, ns.q(ns.DATA_FORMS, "option"), {"label": "Participant"})
                st.child(opt, ns.q(ns.DATA_FORMS, "value"), text=value)
        return message
