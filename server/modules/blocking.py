"""Blocking Command (XEP-0191): each account's blocklist, its management by iq, and its
enforcement on every stanza through the router's `filter/user` hook.

Blocklists of accounts with a bound session are cached (the checks are on the hot path); an
account without one is read from storage when a stanza is addressed to it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from server import events
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, SessionSlot, Stanza, hook, iq_get, iq_set
from server.modules.presence import Presence
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.blocking")

BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
_BLOCKLIST = ns.q(ns.BLOCKING, "blocklist")
_BLOCK = ns.q(ns.BLOCKING, "block")
_UNBLOCK = ns.q(ns.BLOCKING, "unblock")
_ITEM = ns.q(ns.BLOCKING, "item")
_NOTHING: frozenset[str] = frozenset()  # shared: CPython makes a new empty one per call


class Blocklist:
    """The JIDs one account blocks, matched as XEP-0191 §6 / XEP-0016 §2.1 say: an item that
    is a full JID matches that JID only, a bare JID any of its resources, a domain the domain
    and every JID at it."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[str] = ()) -> None:
        found = frozenset(items)
        self.items = found if found else _NOTHING  # most lists are empty: one shared set

    def __bool__(self) -> bool:
        return bool(self.items)

    def blocks(self, jid: JID) -> bool:
        items = self.items
        if not items:
            return False
        if jid.domain in items or str(jid) in items:
            return True
        return jid.resource is not None and str(jid.bare) in items


_EMPTY = Blocklist()


