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
from collections.abc import Awaitable
from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, Stanza
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.visibility")
module = Module("visibility")

HIDDEN = ns.q(ns.WATCHERS, "hidden")
HIDE = ns.q(ns.WATCHERS, "hide")
UNHIDE = ns.q(ns.WATCHERS, "unhide")
ITEM = ns.q(ns.WATCHERS, "item")
MAX_HIDDEN = 1000  # contacts one account may hide
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_comments=True,
                          remove_pis=True)

_hidden: dict[JID, frozenset[str]] = {}  # bare JID -> hidden bare JIDs, accounts with sessions
_changing = asyncio.Lock()
_passed: set[int] = set()  # ids of stanzas re-routed after a load (checked already)


def _server() -> Any:
    assert module.server is not None
    return module.server


async def _load(bare: JID) -> frozenset[str]:
    cached = _hidden.get(bare)
    if cached is not None:
        return cached
    assert bare.local is not None
    stored = await _server().storage.private.get(bare.local, bare.domain, ns.WATCHERS, "hidden")
    hidden = frozenset(_parse(stored)) if stored else frozenset()
    if _server().sessions.is_online(bare):
        hidden = _hidden.setdefault(bare, hidden)  # a change made meanwhile wins
    return hidden


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


@module.on("session-bound")
def bound(session: Session) -> Awaitable[frozenset[str]] | None:
    if session.jid.bare in _hidden:
        return None
    return _load(session.jid.bare)


@module.on("session-closed")
def closed(session: Session, _reason: str) -> None:
    if not _server().sessions.is_online(session.jid.bare):
        _hidden.pop(session.jid.bare, None)


# -- enforcement ---------------------------------------------------------------------------------

@module.on("access/deny")
def access_deny(presentity: JID, watcher: JID, what: str) -> object:
    if what != "presence":
        return None  # hiding is about presence, not about who may subscribe
    hidden = _hidden.get(presentity.bare)
    if hidden and str(watcher.bare) in hidden:
        return True
    return None


@module.on("filter/user", priority=90)
def filter_user(stanza: Stanza, origin: Session | None, to: JID) -> object:
    """Whatever path a presentity's presence takes (broadcast, logout, directed, the answer to
    a subscription), it does not reach a watcher it hides from."""
    if stanza.tag != st.PRESENCE or stanza.get("type") not in (None, "unavailable"):
        return None
    if id(stanza) in _passed:
        return None
    try:
        sender = JID.parse(stanza.get("from", ""))
    except InvalidJID:
        return None
    if sender.local is None or sender.domain not in _server().hosts or sender.bare == to.bare:
        return None
    hidden = _hidden.get(sender.bare)
    if hidden is not None:
        return True if str(to.bare) in hidden else None
    if sender.resource is None or stanza.get("type") != "unavailable":
        return None  # probe answers from the bare JID: the probe hook has decided already
    # A logout after the account's cache was dropped (session-closed runs first).
    return _filter_uncached(stanza, origin, sender.bare, to)


async def _filter_uncached(stanza: Stanza, origin: Session | None, sender: JID,
                           to: JID) -> bool:
    if str(to.bare) in await _load(sender):
        return True
    return await _reroute(stanza, origin)


@module.on("presence/broadcast", priority=10)
def broadcast(stanza: Stanza, origin: Session) -> object:
    # The broadcast consults access/deny synchronously: make sure the set is loaded first
    # (session-bound starts the load, but does not hold the stream until it is done).
    if stanza.get("type") is not None or origin.jid.bare in _hidden or id(stanza) in _passed:
        return None
    return _load_then_route(stanza, origin)


async def _load_then_route(stanza: Stanza, origin: Session) -> bool:
    await _load(origin.jid.bare)
    return await _reroute(stanza, origin)


