"""Moderation (XEP-0425): a moderator retracts a message for everyone; the archive keeps a
tombstone (§6)."""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza, iq_set
from server.modules import archive_query as aq
from server.modules.muc.base import MucBase
from server.modules.muc.room import OCCUPANT_ID, SID, Room
from server.sessions import Session
from server.storage.archive import ArchiveEntry, ArchiveQuery, UnknownArchiveId
from server.xml import ns
from server.xml import stanza as st

MODERATE = "urn:xmpp:message-moderate:1"  # XEP-0425
RETRACT = "urn:xmpp:message-retract:1"    # XEP-0424


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


class Moderation(MucBase):
    @iq_set(MODERATE, "moderate", to="service-bare")
    def moderate(self, stanza: Stanza, _origin: Session | None, to: JID) -> Any:
        room, sender, payload = self.room_iq(stanza, to)
        return self._moderate(room, stanza, sender, payload)

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
        if stanza_id is None and room.config.archive:
            try:
                page = await archive.query(room.jid_str, ArchiveQuery(ids=(target,), max=1))
            except UnknownArchiveId:  # not an id of this room's archive: answered below
                page = None
            if page is not None and page.items:
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
        if room.config.archive:
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
