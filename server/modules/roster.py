"""jabber:iq:roster (RFC 6121 §2) with versioning (§2.6, XEP-0237).

    [roster]
    max_items = 1000   # RFC 6121 §2.3.3: beyond this a roster set gets <not-allowed/>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.config import int_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, Stanza, iq_get, iq_set, stream_feature
from server.presence.subscription import outbound
from server.roster import RosterManager, item_element, state_of
from server.sessions import Session
from server.storage.base import RosterItem
from server.xml import ns
from server.xml.stanza import PRESENCE, element, result

MAX_NAME = 1023           # octets of an item name or group name
ITEM = ns.q(ns.ROSTER, "item")
GROUP = ns.q(ns.ROSTER, "group")


@dataclass(frozen=True, slots=True, kw_only=True)
class RosterSettings:
    # RFC 6121 §2.3.3: beyond this many items a roster set is refused with <not-allowed/>.
    max_items: int = field(metadata=int_option(1, 100000, 1000))


class Roster(Module):
    name = "roster"
    settings = RosterSettings

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        self.rosters: RosterManager = server.rosters  # the core's (server/roster.py)

    @stream_feature
    def roster_versioning(self) -> Stanza:
        return element(ns.q(ns.ROSTER_VER, "ver"))

    @iq_get(ns.ROSTER, "query", to=("self",))
    async def roster_get(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        if not origin.interested:
            origin.interested = True  # RFC 6121 §2.1.6: pushes go to resources that asked
            self.server.sessions.changed(origin)  # [cluster]: the other nodes push to it too
        roster = await self.rosters.get(origin.jid.bare)
        version = str(roster.version)
        # RFC 6121 §2.6.3: the client's version is current: empty result, changes as pushes.
        if stanza[0].get("ver") == version:
            return result(stanza)
        query = element(ns.q(ns.ROSTER, "query"), {"ver": version})
        for item in roster.items.values():
            if item.listed:
                query.append(item_element(item))
        return result(stanza, query)

    @iq_set(ns.ROSTER, "query", to=("self",))
    async def roster_set(self, stanza: Stanza, origin: Session | None) -> bool:
        """RFC 6121 §2.3.2: the result goes to the requesting resource before the pushes to
        the interested resources (the manager sends it once the change is stored)."""
        assert origin is not None
        items = [c for c in stanza[0] if c.tag == ITEM]
        if len(items) != 1 or len(stanza[0]) != 1:
            raise StanzaError("bad-request",
                              "a roster set carries exactly one item (RFC 6121 §2.3.3)")
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
        manager = self.rosters
        answer = (origin, result(stanza))
        async with manager.lock(user):
            roster = await manager.get(user)
            existing = roster.items.get(str(contact))
            if item.get("subscription") == "remove":
                await self._remove(user, str(contact), existing, answer)
                return True
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
                limit = self.config.max_items
                if listed >= limit:
                    raise StanzaError("not-allowed", f"the roster is full ({limit} items)")
            # RFC 6121 §2.1.2.5 / §2.3.2: 'subscription' (except remove) and 'ask' are ignored.
            base = existing or RosterItem(contact=str(contact))
            updated = RosterItem(contact=str(contact), name=name, groups=tuple(groups),
                                 subscription=base.subscription, pending_out=base.pending_out,
                                 pending_in=base.pending_in, approved=base.approved,
                                 listed=True, request=base.request)
            await manager.put(user, updated, answer=answer)
        return True

    async def _remove(self, user: JID, contact: str, existing: RosterItem | None,
                      answer: tuple[Session, Stanza]) -> None:
        """RFC 6121 §2.5.2: removing an item cancels subscriptions both ways, then deletes
        it."""
        if existing is None or not existing.listed:
            raise StanzaError("item-not-found", "no such roster item")
        router = self.server.router
        state = state_of(existing)
        for kind in ("unsubscribe", "unsubscribed"):
            decision = outbound(state, kind)
            if decision.route:
                notice = element(PRESENCE, {"type": kind, "from": str(user), "to": contact})
                pending = router.route(notice, None)
                if pending is not None:
                    await pending
            state = decision.state
        await self.rosters.remove(user, contact, answer=answer)