@module.on("presence/bare", priority=40)
@module.on("presence/full", priority=40)
def probe(stanza: Stanza, origin: Session | None, to: JID) -> object:
    """RFC 6121 §4.3.2, inbound: a hidden watcher's probe is answered as if the presentity
    were offline."""
    if stanza.get("type") != "probe" or getattr(origin, "local_client", False):
        return None
    try:
        watcher = JID.parse(stanza.get("from", ""))
    except InvalidJID:
        return None
    hidden = _hidden.get(to.bare)
    if hidden is not None:
        return _answer_hidden(to.bare, watcher) if str(watcher.bare) in hidden else None
    if id(stanza) in _passed:
        return None
    return _probe_uncached(stanza, origin, to.bare, watcher)


async def _probe_uncached(stanza: Stanza, origin: Session | None, presentity: JID,
                          watcher: JID) -> bool:
    assert presentity.local is not None
    if not await _server().storage.accounts.exists(presentity.local, presentity.domain):
        return await _reroute(stanza, origin)  # no such account: presence answers that
    hidden = await _load(presentity)
    if str(watcher.bare) in hidden:
        await _answer_hidden(presentity, watcher)
        return True
    return await _reroute(stanza, origin)


async def _reroute(stanza: Stanza, origin: Session | None) -> bool:
    """Route the stanza (again), marked as checked here: this module's hooks let it pass."""
    key = id(stanza)
    _passed.add(key)
    try:
        # Marked until routing is over: other hooks may defer and route it again themselves.
        pending = _server().router.route(stanza, origin)
        if pending is not None:
            await pending
    finally:
        _passed.discard(key)
    return True


async def _answer_hidden(presentity: JID, watcher: JID) -> bool:
    _server().hooks.fire_all("presence/fetched", presentity, watcher, False)
    answer = st.element(st.PRESENCE, {"type": "unavailable", "from": str(presentity),
                                      "to": str(watcher)})
    return await _reroute(answer, None)


# -- the protocol --------------------------------------------------------------------------------

@module.iq_set(ns.WATCHERS, to=("self",))
async def set_hidden(stanza: Stanza, origin: Session | None) -> None:
    request = st.payload(stanza)
    if request is None or request.tag not in (HIDE, UNHIDE):
        raise StanzaError("bad-request", "expected <hide/> or <unhide/>")
    assert origin is not None
    try:
        contact = JID.parse(request.get("jid", "")).bare
    except InvalidJID as exc:
        raise StanzaError("jid-malformed", f"invalid 'jid': {exc}") from exc
    user = origin.jid.bare
    if contact == user or contact.local is None:
        raise StanzaError("bad-request", "hide an account other than your own")
    hide = request.tag == HIDE
    assert user.local is not None
    async with _changing:
        before = await _load(user)
        after = before | {str(contact)} if hide else before - {str(contact)}
        if after == before:
            origin.send(st.result(stanza))
            return
        if len(after) > MAX_HIDDEN:
            raise StanzaError("resource-constraint", f"at most {MAX_HIDDEN} hidden contacts")
        await _server().storage.private.set(user.local, user.domain,
                                            [(ns.WATCHERS, "hidden", _serialise(after))])
        if _server().sessions.is_online(user):
            _hidden[user] = after
    log.info("event=%s jid=%s", "hide" if hide else "unhide", user)
    origin.send(st.result(stanza))  # the answer first, then the presence it causes
    await _presence_after_change(user, contact, hide)


async def _presence_after_change(user: JID, contact: JID, hidden: bool) -> None:
    """On hide, unavailable from each available resource; on unhide, the current presence.
    Only to a subscriber (nobody else had presence), and only as other rules allow."""
    server = _server()
    from server.presence.subscription import is_subscriber
    from server.roster import state_of

    roster = await server.rosters.get(user)
    if not is_subscriber(state_of(roster.items.get(str(contact)))):
        return
    if not hidden and server.access.denied(user, contact):
        return  # e.g. blocked (XEP-0191): still no presence
    for session in server.sessions.resources(user):
        if session.presence is None:
            continue
        if hidden:
            note = st.element(st.PRESENCE, {"type": "unavailable"})
        else:
            note = copy.deepcopy(session.presence)
        note.set("from", str(session.jid))
        note.set("to", str(contact))
        await _reroute(note, None)  # marked: the filter would drop the unavailable
