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
from collections.abc import Iterable
from typing import Any

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, Stanza
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.blocking")

module = Module("blocking")
module.feature(ns.BLOCKING)

BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
_BLOCKLIST = ns.q(ns.BLOCKING, "blocklist")
_BLOCK = ns.q(ns.BLOCKING, "block")
_UNBLOCK = ns.q(ns.BLOCKING, "unblock")
_ITEM = ns.q(ns.BLOCKING, "item")
_INTERESTED = "blocking.interested"  # session.extra key: the session requested the blocklist


class Blocklist:
    """The JIDs one account blocks, matched as XEP-0191 §6 / XEP-0016 §2.1 say: an item that
    is a full JID matches that JID only, a bare JID any of its resources, a domain the domain
    and every JID at it."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[str] = ()) -> None:
        self.items = frozenset(items)

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
_lists: dict[JID, Blocklist] = {}   # bare JID -> blocklist, for accounts with a bound session
_changing = asyncio.Lock()          # serialises changes, so pushes go out in storage order
_passed: set[int] = set()           # ids of stanzas already checked, re-routed after a load
_push_ids = itertools.count(1)


def _server() -> Any:
    assert module.server is not None
    return module.server


async def _get(bare: JID) -> Blocklist:
    cached = _lists.get(bare)
    if cached is not None:
        return cached
    assert bare.local is not None
    blocklist = Blocklist(await _server().storage.blocklists.get(bare.local, bare.domain))
    # Only accounts with sessions are cached; a change in between (under _changing) wins.
    if _server().sessions.is_online(bare):
        blocklist = _lists.setdefault(bare, blocklist)
    return blocklist


@module.on("session-bound")
def bound(session: Session) -> object:
    if session.jid.bare in _lists:
        return None
    return _get(session.jid.bare)


@module.on("session-closed")
def closed(session: Session, _reason: str) -> None:
    bare = session.jid.bare
    if not _server().sessions.is_online(bare):
        _lists.pop(bare, None)


# -- enforcement ---------------------------------------------------------------------------------

@module.on("filter/user", priority=100)
def filter_user(stanza: Stanza, origin: Session | None, to: JID) -> object:
    if _passed and id(stanza) in _passed:
        return None
    hosts = _server().hosts
    sender: JID | None = None
    outbound = False
    if origin is not None and getattr(origin, "local_client", False):
        sender = origin.jid
        outbound = True
    else:
        claimed = stanza.get("from")
        if claimed is not None:
            try:
                sender = JID.parse(claimed)
            except InvalidJID:
                return None  # not an address a blocklist can match
            # Presence the server sends on a user's behalf (broadcasts, probes) is outbound
            # too: a blocked contact must not get it (XEP-0191 §3.3).
            outbound = (stanza.tag == st.PRESENCE and sender.local is not None
                        and sender.domain in hosts)
    if sender is None or sender.bare == to.bare:
        return None  # the account's own stanzas are never blocked
    sender_list: Blocklist | None = _EMPTY
    if outbound:
        sender_list = _lists.get(sender.bare)
    recipient_list: Blocklist | None = _EMPTY
    if to.local is not None and to.domain in hosts:
        recipient_list = _lists.get(to.bare)
    if sender_list is None or recipient_list is None:
        return _load_then_route(stanza, origin, to, sender, outbound)
    return _verdict(stanza, to, sender, sender_list, recipient_list)


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


async def _load_then_route(stanza: Stanza, origin: Session | None, to: JID, sender: JID,
                           outbound: bool) -> object:
    """A blocklist was not cached: read it, decide, then route the stanza on (marked as
    checked so that the filter lets it pass this time)."""
    sender_list = await _get(sender.bare) if outbound else _EMPTY
    recipient_list = _EMPTY
    if to.local is not None and to.domain in _server().hosts:
        recipient_list = await _get(to.bare)
    verdict = _verdict(stanza, to, sender, sender_list, recipient_list)
    if verdict is not None:
        return verdict
    key = id(stanza)
    _passed.add(key)
    try:
        pending = _server().router.route(stanza, origin)
    finally:
        _passed.discard(key)
    if pending is not None:
        await pending
    return True


@module.on("access/deny")
def access_deny(presentity: JID, watcher: JID, _what: str) -> object:
    """Presence access rule: a presentity never shows itself to a JID it blocks. Uncached
    (offline) presentities need no answer here: `filter_user` drops anything from them."""
    blocklist = _lists.get(presentity.bare)
    if blocklist and blocklist.blocks(watcher):
        return True
    return None


# -- the blocklist protocol ----------------------------------------------------------------------

@module.iq_get(ns.BLOCKING, to=("self",))
async def get_blocklist(stanza: Stanza, origin: Session | None) -> Stanza:
    request = st.payload(stanza)
    if request is None or request.tag != _BLOCKLIST:
        raise StanzaError("bad-request", "expected <blocklist/>")
    assert origin is not None
    bare = origin.jid.bare
    blocklist = await _get(bare)
    # XEP-0191 §3.2: a resource that asked for the blocklist gets pushes from now on.
    if origin.extra is None:
        origin.extra = {}
    origin.extra[_INTERESTED] = True
    answer = st.element(_BLOCKLIST)
    for jid in sorted(blocklist.items):
        st.child(answer, _ITEM, {"jid": jid})
    return st.result(stanza, answer)


def _items(request: Stanza) -> list[str]:
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


@module.iq_set(ns.BLOCKING, to=("self",))
async def set_blocklist(stanza: Stanza, origin: Session | None) -> None:
    assert origin is not None
    request = st.payload(stanza)
    if request is None:
        raise StanzaError("bad-request", "expected <block/> or <unblock/>")
    if request.tag == _BLOCK:
        jids = _items(request)
        if not jids:
            raise StanzaError("bad-request", "<block/> needs at least one <item/>")  # §3.3
        await _change(stanza, origin, request.tag, jids)
    elif request.tag == _UNBLOCK:
        await _change(stanza, origin, request.tag, _items(request))  # none: unblock all (§3.5)
    else:
        raise StanzaError("bad-request", "expected <block/> or <unblock/>")


async def _change(stanza: Stanza, origin: Session, tag: str, jids: list[str]) -> None:
    bare = origin.jid.bare
    assert bare.local is not None
    store = _server().storage.blocklists
    async with _changing:
        before = await _get(bare)
        if tag == _BLOCK:
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
        if _server().sessions.is_online(bare):
            _lists[bare] = after
        # The answer first, then the pushes (XEP-0191 §3.3, §3.4 examples).
        origin.send(st.result(stanza))
        push = st.element(tag)
        for jid in jids:
            st.child(push, _ITEM, {"jid": jid})
        for session in _server().sessions.resources(bare):
            if session.extra and session.extra.get(_INTERESTED):
                iq: Stanza = st.iq("set", to=str(session.jid), id_=f"block-push-{next(_push_ids)}")
                iq.append(copy.deepcopy(push))
                session.send(iq)
    log.info("event=blocklist-%s jid=%s count=%d", "block" if tag == _BLOCK else "unblock",
             bare, len(changed))
    contacts = [JID.parse(j) for j in changed]
    contacts = [c for c in contacts if c.local is not None]
    if contacts:
        await _presence_after_change(bare, contacts, blocked=tag == _BLOCK)


async def _presence_after_change(bare: JID, contacts: list[JID], blocked: bool) -> None:
    """XEP-0191 §3.3: on block, unavailable presence to the contact; §3.4: on unblock, the
    current presence. Both only where the contact may receive presence (a subscriber)."""
    server = _server()
    rosters = getattr(server, "rosters", None)
    if rosters is None:
        return  # no presence module: no presence was shared
    from server.presence.subscription import is_subscriber
    from server.roster import state_of

    roster = await rosters.get(bare)
    available = [s for s in server.sessions.resources(bare) if s.presence is not None]
    stanzas = []
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
            presence.set("from", str(session.jid))
            presence.set("to", str(contact))
            stanzas.append(presence)
    for note in stanzas:
        # Routed as the server's own; passed through the filter (it now blocks the contact).
        key = id(note)
        _passed.add(key)
        try:
            pending = server.router.route(note, None)
        finally:
            _passed.discard(key)
        if pending is not None:
            await pending
