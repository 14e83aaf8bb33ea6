"""jabber:iq:roster (RFC 6121 §2) with versioning (§2.6, XEP-0237)."""

from __future__ import annotations

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, Stanza
from server.presence.subscription import outbound
from server.roster import RosterManager, item_element, state_of
from server.sessions import Session
from server.storage.base import RosterItem
from server.xml import ns
from server.xml.stanza import element, result

module = Module("roster")
MAX_NAME = 1023           # octets of an item name or group name
ITEM = ns.q(ns.ROSTER, "item")
GROUP = ns.q(ns.ROSTER, "group")


@module.on_load
def load(server):
    server.rosters = RosterManager(server)


@module.stream_feature
def roster_versioning(_server: object) -> Stanza:
    return element(ns.q(ns.ROSTER_VER, "ver"))


def _manager() -> RosterManager:
    assert module.server is not None
    manager: RosterManager = module.server.rosters
    return manager


@module.iq_get(ns.ROSTER, to=("self",))
async def roster_get(stanza: Stanza, origin: Session | None) -> Stanza:
    assert origin is not None
    origin.interested = True  # RFC 6121 §2.1.6: pushes go to resources that asked
    roster = await _manager().get(origin.jid.bare)
    version = str(roster.version)
    # RFC 6121 §2.6.3: the client's version is current: empty result, changes come as pushes.
    if stanza[0].get("ver") == version:
        return result(stanza)
    query = element(ns.q(ns.ROSTER, "query"), {"ver": version})
    for item in roster.items.values():
        if item.listed:
            query.append(item_element(item))
    return result(stanza, query)


@module.iq_set(ns.ROSTER, to=("self",))
async def roster_set(stanza: Stanza, origin: Session | None) -> Stanza:
    assert origin is not None and module.server is not None
    items = [c for c in stanza[0] if c.tag == ITEM]
    if len(items) != 1 or len(stanza[0]) != 1:
        raise StanzaError("bad-request", "a roster set carries exactly one item (RFC 6121 §2.3.3)")
    item = items[0]
    try:
        contact = JID.parse(item.get("jid", ""))
    except InvalidJID as exc:
        raise StanzaError("jid-malformed", f"invalid item jid: {exc}") from exc
    if contact.resource is not None:
        raise StanzaError("jid-malformed", "roster items are bare JIDs")
    user = origin.jid.bare
    if contact == user:
        raise StanzaError("bad-request", "you cannot add yourself to your roster")
    manager = _manager()
    async with manager.lock(user):
        roster = await manager.get(user)
        existing = roster.items.get(str(contact))
        if item.get("subscription") == "remove":
            await _remove(user, str(contact), existing)
            return result(stanza)
        name = item.get("name")
        if name is not None and (not name.strip() or len(name.encode()) > MAX_NAME):
            raise StanzaError("not-acceptable", "bad item name")
        groups = [g.text or "" for g in item if g.tag == GROUP]
        if any(not g.strip() or len(g.encode()) > MAX_NAME for g in groups):
            raise StanzaError("not-acceptable", "bad group name")  # RFC 6121 §2.3.3
        if len(set(groups)) != len(groups):
            raise StanzaError("bad-request", "duplicate group")
        if existing is None or not existing.listed:
            listed = sum(1 for i in roster.items.values() if i.listed)
            limit = module.server.config.roster.max_items
            if listed >= limit:
                raise StanzaError("not-allowed", f"the roster is full ({limit} items)")
        # RFC 6121 §2.1.2.5 / §2.3.2: 'subscription' (except remove) and 'ask' are ignored.
        base = existing or RosterItem(contact=str(contact))
        updated = RosterItem(contact=str(contact), name=name, groups=tuple(groups),
                             subscription=base.subscription, pending_out=base.pending_out,
                             pending_in=base.pending_in, approved=base.approved, listed=True,
                             request=base.request)
        await manager.put(user, updated)
    return result(stanza)


async def _remove(user: JID, contact: str, existing: RosterItem | None) -> None:
    """RFC 6121 §2.5.2: removing an item cancels subscriptions both ways, then deletes it."""
    if existing is None or not existing.listed:
        raise StanzaError("item-not-found", "no such roster item")
    assert module.server is not None
    router = module.server.router
    state = state_of(existing)
    for kind in ("unsubscribe", "unsubscribed"):
        decision = outbound(state, kind)
        if decision.route:
            notice = etree.Element(ns.q(ns.CLIENT, "presence"),
                                   {"type": kind, "from": str(user), "to": contact},
                                   nsmap={None: ns.CLIENT})
            pending = router.route(notice, None)
            if pending is not None:
                await pending
        state = decision.state
    await _manager().remove(user, contact)
