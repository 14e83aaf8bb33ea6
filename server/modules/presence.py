"""Presence (RFC 6121 §3–§4) on the RFC 2778 model: notifications to watchers, fetches
(probes), directed presence, and the subscription handshakes that make watchers.

Outbound processing (the user's server) happens for stanzas from a local client session;
inbound processing (the contact's server) for stanzas addressed to a local account.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable
from typing import Any

from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza
from server.presence import presentity as pt
from server.presence.access import AccessRules
from server.presence.subscription import (
    Kind,
    inbound,
    is_subscriber,
    outbound,
    roster_item_needed,
)
from server.roster import RosterManager, state_of, with_state
from server.sessions import Session
from server.storage.base import RosterItem
from server.xml import ns
from server.xml.stanza import standalone

log = logging.getLogger("presenced.presence")
module = Module("presence")
module.feature(ns.PRE_APPROVAL)
SUBSCRIPTION_KINDS = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
PRESENCE = ns.q(ns.CLIENT, "presence")
_SHOW = ns.q(ns.CLIENT, "show")


@module.on_load
def load(server):
    server.access = AccessRules(server.hooks, server.config.presence.cross_domain_subscriptions)


@module.stream_feature
def pre_approval(_server: object) -> Stanza:
    # RFC 6121 §3.4: advertise subscription pre-approval.
    return etree.Element(ns.q(ns.PRE_APPROVAL, "sub"), nsmap={None: ns.PRE_APPROVAL})


def _server() -> Any:
    assert module.server is not None
    return module.server


def _rosters() -> RosterManager:
    manager: RosterManager = _server().rosters
    return manager


def _route(stanza: Stanza) -> Awaitable[None] | None:
    return _server().router.route(stanza, None)


async def _route_all(stanzas: list[Stanza]) -> None:
    for stanza in stanzas:
        pending = _route(stanza)
        if pending is not None:
            await pending


def _presence(type_: str | None, from_: str, to: str) -> Stanza:
    attrs = {"from": from_, "to": to}
    if type_ is not None:
        attrs["type"] = type_
    return etree.Element(PRESENCE, attrs, nsmap={None: ns.CLIENT})


def _is_local_client(origin: Session | None) -> bool:
    return origin is not None and getattr(origin, "local_client", False)


# -- presence without 'to': broadcast (RFC 6121 §4.2, §4.4, §4.5) ----------------------------

@module.on("presence/broadcast")
def broadcast(stanza: Stanza, origin: Session) -> Any:
    type_ = stanza.get("type")
    if type_ is None:
        _validate_available(stanza)
        return _available(stanza, origin)
    if type_ == "unavailable":
        return _unavailable(origin, stanza)
    if type_ == "error":
        return True
    # A subscription or probe needs a 'to' (RFC 6121 §3.1.1, §4.3).
    raise StanzaError("bad-request", f"presence of type {type_!r} needs a 'to'")


def _validate_available(stanza: Stanza) -> None:
    try:
        pt.parse_priority(stanza)
    except ValueError as exc:
        raise StanzaError("bad-request", "priority must be an integer from -128 to 127") from exc
    show = stanza.findtext(_SHOW)
    if show is not None and show not in pt.SHOW_VALUES:
        raise StanzaError("bad-request", "show must be away, chat, dnd or xa")


async def _available(stanza: Stanza, session: Session) -> bool:
    first = session.presence is None
    # Modules may complete the presence before it goes out (e.g. the XEP-0153 avatar hash).
    for pending in _server().hooks.fire_all("presence/outgoing", session, stanza):
        if asyncio.iscoroutine(pending):
            await pending
    session.priority = pt.parse_priority(stanza)
    session.presence = standalone(stanza)  # kept: must not pin the stream's parser
    user = session.jid.bare
    roster = await _rosters().get(user)
    access: AccessRules = _server().access
    notes = []
    for contact, item in roster.items.items():
        # RFC 6121 §4.2.2 / §4.4.2: to every subscriber the access rules allow.
        if is_subscriber(state_of(item)) and not access.denied(user, JID.parse(contact)):
            notes.append(pt.notification(stanza, contact))
    # ... and to all of the user's own available resources (the sender included).
    for own in _server().sessions.resources(user):
        if own.presence is not None:
            own.send(pt.notification(stanza, str(own.jid)))
    if first:
        await _on_initial_presence(session, roster)
    await _route_all(notes)
    for pending in _server().hooks.fire_all("presence/available", session, first):
        if asyncio.iscoroutine(pending):
            await pending
    return True


async def _on_initial_presence(session: Session, roster: Any) -> None:
    """RFC 6121 §4.2.2: probe the contacts the user is subscribed to; §3.1.3: redeliver
    pending subscription requests."""
    user = session.jid.bare
    sessions = _server().sessions
    for contact, item in roster.items.items():
        state = state_of(item)
        if state is not None and state.to:
            contact_jid = JID.parse(contact)
            if contact_jid.domain in _server().hosts:
                # Answer the probe from local state, for this session only, as the access
                # rules allow (a probe would be refused: blocking, per-contact visibility).
                shown = not _server().access.denied(contact_jid, session.jid)
                for other in pt.tuples(contact_jid, sessions) if shown else ():
                    note = pt.notification(other.stanza, str(session.jid))
                    session.send(note)
            else:
                await _route_all([_presence("probe", str(user), contact)])
        if item.pending_in and item.request:
            request = etree.fromstring(item.request)
            request.set("to", str(user))
            session.send(request)


async def _unavailable(session: Session, stanza: Stanza | None) -> bool:
    """The resource went unavailable (its own presence, or it disconnected)."""
    if session.presence is None and not session.directed:
        return True
    was_available = session.presence is not None
    session.presence = None
    user = session.jid.bare
    source = stanza if stanza is not None else pt.unavailable(session)
    notes: list[Stanza] = []
    if was_available:
        roster = await _rosters().get(user)
        for contact, item in roster.items.items():
            if is_subscriber(state_of(item)):
                notes.append(pt.notification(source, contact))
        for own in _server().sessions.resources(user):
            if own.presence is not None and own is not session:
                own.send(pt.notification(source, str(own.jid)))
    # RFC 6121 §4.6.3: undo directed presence.
    for target in session.directed or ():
        notes.append(pt.notification(source, str(target)))
    session.directed = None
    await _route_all(notes)
    return True


@module.on("session-closed")
def closed(session: Session, _reason: str) -> Awaitable[None] | None:
    async def finish() -> None:
        await _unavailable(session, None)
        if not _server().sessions.is_online(session.jid.bare):
            _rosters().forget(session.jid.bare)
    return finish()


@module.on("access/may-see-presence")
def may_see_presence(presentity: JID, watcher: JID) -> Awaitable[bool]:
    """For other modules (e.g. last activity, XEP-0012 §4): the same decision as for a probe."""
    async def decide() -> bool:
        roster = await _rosters().get(presentity)
        allowed: bool = _server().access.may_see_presence(presentity, roster, watcher)
        return allowed
    return decide()


# -- presence with 'to' -------------------------------------------------------------------------

@module.on("presence/bare")
def to_bare(stanza: Stanza, origin: Session | None, to: JID) -> Any:
    return _addressed(stanza, origin, to)


@module.on("presence/full")
def to_full(stanza: Stanza, origin: Session | None, to: JID) -> Any:
    return _addressed(stanza, origin, to)


@module.on("presence/host")
def to_host(stanza: Stanza, origin: Session | None, to: JID) -> Any:
    return True  # presence to the server itself: nothing to do


@module.on("route/remote", priority=100)
def remote(stanza: Stanza, origin: Session | None, to: JID) -> Any:
    """Outbound processing for a remote contact, before federation sees the stanza."""
    if stanza.tag == PRESENCE and _is_local_client(origin):
        return _outbound(stanza, origin, to)  # type: ignore[arg-type]
    return None


def _addressed(stanza: Stanza, origin: Session | None, to: JID) -> Any:
    if _is_local_client(origin):
        return _outbound(stanza, origin, to)  # type: ignore[arg-type]
    return _inbound(stanza, to)


async def _outbound(stanza: Stanza, session: Session, to: JID) -> bool:
    type_ = stanza.get("type")
    user = session.jid.bare
    if type_ in SUBSCRIPTION_KINDS:
        await _outbound_subscription(stanza, session, to.bare, type_)
        return True
    if type_ is None or type_ == "unavailable":
        # RFC 6121 §4.6: directed presence; tracked unless the target is a subscriber.
        if type_ is None:
            _validate_available(stanza)
        roster = await _rosters().get(user)
        subscriber = is_subscriber(state_of(roster.items.get(str(to.bare))))
        if not subscriber and type_ is None and session.presence is not None:
            if session.directed is None:
                session.directed = set()
            session.directed.add(to)
        elif type_ == "unavailable" and session.directed:
            session.directed.discard(to)
    # Outbound processing is done: routed on as the server's own (origin None).
    await _route_all([stanza])
    return True


async def _outbound_subscription(stanza: Stanza, session: Session, contact: JID,
                                 kind: Kind) -> None:
    user = session.jid.bare
    manager = _rosters()
    if contact == user:
        raise StanzaError("bad-request", "you cannot subscribe to yourself")
    async with manager.lock(user):
        roster = await manager.get(user)
        item = roster.items.get(str(contact))
        decision = outbound(state_of(item), kind)
        base = item or RosterItem(contact=str(contact), listed=False)
        listed = base.listed or decision.create_item
        request = None if kind == "subscribed" and decision.route else base.request
        new = RosterItem(**{**_fields(with_state(base, decision.state)), "listed": listed,
                            "request": request})
        if new != base or item is None:
            if roster_item_needed(decision.state, listed=listed):
                await manager.put(user, new, push=decision.roster_push or listed != base.listed)
            elif item is not None:
                await manager.remove(user, str(contact))
    notes: list[Stanza] = []
    if decision.send_unavailable:
        # RFC 6121 §3.2.2: unavailable first, while the contact is still a subscriber.
        for other in _server().sessions.resources(user):
            if other.presence is not None:
                notes.append(pt.unavailable(other, str(contact)))
    if decision.route:
        # RFC 6121 §3.1.2: stamped with the user's bare JID.
        out = _presence(kind, str(user), str(contact))
        for el in stanza:
            out.append(_copy(el))
        notes.append(out)
    if decision.send_presence:
        for t in pt.tuples(user, _server().sessions):
            notes.append(pt.notification(t.stanza, str(contact)))
    await _route_all(notes)


async def _inbound(stanza: Stanza, to: JID) -> bool:
    type_ = stanza.get("type")
    sessions = _server().sessions
    if type_ in SUBSCRIPTION_KINDS:
        await _inbound_subscription(stanza, to.bare, type_)
        return True
    if type_ == "probe":
        await _probe(stanza, to.bare)
        return True
    # Available, unavailable or error presence for a local user (RFC 6121 §8.5.2.1.2,
    # §8.5.3): a full JID gets it if connected; a bare JID on all available resources.
    if to.resource is not None:
        session = sessions.get(to)
        if session is not None:
            session.send(stanza)
        return True
    for session in sessions.resources(to):
        if session.presence is not None:
            session.send(pt.notification(stanza, str(session.jid)))
    return True


async def _inbound_subscription(stanza: Stanza, user: JID, kind: Kind) -> None:
    sender = JID.parse(stanza.get("from", "")).bare
    server = _server()
    manager = _rosters()
    assert user.local is not None
    if not await server.storage.accounts.exists(user.local, user.domain):
        # RFC 6121 §3.1.3: no such user: answer a subscribe with unsubscribed.
        if kind == "subscribe":
            await _route_all([_presence("unsubscribed", str(user), str(sender))])
        return
    if kind == "subscribe" and not server.access.may_subscribe(user, sender):
        await _route_all([_presence("unsubscribed", str(user), str(sender))])
        return
    async with manager.lock(user):
        roster = await manager.get(user)
        item = roster.items.get(str(sender))
        decision = inbound(state_of(item), kind)
        if decision.state != state_of(item) or decision.store_pending:
            base = item or RosterItem(contact=str(sender), listed=False)
            new = with_state(base, decision.state)
            request = etree.tostring(stanza).decode() if decision.store_pending else (
                None if not decision.state.pending_in else base.request)
            new = RosterItem(**{**_fields(new), "request": request})
            if roster_item_needed(decision.state, listed=new.listed):
                await manager.put(user, new, push=decision.roster_push)
            elif item is not None:
                await manager.remove(user, str(sender))
    notes: list[Stanza] = []
    if decision.deliver:
        # RFC 6121 §3.1.3: deliver to all available resources (stanza from the bare JID).
        stamped = _presence(kind, str(sender), str(user))
        for el in stanza:
            stamped.append(_copy(el))
        for session in server.sessions.resources(user):
            if session.presence is not None:
                session.send(pt.notification(stamped, str(session.jid)))
    if decision.auto_reply:
        notes.append(_presence(decision.auto_reply, str(user), str(sender)))
    if decision.send_presence:
        for t in pt.tuples(user, server.sessions):
            notes.append(pt.notification(t.stanza, str(sender)))
    if decision.send_unavailable:
        for session in server.sessions.resources(user):
            if session.presence is not None:
                notes.append(pt.unavailable(session, str(sender)))
    await _route_all(notes)


async def _probe(stanza: Stanza, presentity: JID) -> None:
    """A fetch (RFC 2778 §2.2; RFC 6121 §4.3.2): current tuples only for allowed watchers.
    Anyone else gets 'unsubscribed', the same answer as for a missing account, so a probe
    reveals neither presence nor existence."""
    server = _server()
    watcher = JID.parse(stanza.get("from", ""))
    assert presentity.local is not None
    roster = await _rosters().get(presentity)
    allowed = server.access.may_see_presence(presentity, roster, watcher)
    server.hooks.fire_all("presence/fetched", presentity, watcher, allowed)
    if not allowed:
        answer = _presence("unsubscribed", str(presentity), str(watcher))
        local = server.sessions.get(watcher) if watcher.resource else None
        if local is not None:
            local.send(answer)  # an answer to a fetch, not a subscription change to process
        else:
            await _route_all([answer])
        return
    current = pt.tuples(presentity, server.sessions)
    if not current:
        await _route_all([_presence("unavailable", str(presentity), str(watcher))])
        return
    await _route_all([pt.notification(t.stanza, str(watcher)) for t in current])


def _fields(item: RosterItem) -> dict[str, Any]:
    return {name: getattr(item, name) for name in RosterItem.__slots__}


def _copy(el: Stanza) -> Stanza:
    return copy.deepcopy(el)