class Blocking(Module):
    name = "blocking"
    uses = (Presence,)  # XEP-0191 §3.3/§3.4: presence to the (un)blocked, when it is shared
    features = (ns.BLOCKING,)
    # XEP-0191 §3.2: a resource that asked for the blocklist gets pushes from then on.
    interested = SessionSlot[bool](False)

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        # bare JID (as text: str keys hash in C, the hot path does two lookups per stanza) ->
        # blocklist, for accounts with sessions
        self._lists: dict[str, Blocklist] = {}
        self._changing = asyncio.Lock()  # serialises changes, so pushes go out in storage order
        self._push_ids = itertools.count(1)
        # [cluster]: tells the other nodes that an account's blocklist changed (server/cluster)
        self.changed: Callable[[JID], Awaitable[None]] | None = None

    def forget(self, bare: JID) -> None:
        """Another node changed this account's blocklist: read it again when next needed."""
        self._lists.pop(str(bare), None)

    async def _get(self, bare: JID) -> Blocklist:
        key = str(bare)
        cached = self._lists.get(key)
        if cached is not None:
            return cached
        assert bare.local is not None
        blocklist = Blocklist(await self.server.storage.blocklists.get(bare.local, bare.domain))
        # Only accounts with sessions are cached; a change in between (under _changing) wins.
        if self.server.sessions.is_online(bare):
            blocklist = self._lists.setdefault(key, blocklist)
        return blocklist

    @hook(events.SESSION_BOUND)
    def bound(self, session: Session) -> Awaitable[Blocklist] | None:
        if session.bare_str in self._lists:
            return None
        return self._get(session.jid.bare)

    @hook(events.SESSION_CLOSED)
    def closed(self, session: Session, _reason: str) -> None:
        if not self.server.sessions.is_online(session.jid.bare):
            self._lists.pop(session.bare_str, None)

    # -- enforcement -----------------------------------------------------------------------

    @hook(events.FILTER_USER, priority=100)
    def filter_user(self, stanza: Stanza, origin: Session | None, to: JID) -> object:
        hosts = self.server.hosts
        if origin is not None and origin.local_client:
            sender, sender_key = origin.jid, origin.bare_str
            outbound = True
        else:
            claimed = stanza.get("from")
            if claimed is None:
                return None
            try:
                sender = JID.parse(claimed)
            except InvalidJID:
                return None  # not an address a blocklist can match
            sender_key = str(sender.bare)
            # Presence the server sends on a user's behalf (broadcasts, probes) is outbound
            # too: a blocked contact must not get it (XEP-0191 §3.3).
            outbound = (stanza.tag == st.PRESENCE and sender.local is not None
                        and sender.domain in hosts)
        to_key = str(to.bare)
        if sender_key == to_key:
            return None  # the account's own stanzas are never blocked
        lists = self._lists
        sender_list = lists.get(sender_key) if outbound else _EMPTY
        recipient_list = lists.get(to_key) if to.domain in hosts else _EMPTY
        if sender_list is None or recipient_list is None:
            return self._load_and_judge(stanza, to, sender, sender_list, recipient_list)
        if not sender_list.items and not recipient_list.items:
            return None  # the usual case, decided without a call: neither side blocks anyone
        return _verdict(stanza, to, sender, sender_list, recipient_list)

    async def _load_and_judge(self, stanza: Stanza, to: JID, sender: JID,
                              sender_list: Blocklist | None,
                              recipient_list: Blocklist | None) -> object:
        """A blocklist was not cached: read it, then decide (None: the stanza passes on)."""
        if sender_list is None:
            sender_list = await self._get(sender.bare)
        if recipient_list is None:
            recipient_list = await self._get(to.bare)
        return _verdict(stanza, to, sender, sender_list, recipient_list)

    @hook(events.ACCESS_DENY)
    def access_deny(self, presentity: JID, watcher: JID, _what: str) -> object:
        """Presence access rule: a presentity never shows itself to a JID it blocks. Uncached
        (offline) presentities need no answer here: `filter_user` drops anything from them."""
        blocklist = self._lists.get(str(presentity.bare))
        if blocklist and blocklist.blocks(watcher):
            return True
        return None

    # -- the blocklist protocol ------------------------------------------------------------

    @iq_get(ns.BLOCKING, "blocklist", to=("self",))
    async def get_blocklist(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        blocklist = await self._get(origin.jid.bare)
        self.interested.set(origin, True)
        answer = st.element(_BLOCKLIST)
        for jid in sorted(blocklist.items):
            st.child(answer, _ITEM, {"jid": jid})
        return st.result(stanza, answer)

    @iq_set(ns.BLOCKING, "block", to=("self",))
    async def block(self, stanza: Stanza, origin: Session | None) -> None:
        assert origin is not None
        jids = _items(stanza)
        if not jids:
            raise StanzaError("bad-request", "<block/> needs at least one <item/>")  # §3.3
        await self._change(stanza, origin, _BLOCK, jids)

    @iq_set(ns.BLOCKING, "unblock", to=("self",))
    async def unblock(self, stanza: Stanza, origin: Session | None) -> None:
        assert origin is not None
        await self._change(stanza, origin, _UNBLOCK, _items(stanza))  # none: all (§3.5)

    @iq_set(ns.BLOCKING, "blocklist", to=("self",))
    @iq_get(ns.BLOCKING, "block", to=("self",))
    @iq_get(ns.BLOCKING, "unblock", to=("self",))
    def wrong_type(self, stanza: Stanza, _origin: Session | None) -> None:
        if stanza.get("type") == "get":
            raise StanzaError("bad-request", "expected <blocklist/>")
        raise StanzaError("bad-request", "expected <block/> or <unblock/>")

    async def _change(self, stanza: Stanza, origin: Session, tag: str, jids: list[str]) -> None:
        bare = origin.jid.bare
        assert bare.local is not None
        store = self.server.storage.blocklists
        blocked = tag == _BLOCK
        async with self._changing:
            before = await self._get(bare)
            if blocked:
                await store.add(bare.local, bare.domain, jids)
                after = Blocklist(before.items | set(jids))
                changed = [j for j in jids if j not in before.items]
            elif jids:
                await store.remove(bare.local, bare.domain, jids)
                after = Blocklist(before.items - set(jids))
                changed = [j for j in jids if j in before.items]
            else:
                await store.clear(bare.local, bare.domain)
                after = _EMPTY
                changed = sorted(before.items)
            notes = await self._presence_notes(bare, changed, blocked)
            # [cluster] every other node drops its copy (and reads the stored list again)
            # before the answer and the pushes: a client that saw either finds the change
            # in force on every node.
            if self.changed is not None:
                await self.changed(bare)
            # From here to the cache update nothing awaits: no stanza sees a half-made change.
            # The answer first, then the pushes (XEP-0191 §3.3, §3.4 examples).
            origin.send(st.result(stanza))
            push = st.element(tag)
            for jid in jids:
                st.child(push, _ITEM, {"jid": jid})
            for session in self.server.sessions.resources(bare):
                # A session on another node: its node keeps its slots, the directory only its
                # roster interest, taken as the sign of a client that handles pushes.
                if self.interested.get(session) or (session.remote and session.interested):
                    iq: Stanza = st.iq("set", to=session.jid_str,
                                       id_=f"block-push-{next(self._push_ids)}")
                    iq.append(copy.deepcopy(push))
                    session.send(iq)
            # The filter judges a stanza as it is routed (before route() returns): a block's
            # unavailable presence goes out while the contact is not blocked yet, an unblock's
            # presence once it is not any more.
            routed = self._route(notes) if blocked else []
            if self.server.sessions.is_online(bare):
                self._lists[origin.bare_str] = after
            if not blocked:
                routed = self._route(notes)
        log.info("event=blocklist-%s jid=%s count=%d", "block" if blocked else "unblock",
                 bare, len(changed))
        for pending in routed:  # delivery, outside the lock (federation may take a while)
            await pending

    async def _presence_notes(self, bare: JID, changed: list[str],
                              blocked: bool) -> list[Stanza]:
        """XEP-0191 §3.3: on block, unavailable presence to the contact; §3.4: on unblock, the
        current presence. Both only where the contact may receive presence (a subscriber)."""
        contacts = [c for c in map(JID.parse, changed) if c.local is not None]
        if not contacts or self.server.module(Presence) is None:
            return []  # no presence module: no presence was shared
        from server.presence.subscription import is_subscriber
        from server.roster import state_of

        roster = await self.server.rosters.get(bare)
        available = [s for s in self.server.sessions.resources(bare) if s.presence is not None]
        notes = []
        for contact in contacts:
            if not is_subscriber(state_of(roster.items.get(str(contact.bare)))):
                continue
            for session in available:
                presence: Stanza | None
                if blocked:
                    presence = st.element(st.PRESENCE, {"type": "unavailable"})
                else:
                    presence = copy.deepcopy(session.presence)
                assert presence is not None
                presence.set("from", session.jid_str)
                presence.set("to", str(contact))
                notes.append(presence)
        return notes

    def _route(self, stanzas: list[Stanza]) -> list[Awaitable[None]]:
        """Route the server's own stanzas; what is still to do is returned, to await in order."""
        routed = (self.server.router.route(stanza, None) for stanza in stanzas)
        return [pending for pending in routed if pending is not None]


def _verdict(stanza: Stanza, to: JID, sender: JID, sender_list: Blocklist,
             recipient_list: Blocklist) -> object:
    if sender_list and sender_list.blocks(to):
        return _outbound_blocked(stanza)
    if recipient_list and recipient_list.blocks(sender):
        return _inbound_blocked(stanza)
    return None


def _outbound_blocked(stanza: Stanza) -> object:
    """XEP-0191 §3.3: the user sends to a contact they block."""
    type_ = stanza.get("type")
    if (stanza.tag == st.PRESENCE or type_ == "error"
            or (stanza.tag == st.IQ and type_ == "result")):
        return True  # dropped: presence goes quietly, errors and results are never answered
    reply: Stanza = st.error_reply(stanza, StanzaError("not-acceptable"))
    error = reply.find(st.ERROR)
    assert error is not None
    st.child(error, ns.q(BLOCKING_ERRORS, "blocked"))
    return reply


def _inbound_blocked(stanza: Stanza) -> object:
    """XEP-0191 §3.5: a blocked entity sends to the user."""
    type_ = stanza.get("type")
    if stanza.tag == st.PRESENCE:
        return True  # no error: the contact must not learn it is blocked from presence
    if stanza.tag == st.IQ and type_ not in ("get", "set"):
        return True
    raise StanzaError("service-unavailable")  # the router never answers type='error'


def _items(stanza: Stanza) -> list[str]:
    """The JIDs of a <block/> or <unblock/>, normalised, each once."""
    request = st.payload(stanza)
    assert request is not None  # the router checked there is exactly one
    jids = []
    for item in request:
        if item.tag != _ITEM:
            continue
        try:
            jid = JID.parse(item.get("jid", ""))
        except InvalidJID as exc:
            raise StanzaError("jid-malformed", f"invalid item: {exc}") from exc
        text = str(jid)
        if text not in jids:
            jids.append(text)
    return jids
