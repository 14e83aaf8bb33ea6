"""Service Discovery (XEP-0030): the server's identity, the features its modules provide, and
the service hosts (muc.<domain>, upload.<domain>, components) it lists as items."""

from __future__ import annotations

from server import events
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza, iq_get
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import child, element, result


class Disco(Module):
    name = "disco"
    features = (ns.DISCO_INFO, ns.DISCO_ITEMS)

    @iq_get(ns.DISCO_INFO, "query")
    def server_info(self, stanza: Stanza, origin: Session | None) -> Stanza:
        if stanza[0].get("node") is not None:
            return self._node(stanza, origin, ns.DISCO_INFO)
        query = element(ns.q(ns.DISCO_INFO, "query"))
        # XEP-0030 §3.1 / registry: a server is category 'server', type 'im'.
        child(query, ns.q(ns.DISCO_INFO, "identity"),
              {"category": "server", "type": "im", "name": "presenced"})
        for feature in sorted(self.server.features):
            child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
        # XEP-0128 extended information (e.g. XEP-0157 contact addresses) from the modules.
        self.server.hooks.notify_nowait(events.DISCO_SERVER_INFO, query, stanza, origin)
        return result(stanza, query)

    @iq_get(ns.DISCO_ITEMS, "query")
    def server_items(self, stanza: Stanza, origin: Session | None) -> Stanza:
        if stanza[0].get("node") is not None:
            return self._node(stanza, origin, ns.DISCO_ITEMS)
        query = element(ns.q(ns.DISCO_ITEMS, "query"))
        # XEP-0030 §4: the services this domain offers, each a JID of its own.
        domain = stanza.get("to") or self.server.default_domain
        for service in self.server.services_of(domain):
            attrs = {"jid": service.domain}
            if service.name:
                attrs["name"] = service.name
            child(query, ns.q(ns.DISCO_ITEMS, "item"), attrs)
        return result(stanza, query)

    def _node(self, stanza: Stanza, origin: Session | None, xmlns: str) -> Stanza:
        """A node of the server's (XEP-0030 §3.2): the module owning it fills the query
        through the 'disco/node' hook (args: query, origin, node) and returns non-None."""
        node = stanza[0].get("node", "")
        query = element(ns.q(xmlns, "query"), {"node": node})
        if self.server.hooks.fire(events.DISCO_NODE, query, origin, node) is None:
            raise StanzaError("item-not-found", f"no such node {node!r}")
        return result(stanza, query)

    @iq_get(ns.DISCO_INFO, "query", to=("bare",))
    async def account_info(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        """An account answers as 'account/registered' (XEP-0030 §3.1) when it exists."""
        await self._require_account(stanza)
        query = _account_query(stanza, ns.DISCO_INFO)
        child(query, ns.q(ns.DISCO_INFO, "identity"),
              {"category": "account", "type": "registered"})
        for feature in (ns.DISCO_INFO, ns.DISCO_ITEMS):
            child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
        await self.server.hooks.notify(events.DISCO_ACCOUNT_INFO, query, stanza, _origin)
        return result(stanza, query)

    @iq_get(ns.DISCO_ITEMS, "query", to=("bare",))
    async def account_items(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        await self._require_account(stanza)
        return result(stanza, _account_query(stanza, ns.DISCO_ITEMS))

    async def _require_account(self, stanza: Stanza) -> None:
        target = JID.parse(stanza.get("to") or stanza.get("from") or "")
        if target.local is None or not await self.server.storage.accounts.exists(
                target.local, target.domain):
            raise StanzaError("service-unavailable")


def _account_query(stanza: Stanza, xmlns: str) -> Stanza:
    node = stanza[0].get("node")
    if node is not None:
        # No module publishes account nodes yet (XEP-0030 §3.2: unknown node).
        raise StanzaError("item-not-found", f"no such node {node!r}")
    return element(ns.q(xmlns, "query"))
