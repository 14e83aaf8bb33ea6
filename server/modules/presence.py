"""Presence (RFC 6121 §3–§4) on the RFC 2778 model: notifications to watchers, fetches
(probes), directed presence, and the subscription handshakes that make watchers.

Outbound processing (the user's server) happens for stanzas from a local client session;
inbound processing (the contact's server) for stanzas addressed to a local account.

Events it fires for other modules: ``presence/outgoing`` (session, stanza) before an available
presence goes out; ``presence/available`` (session, first) after it went out;
``presence/unavailable`` (session, stanza or None on disconnect) after an available resource
became unavailable (the session no longer counts as available then); ``presence/fetched``
(presentity, watcher, allowed) for each probe. It answers ``access/may-see-presence``.

    [presence]
    max_fetches_per_minute = 6          # read by the watchers module (RFC 2778 §2.2 pollers)
    cross_domain_subscriptions = true
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from lxml import etree

from server import events
from server.config import bool_option, int_option
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, ModuleContext, Stanza, hook, stream_feature
from server.presence import presentity as pt
from server.presence.access import AccessRules
from server.presence.subscription import (
    Kind,
    inbound,
    is_subscriber,
    outbound,
    roster_item_needed,
)
from server.roster import Roster, RosterManager, state_of, with_state
from server.sessions import Session
from server.storage.base import RosterItem
from server.xml import ns
from server.xml.stanza import PRESENCE, element, standalone

if TYPE_CHECKING:
    pass

log = logging.getLogger("presenced.presence")
SUBSCRIPTION_KINDS = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
_SHOW = ns.q(ns.CLIENT, "show")
_PRIORITY = ns.q(ns.CLIENT, "priority")


@dataclass(frozen=True, slots=True, kw_only=True)
class PresenceSettings:
    # A watcher fetching (probing) more often is a poller over the limit (RFC 2778 §2.2).
    max_fetches_per_minute: int = field(metadata=int_option(1, 10000, 6))
    cross_domain_subscriptions: bool = field(metadata=bool_option(True))


class Presence(Module):
    name = "presence"
    features = (ns.PRE_APPROVAL,)
    settings = PresenceSettings

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        self.access: AccessRules = server.access  # the core's (server/presence/access.py)

    @stream_feature
    def pre_approval(self) -> Stanza:
        # RFC 6121 §3.4: advertise subscription pre-approval.
        return element(ns.q(ns.PRE_APPROVAL, "sub"))

    @property
    def rosters(self) -> RosterManager:
        return self.server.rosters

    def _may_subscribe(self, presentity: JID, watcher: JID) -> bool:
        """Server-wide rule: subscriptions across domains can be switched off."""
        if not self.config.cross_domain_subscriptions and presentity.domain != watcher.domain:
            return False
        return not self.access.denied(presentity, watcher, "subscribe")

    async def _route_all(self, stanzas: list[Stanza]) -> None:
        router = self.server.router
        for stanza in stanzas:
            pending = router.route(stanza, None)
            if pending is not None:
                await pending

    # -- presence without 'to': broadcast (RFC 6121 §4.2, §4.4, §4.5) ------------------------

    @hook(events.PRESENCE_BROADCAST)
    def broadcast(self, stanza: Stanza, origin: Session) -> Any:
        type_ = stanza.get("type")
        if type_ is None:
            _normalize_available(stanza)
            return self._available(stanza, origin)
        if type_ == "unavailable":
            return self._unavailable(origin, stanza)
        if type_ == "error":
            return True
        # A subscription or probe needs a 'to' (RFC 6121 §3.1.1, §4.3).
        raise StanzaError("bad-request", f"presence of type {type_!r} needs a 'to'")

    async def _available(self, stanza: Stanza, session: Session) -> bool:
        server = self.server
        first = session.presence is None
        # Modules may complete the presence before it goes out (e.g. the XEP-0153 avatar hash).
        await self.server.hooks.notify(events.PRESENCE_OUTGOING, session, stanza)
        session.priority = pt.parse_priority(stanza)
        session.presence = standalone(stanza)  # kept: must not pin the stream's parser
        user = session.jid.bare
        roster = await self.rosters.get(user)
        access = self.access
        notes = []
        for contact, item in roster.items.items():
            # RFC 6121 §4.2.2 / §4.4.2: to every subscriber the access rules allow.
            if is_subscriber(state_of(item)) and not access.denied(user, JID.parse(contact)):
                notes.append(pt.notification(stanza, contact))
        # ... and to all of the user's own available resources (the sender included).
        for own in server.sessions.resources(user):
            if own.presence is not None:
                own.send(pt.notification(stanza, own.jid_str))
        if first:
            await self._on_initial_presence(session, roster)
        await self._route_all(notes)
        await self.server.hooks.notify(events.PRESENCE_AVAILABLE, session, first)
        return True

    async def _on_initial_presence(self, session: Session, roster: Roster) -> None:
        """RFC 6121 §4.2.2: probe the contacts the user is subscribed to; §3.1.3: redeliver
        pending subscription requests."""
        server = self.server
        user = session.jid.bare
        for contact, item in roster.items.items():
            state = state_of(item)
            if state is not None and state.to:
                contact_jid = JID.parse(contact)
                if contact_jid.domain in server.hosts:
                    # Answer the probe from local state, for this session only, as the access
                    # rules allow (a probe would be refused: blocking, per-contact visibility).
                    shown = not self.access.denied(contact_jid, session.jid)
                    for other in pt.tuples(contact_jid, server.sessions) if shown else ():
                        session.send(pt.notification(other.stanza, session.jid_str))
                else:
                    await self._route_all([_presence("probe", str(user), contact)])
            if item.pending_in and item.request:
                request = etree.fromstring(item.request)
                request.set("to", str(user))
                session.send(request)

    async def _unavailable(self, session: Session, stanza: Stanza | None) -> bool:
        """The resource went unavailable: its own unavailable presence (stanza), or it
        disconnected (None)."""
        if session.presence is None and not session.directed:
            return True
        was_available = session.presence is not None
        session.presence = None
        user = session.jid.bare
        source = stanza if stanza is not None else pt.unavailable(session)
        notes: list[Stanza] = []
        if was_available:
            roster = await self.rosters.get(user)
            for contact, item in roster.items.items():
                if is_subscriber(state_of(item)):
                    notes.append(pt.notification(source, contact))
            # RFC 6121 §4.5.2: also to all of the user's available resources, the sender
            # included (a disconnected one is no longer there to receive it).
            for own in self.server.sessions.resources(user):
                if own.presence is not None or own is session:
                    own.send(pt.notification(source, own.jid_str))
        # RFC 6121 §4.6.3: undo directed presence.
        for target in session.directed or ():
            notes.append(pt.notification(source, str(target)))
        session.directed = None
        await self._route_all(notes)
        if was_available:
            await self.server.hooks.notify(events.PRESENCE_UNAVAILABLE, session, stanza)
        return True

    @hook(events.SESSION_BOUND)
    def bound(self, session: Session) -> Awaitable[Roster] | None:
        """The roster read ahead, while the client is still on its way to the initial presence
        (or roster get) that needs it: neither then waits for storage (issue 25 item 6)."""
        user = session.jid.bare
        return None if self.rosters.cached(user) is not None else self.rosters.get(user)

    @hook(events.SESSION_CLOSED)
    def closed(self, session: Session, _reason: str) -> Awaitable[None]:
        async def finish() -> None:
            await self._unavailable(session, None)
            if not self.server.sessions.is_online(session.jid.bare):
                self.rosters.forget(session.jid.bare)
        return finish()

    @hook(events.ACCESS_MAY_SEE_PRESENCE)
    def may_see_presence(self, presentity: JID, watcher: JID) -> Awaitable[bool]:
        """For other modules (e.g. last activity, XEP-0012 §4): the same decision as for a
        probe."""
        async def decide() -> bool:
            roster = await self.rosters.get(presentity)
            return self.access.may_see_presence(presentity, roster, watcher)
        return decide()

    # -- presence with 'to' ---------------------------------------------------------------------

    @hook(events.PRESENCE_BARE)
    def to_bare(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        return self._addressed(stanza, origin, to)

    @hook(events.PRESENCE_FULL)
    def to_full(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        return self._addressed(stanza, origin, to)

    @hook(events.PRESENCE_HOST)
    def to_host(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        return True  # presence to the server itself: nothing to do

    @hook(events.ROUTE_REMOTE, priority=100)
    def remote(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        """Outbound processing for a remote contact, before federation sees the stanza."""
        if stanza.tag == PRESENCE and origin is not None and origin.local_client:
            return self._outbound(stanza, origin, to)
        return None

    def _addressed(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if origin is not None and origin.local_client:
            return self._outbound(stanza, origin, to)
        return self._inbound(stanza, to)

    async def _outbound(self, stanza: Stanza, session: Session, to: JID) -> bool:
        type_ = stanza.get("type")
        user = session.jid.bare
        if type_ in SUBSCRIPTION_KINDS:
            await self._outbound_subscription(stanza, session, to.bare, cast(Kind, type_))
            return True
        if type_ is None or type_ == "unavailable":
            # RFC 6121 §4.6: directed presence; tracked unless the target is a subscriber.
            if type_ is None:
                _normalize_available(stanza)
            roster = await self.rosters.get(user)
            subscriber = is_subscriber(state_of(roster.items.get(str(to.bare))))
            if not subscriber and type_ is None and session.presence is not None:
                if session.directed is None:
                    session.directed = set()
                session.directed.add(to)
            elif type_ == "unavailable" and session.directed:
                session.directed.discard(to)
        # Outbound processing is done: routed on as the server's own (origin None).
        await self._route_all([stanza])
        return True

    async def _outbound_subscription(self, stanza: Stanza, session: Session, contact: JID,
                                     kind: Kind) -> None:
        server = self.server
        user = session.jid.bare
        manager = self.rosters
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
                    await manager.put(user, new,
                                      push=decision.roster_push or listed != base.listed)
                elif item is not None:
                    await manager.remove(user, str(contact))
        notes: list[Stanza] = []
        if decision.send_unavailable:
            # RFC 6121 §3.2.2: unavailable first, while the contact is still a subscriber.
            for other in server.sessions.resources(user):
                if other.presence is not None:
                    notes.append(pt.unavailable(other, str(contact)))
        if decision.route:
            # RFC 6121 §3.1.2: stamped with the user's bare JID.
            out = _presence(kind, str(user), str(contact))
            for el in stanza:
                out.append(copy.deepcopy(el))
            notes.append(out)
        if decision.send_presence:
            for t in pt.tuples(user, server.sessions):
                notes.append(pt.notification(t.stanza, str(contact)))
        await self._route_all(notes)

    async def _inbound(self, stanza: Stanza, to: JID) -> bool:
        type_ = stanza.get("type")
        sessions = self.server.sessions
        if type_ in SUBSCRIPTION_KINDS:
            await self._inbound_subscription(stanza, to.bare, cast(Kind, type_))
            return True
        if type_ == "probe":
            await self._probe(stanza, to.bare)
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
                session.send(pt.notification(stanza, session.jid_str))
        return True

    async def _inbound_subscription(self, stanza: Stanza, user: JID, kind: Kind) -> None:
        server = self.server
        sender = JID.parse(stanza.get("from", "")).bare
        manager = self.rosters
        assert user.local is not None
        if not await server.storage.accounts.exists(user.local, user.domain):
            # RFC 6121 §3.1.3: no such user: answer a subscribe with unsubscribed.
            if kind == "subscribe":
                await self._route_all([_presence("unsubscribed", str(user), str(sender))])
            return
        if kind == "subscribe" and not self._may_subscribe(user, sender):
            await self._route_all([_presence("unsubscribed", str(user), str(sender))])
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
                stamped.append(copy.deepcopy(el))
            for session in server.sessions.resources(user):
                if session.presence is not None:
                    session.send(pt.notification(stamped, session.jid_str))
        if decision.auto_reply:
            notes.append(_presence(decision.auto_reply, str(user), str(sender)))
        if decision.send_presence:
            for t in pt.tuples(user, server.sessions):
                notes.append(pt.notification(t.stanza, str(sender)))
        if decision.send_unavailable:
            for session in server.sessions.resources(user):
                if session.presence is not None:
                    notes.append(pt.unavailable(session, str(sender)))
        await self._route_all(notes)

    async def _probe(self, stanza: Stanza, presentity: JID) -> None:
        """A fetch (RFC 2778 §2.2; RFC 6121 §4.3.2): current tuples only for allowed watchers.
        Anyone else gets 'unsubscribed', the same answer as for a missing account, so a probe
        reveals neither presence nor existence."""
        server = self.server
        watcher = JID.parse(stanza.get("from", ""))
        assert presentity.local is not None
        roster = await self.rosters.get(presentity)
        allowed = self.access.may_see_presence(presentity, roster, watcher)
        await server.hooks.notify(events.PRESENCE_FETCHED, presentity, watcher, allowed)
        if not allowed:
            answer = _presence("unsubscribed", str(presentity), str(watcher))
            local = server.sessions.get(watcher) if watcher.resource else None
            if local is not None:
                local.send(answer)  # an answer to a fetch, not a subscription change to process
            else:
                await self._route_all([answer])
            return
        current = pt.tuples(presentity, server.sessions)
        if not current:
            await self._route_all([_presence("unavailable", str(presentity), str(watcher))])
            return
        await self._route_all([pt.notification(t.stanza, str(watcher)) for t in current])


def _presence(type_: str | None, from_: str, to: str) -> Stanza:
    attrs = {"from": from_, "to": to}
    if type_ is not None:
        attrs["type"] = type_
    return element(PRESENCE, attrs)


def _normalize_available(stanza: Stanza) -> None:
    """Check <show/> and <priority/> of an available presence (RFC 6121 §4.7.2.1, §4.7.2.3),
    liberal where a client quirk is harmless, as Prosody and ejabberd are: an empty (or
    whitespace-only) <show/> or <priority/> is no show / the default priority and is removed
    from what is sent on; whitespace around a value is dropped. A value that is not one of
    the four shows, or not an integer from -128 to 127, is still a bad-request."""
    for show in stanza.findall(_SHOW):
        value = (show.text or "").strip()
        if not value and len(show) == 0:
            stanza.remove(show)  # e.g. go-xmpp's initial <show></show>
        elif value not in pt.SHOW_VALUES:
            raise StanzaError("bad-request", "show must be away, chat, dnd or xa")
        elif show.text != value:
            show.text = value
    for priority in stanza.findall(_PRIORITY):
        if not (priority.text or "").strip() and len(priority) == 0:
            stanza.remove(priority)
    try:
        pt.parse_priority(stanza)
    except ValueError as exc:
        raise StanzaError("bad-request", "priority must be an integer from -128 to 127") from exc


def _fields(item: RosterItem) -> dict[str, Any]:
    return {name: getattr(item, name) for name in RosterItem.__slots__}
