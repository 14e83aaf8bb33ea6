"""Offline messages (XEP-0160, RFC 6121 §8.5.2.2.1): kept for an account with no available
resource, delivered to its first resource that sends initial presence with non-negative
priority.

A message is committed to storage before the sender's stanza is considered handled, so a
process kill loses nothing accepted. Delivery deletes only what was handed to the session: a
crash in between delivers a message twice, never zero times.

    [offline]
    max_messages = 1000   # per account; beyond it senders get <resource-constraint/>
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lxml import etree

from server import events
from server.config import int_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, Stanza, hook
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import child

log = logging.getLogger("presenced.offline")

_DELAY = ns.q(ns.DELAY, "delay")
# Accounts holding messages beyond which the module does not keep their set (it then reads at
# every initial presence, as with [cluster]); a JID each: 10,000 of them are ~5 MiB.
_MAX_HOLDING = 10_000
# Stored stanzas are our own serialisation; still, never resolve entities or reach the network.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class OfflineSettings:
    # XEP-0160: stored messages per account; beyond it senders get <resource-constraint/>.
    max_messages: int = field(metadata=int_option(0, 100000, 1000))


def stamp(now: datetime | None = None) -> str:
    """XEP-0082 DateTime in UTC, millisecond precision."""
    now = now or datetime.now(UTC)
    return f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"


class Offline(Module):
    name = "offline"
    features = (ns.OFFLINE,)
    settings = OfflineSettings

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        self._delivering: set[JID] = set()  # accounts whose stored messages go out right now
        # The accounts that may hold stored messages; None: unknown, every initial presence
        # reads (issue 25 item 6: the read otherwise delays the stream's next stanzas). Read
        # at start and kept by this process, which is then the only writer (an import runs
        # with the server stopped, server/porting/load.py). Not with [cluster]: another node
        # may store a message for the account and nothing tells us, so there we always read.
        self._holding: set[JID] | None = None
        self._storing: dict[JID, int] = {}  # stores not yet returned, per account
        self._raced: set[JID] = set()  # a store began while the account's delivery read
        self._again: set[JID] = set()  # a store ended while the account's delivery read

    async def start(self) -> None:
        if self.server.config.cluster.enabled:
            return
        owners = await self.server.storage.offline.owners(_MAX_HOLDING + 1)
        if len(owners) <= _MAX_HOLDING:
            with contextlib.suppress(InvalidJID):  # a row we cannot name: read for everyone
                self._holding = {JID(user, domain) for user, domain in owners}

    @hook(events.MESSAGE_OFFLINE)
    def store(self, stanza: Stanza, _origin: Session | None, to: JID) -> object:
        return self._store(stanza, to)

    async def _store(self, stanza: Stanza, to: JID) -> bool:
        assert to.local is not None
        # A copy: the router may still answer the original (its children are not echoed, but
        # other hooks may hold it).
        kept = copy.deepcopy(stanza)
        # XEP-0203 §3: who delayed it and when.
        child(kept, _DELAY, {"from": to.domain, "stamp": stamp()}, text="Offline Storage")
        data = etree.tostring(kept)
        bare = to.bare
        if self._holding is not None:  # marked before it is stored: in doubt, read
            self._holding.add(bare)
            if len(self._holding) > _MAX_HOLDING:
                self._holding = None  # too many to keep: read at every initial presence
        if bare in self._delivering:
            self._raced.add(bare)
        self._storing[bare] = self._storing.get(bare, 0) + 1
        try:
            stored = await self.server.storage.offline.store(to.local, to.domain, data,
                                                             self.config.max_messages)
        finally:
            if (left := self._storing[bare] - 1) > 0:
                self._storing[bare] = left
            else:
                del self._storing[bare]
        if not stored:
            log.info("event=offline-quota to=%s", to)
            raise StanzaError("resource-constraint", "the recipient's offline storage is full")
        self._stored_late(bare)
        return True

    def _stored_late(self, bare: JID) -> None:
        """A message whose store ended after its account came online: the initial presence's
        read may have run before this commit, so it is delivered now, not at the next login."""
        if bare in self._delivering:
            self._again.add(bare)  # the delivery under way reads once more
            return
        for session in self.server.sessions.resources(bare):
            if not session.remote and session.presence is not None and session.priority >= 0:
                self.server.router.spawn(self._deliver(session, bare))
                return

    @hook(events.PRESENCE_AVAILABLE)
    def available(self, session: Session, first: bool) -> object:
        # XEP-0160 §3: on initial presence with non-negative priority. A negative priority says
        # "do not send me messages" (RFC 6121 §4.7.2.3); those wait for a later resource.
        if not first or session.priority < 0:
            return None
        bare = session.jid.bare
        if bare in self._delivering:
            return None  # another resource of the account is receiving them right now
        if self._holding is not None and bare not in self._holding:
            return None  # none stored (a store marks the account before it writes)
        return self._deliver(session, bare)

    async def _deliver(self, session: Session, bare: JID) -> None:
        assert bare.local is not None
        offline = self.server.storage.offline
        sessions = self.server.sessions
        self._delivering.add(bare)
        try:
            # A message stored while a batch is delivered gets a higher id: loop until none is
            # left (the session is available now, so new messages no longer come here).
            for _ in range(8):
                # Known empty when the read finds none, no store was under way as it began
                # and none began since (its message may be committed after the read).
                quiet = bare not in self._storing
                self._raced.discard(bare)
                self._again.discard(bare)
                batch = await offline.load(bare.local, bare.domain)
                if not batch:
                    if bare in self._again:
                        continue  # a store ended during that read: read again
                    if quiet and bare not in self._raced and self._holding is not None:
                        self._holding.discard(bare)
                    return
                if sessions.get(session.jid) is not session:
                    return  # gone before we could hand anything over: keep them all
                for _id, data in batch:
                    session.send(etree.fromstring(data, _PARSER))
                if sessions.get(session.jid) is not session:
                    return  # closed while sending (send() drops stanzas then): keep them
                await offline.delete(bare.local, bare.domain, batch[-1][0])
                log.info("event=offline-delivered jid=%s count=%d", session.jid, len(batch))
        finally:
            self._delivering.discard(bare)
            self._raced.discard(bare)
            self._again.discard(bare)
