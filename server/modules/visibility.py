"""Per-contact visibility: a presentity hides its presence from chosen watchers (an access rule
in the sense of RFC 2778 §5.1.2), unlike XEP-0186 invisibility which hides from everyone.

Protocol, namespace urn:presenced:watchers:0 (schema: schemas/watchers.xsd), to one's own
account (no 'to' or one's bare JID):

    <iq type='set' id='h1'><hide xmlns='urn:presenced:watchers:0' jid='bob@a.test'/></iq>
    <iq type='set' id='h2'><unhide xmlns='urn:presenced:watchers:0' jid='bob@a.test'/></iq>

The JID is taken as a bare JID. A hidden watcher sees the presentity as offline: on hide it
gets unavailable presence from each available resource, broadcasts skip it, and its probes
are answered with unavailable presence (not 'unsubscribed', which would tell it something is
being withheld). On unhide it gets the current presence, if it is a subscriber. While hidden,
no available or unavailable presence of the account reaches it, directed presence included
(unhide first), nor the unavailable presence of a logout.
A hidden subscriber shows in watcher information (server/modules/watchers.py) with
status='refused'.

Storage: the set is kept in the account's private XML storage (XEP-0049 table) as
<hidden xmlns='urn:presenced:watchers:0'/>; it is cached while the account has a session.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from lxml import etree

from server import events
from server.errors import StanzaError
from server.events import stanza_kinds
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, Stanza, hook, iq_set
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.visibility")

HIDDEN = ns.q(ns.WATCHERS, "hidden")
ITEM = ns.q(ns.WATCHERS, "item")
MAX_HIDDEN = 1000  # contacts one account may hide
_NOTHING: frozenset[str] = frozenset()  # shared: CPython makes a new empty one per call
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True,
                          remove_pis=True)


class Visibility(Module):
    name = "visibility"

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        self._hidden: dict[JID, frozenset[str]] = {}  # bare JID -> hidden bare JIDs, if online
        self._changing = asyncio.Lock()
        # [cluster]: tells the other nodes that an account's hidden list changed
        self.changed: Callable[[JID], Awaitable[None]] | None = None

    def forget(self, bare: JID) -> None:
        """Another node changed this account's hidden list: read it again when next needed."""
        self._hidden.pop(bare, None)

    async def _load(self, bare: JID) -> frozenset[str]:
        cached = self._hidden.get(bare)
        if cached is not None:
            return cached
        assert bare.local is not None
        stored = await self.server.storage.private.get(bare.local, bare.domain, ns.WATCHERS,
                                                       "hidden")
        hidden = frozenset(_parse(stored)) if stored else _NOTHING
        if self.server.sessions.is_online(bare):
            hidden = self._hidden.setdefault(bare, hidden)  # a change made meanwhile wins
        return hidden

    @hook(events.SESSION_BOUND)
    def bound(self, session: Session) -> Awaitable[frozenset[str]] | None:
        if session.jid.bare in self._hidden:
            return None
        return self._load(session.jid.bare)

    @hook(events.SESSION_CLOSED)
    def closed(self, session: Session, _reason: str) -> None:
        if not self.server.sessions.is_online(session.jid.bare):
            self._hidden.pop(session.jid.bare, None)

    # -- enforcement -----------------------------------------------------------------------

    @hook(events.ACCESS_DENY)
    def access_deny(self, presentity: JID, watcher: JID, what: str) -> object:
        if what != "presence":
            return None  # hiding is about presence, not about who may subscribe
        hidden = self._hidden.get(presentity.bare)
        if hidden and str(watcher.bare) in hidden:
            return True
        return None

    @hook(events.FILTER_USER, priority=90)
    @stanza_kinds(st.PRESENCE)
    def filter_presence(self, stanza: Stanza, origin: Session | None, to: JID) -> object:
        """Whatever path a presentity's presence takes (broadcast, logout, directed, the answer
        to a subscription), it does not reach a watcher it hides from; a hidden watcher's probe
        is answered as if the presentity were offline."""
        if stanza.tag != st.PRESENCE:
            return None
        type_ = stanza.get("type")
        if type_ == "probe":
            return self._probe(stanza, origin, to)
        if type_ not in (None, "unavailable"):
            return None
        try:
            sender = JID.parse(stanza.get("from", ""))
        except InvalidJID:
            return None
        if sender.local is None or sender.domain not in self.server.hosts or sender.bare == to.bare:
            return None
        if sender.resource is None:
            return None  # from the bare JID: the answer to a probe, which _probe has judged
        hidden = self._hidden.get(sender.bare)
        if hidden is None:
            # Not loaded yet (the first broadcast of a session) or no longer (a logout: the
            # session-closed hook runs first).
            return self._filter_uncached(sender.bare, to)
        return True if str(to.bare) in hidden else None

    async def _filter_uncached(self, sender: JID, to: JID) -> bool | None:
        return True if str(to.bare) in await self._load(sender) else None

    def _probe(self, stanza: Stanza, origin: Session | None, to: JID) -> object:
        """RFC 6121 §4.3.2, inbound: a hidden watcher's probe is answered as if the presentity
        were offline."""
        if (origin is not None and origin.local_client) or to.domain not in self.server.hosts:
            return None
        try:
            watcher = JID.parse(stanza.get("from", ""))
        except InvalidJID:
            return None
        hidden = self._hidden.get(to.bare)
        if hidden is None:
            return self._probe_uncached(to.bare, watcher)
        if str(watcher.bare) in hidden:
            return self._answer_hidden(to.bare, watcher)
        return None

    async def _probe_uncached(self, presentity: JID, watcher: JID) -> bool | None:
        if str(watcher.bare) in await self._load(presentity):
            return await self._answer_hidden(presentity, watcher)
        return None

    async def _answer_hidden(self, presentity: JID, watcher: JID) -> bool:
        await self.server.hooks.notify(events.PRESENCE_FETCHED, presentity, watcher, False)
        answer = st.element(st.PRESENCE, {"type": "unavailable", "from": str(presentity),
                                          "to": str(watcher)})
        pending = self.server.router.route(answer, None)
        if pending is not None:
            await pending
        return True

    # -- the protocol ----------------------------------------------------------------------

    @iq_set(ns.WATCHERS, "hide", to=("self",))
    async def hide(self, stanza: Stanza, origin: Session | None) -> None:
        await self._change(stanza, origin, hide=True)

    @iq_set(ns.WATCHERS, "unhide", to=("self",))
    async def unhide(self, stanza: Stanza, origin: Session | None) -> None:
        await self._change(stanza, origin, hide=False)

    async def _change(self, stanza: Stanza, origin: Session | None, hide: bool) -> None:
        request = st.payload(stanza)
        assert request is not None and origin is not None
        try:
            contact = JID.parse(request.get("jid", "")).bare
        except InvalidJID as exc:
            raise StanzaError("jid-malformed", f"invalid 'jid': {exc}") from exc
        user = origin.jid.bare
        if contact == user or contact.local is None:
            raise StanzaError("bad-request", "hide an account other than your own")
        assert user.local is not None
        async with self._changing:
            before = await self._load(user)
            after = before | {str(contact)} if hide else before - {str(contact)}
            if after == before:
                origin.send(st.result(stanza))
                return
            if len(after) > MAX_HIDDEN:
                raise StanzaError("resource-constraint", f"at most {MAX_HIDDEN} hidden contacts")
            await self.server.storage.private.set(user.local, user.domain,
                                                  [(ns.WATCHERS, "hidden", _serialise(after))])
            notes = await self._presence_notes(user, contact, hide)
            # [cluster] every other node drops its copy before the answer (blocking.py).
            if self.changed is not None:
                await self.changed(user)
            # From here to the cache update nothing awaits: no stanza sees a half-made change.
            origin.send(st.result(stanza))  # the answer first, then the presence it causes
            # Filters judge a stanza as it is routed (before route() returns, while the
            # blocklists involved are cached): a hide's unavailable presence goes out while the
            # contact is not hidden yet, an unhide's presence once it is not any more.
            routed = self._route(notes) if hide else []
            if self.server.sessions.is_online(user):
                self._hidden[user] = after
            if not hide and not self.server.access.denied(user, contact):  # e.g. blocked
                routed = self._route(notes)
        log.info("event=%s jid=%s", "hide" if hide else "unhide", user)
        for pending in routed:  # delivery, outside the lock (federation may take a while)
            await pending

    async def _presence_notes(self, user: JID, contact: JID, hidden: bool) -> list[Stanza]:
        """On hide, unavailable from each available resource; on unhide, the current presence.
        Only to a subscriber: nobody else had presence."""
        from server.presence.subscription import is_subscriber
        from server.roster import state_of

        roster = await self.server.rosters.get(user)
        if not is_subscriber(state_of(roster.items.get(str(contact)))):
            return []
        notes = []
        for session in self.server.sessions.resources(user):
            if session.presence is None:
                continue
            if hidden:
                note = st.element(st.PRESENCE, {"type": "unavailable"})
            else:
                note = copy.deepcopy(session.presence)
            note.set("from", session.jid_str)
            note.set("to", str(contact))
            notes.append(note)
        return notes

    def _route(self, stanzas: list[Stanza]) -> list[Awaitable[None]]:
        """Route the server's own stanzas; what is still to do is returned, to await in order."""
        routed = (self.server.router.route(stanza, None) for stanza in stanzas)
        return [pending for pending in routed if pending is not None]


def _parse(stored: str) -> list[str]:
    try:
        root = etree.fromstring(stored.encode(), _PARSER)
    except etree.XMLSyntaxError:
        log.warning("event=hidden-set-unreadable")
        return []
    jids = []
    for item in root.iter(ITEM):
        try:
            jids.append(str(JID.parse(item.get("jid", "")).bare))
        except InvalidJID:
            continue
    return jids


def _serialise(hidden: frozenset[str]) -> str:
    root = st.element(HIDDEN)
    for jid in sorted(hidden):
        st.child(root, ITEM, {"jid": jid})
    return etree.tostring(root).decode()
