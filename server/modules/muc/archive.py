"""The room archive (XEP-0313 on the room's JID, as Prosody's mod_muc_mam): every historic
groupchat message is stored before it goes out, its archive id is its XEP-0359 stanza id;
queries by those who may read the room; a persistent room's join history after a restart."""

from __future__ import annotations

import time
import uuid
from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza, iq_get, iq_set
from server.modules import archive_query as aq
from server.modules.muc.base import MucBase
from server.modules.muc.room import Room
from server.sessions import Session
from server.storage.archive import ArchiveEntry, ArchiveQuery, UnknownArchiveId
from server.xml import stanza as st


class Archive(MucBase):
    @iq_get(aq.MAM2, "query", to="service-bare")
    def mam_form(self, stanza: Stanza, _origin: Session | None, to: JID) -> Stanza:
        room, _sender, _query = self.room_iq(stanza, to)
        if not room.config.archive:
            raise StanzaError("service-unavailable")
        return st.result(stanza, aq.form(aq.MAM2))  # XEP-0313 §4.1.1: the fields

    @iq_set(aq.MAM2, "query", to="service-bare")
    def mam_query(self, stanza: Stanza, _origin: Session | None, to: JID) -> Any:
        room, sender, query = self.room_iq(stanza, to)
        return self._mam_query(room, stanza, sender, query)

    async def _restore_history(self, room: Room) -> None:
        """A persistent room's discussion history after a restart (graceful or not) comes
        from its archive, where every message was stored before it went out (as Prosody's
        mod_muc_mam serves it): the last history_length messages the history keeps."""
        wanted = room.config.history_length
        if not wanted or not room.config.archive:
            return
        # Asks for more than wanted: subject-less notices and tombstones are skipped.
        page = await self.archive.query(room.jid_str, ArchiveQuery(
            before="", max=wanted * 2 + 10, count=False))
        archived = []
        for item in page.items:
            try:
                message = etree.fromstring(item.stanza)
            except etree.XMLSyntaxError:
                continue
            archived.append((item.id, item.ts / 1_000_000, message))
        room.restore_history(archived)

    async def _archive_and_send(self, room: Room, prepared: Stanza) -> None:
        """XEP-0313 on the room JID: the archive id is the message's stanza id."""
        nick = prepared.get("from", "").partition("/")[2]
        entry = ArchiveEntry(owner=room.jid_str, with_bare=room.jid_str, with_resource=nick,
                             outgoing=False, ts=time.time_ns() // 1000,
                             stanza=etree.tostring(prepared), account=False)
        ids = await self.archive.append([entry])
        self._deliver(room.fan_out(prepared, ids[0] or str(uuid.uuid4())))

    async def _mam_query(self, room: Room, stanza: Stanza, sender: JID,
                         query: etree._Element) -> Stanza:
        archive = self.archive
        if not room.config.archive:
            raise StanzaError("feature-not-implemented", "this room is not archived")
        affiliation = room.affiliation(sender)
        if affiliation == "outcast" or (room.config.members_only and affiliation == "none"):
            raise StanzaError("forbidden", "members only")
        q, flip = aq.parse_query(query, aq.MAM2, aq.max_page(self.server.config))
        try:
            page = await archive.query(room.jid_str, q)
        except UnknownArchiveId as exc:
            raise StanzaError("item-not-found", f"no message {exc.args[0]!r}") from None
        queryid = query.get("queryid")
        items = list(reversed(page.items)) if flip else page.items
        self._deliver([aq.result_message(item.id, item.ts, item.stanza, aq.MAM2, queryid,
                                         str(sender), room.jid_str) for item in items])
        return st.result(stanza, aq.fin(page, aq.MAM2, queryid))
