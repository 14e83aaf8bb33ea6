"""Service Discovery (XEP-0030): the server's identity and the features its modules provide."""

from __future__ import annotations

from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import child, element, result

module = Module("disco")
module.feature(ns.DISCO_INFO, ns.DISCO_ITEMS)


@module.iq_get(ns.DISCO_INFO)
def server_info(stanza: Stanza, origin: Session | None) -> Stanza:
    if stanza[0].get("node") is not None:
        return _node(stanza, origin, ns.DISCO_INFO)
    query = _query(stanza, ns.DISCO_INFO)
    # XEP-0030 §3.1 / registry: a server is category 'server', type 'im'.
    child(query, ns.q(ns.DISCO_INFO, "identity"),
          {"category": "server", "type": "im", "name": "presenced"})
    assert module.server is not None
    for feature in sorted(module.server.features):
        child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
    return result(stanza, query)


@module.iq_get(ns.DISCO_ITEMS)
def server_items(stanza: Stanza, origin: Session | None) -> Stanza:
    if stanza[0].get("node") is not None:
        return _node(stanza, origin, ns.DISCO_ITEMS)
    return result(stanza, _query(stanza, ns.DISCO_ITEMS))


def _node(stanza: Stanza, origin: Session | None, xmlns: str) -> Stanza:
    """A node of the server's (XEP-0030 §3.2): the module owning it fills the query through the
    'disco/node' hook (args: query, origin, node) and returns non-None."""
    node = stanza[0].get("node", "")
    query = element(ns.q(xmlns, "query"), {"node": node})
    assert module.server is not None
    if module.server.hooks.fire("disco/node", query, origin, node) is None:
        raise StanzaError("item-not-found", f"no such node {node!r}")
    return result(stanza, query)


@module.iq_get(ns.DISCO_INFO, to=("bare",))
async def account_info(stanza: Stanza, _origin: Session | None) -> Stanza:
    """An account answers as 'account/registered' (XEP-0030 §3.1) when it exists."""
    await _require_account(stanza)
    query = _query(stanza, ns.DISCO_INFO)
    child(query, ns.q(ns.DISCO_INFO, "identity"), {"category": "account", "type": "registered"})
    for feature in (ns.DISCO_INFO, ns.DISCO_ITEMS):
        child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})
    return result(stanza, query)


@module.iq_get(ns.DISCO_ITEMS, to=("bare",))
async def account_items(stanza: Stanza, _origin: Session | None) -> Stanza:
    await _require_account(stanza)
    return result(stanza, _query(stanza, ns.DISCO_ITEMS))


def _query(stanza: Stanza, xmlns: str) -> Stanza:
    request = stanza[0]
    node = request.get("node")
    if node is not None:
        # No module publishes nodes yet (XEP-0030 §3.2: unknown node).
        raise StanzaError("item-not-found", f"no such node {node!r}")
    return element(ns.q(xmlns, "query"))


async def _require_account(stanza: Stanza) -> None:
    assert module.server is not None
    target = JID.parse(stanza.get("to") or stanza.get("from", ""))
    if target.local is None or not await module.server.storage.accounts.exists(
            target.local, target.domain):
        raise StanzaError("service-unavailable")
