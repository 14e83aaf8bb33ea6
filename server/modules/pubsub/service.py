"""The publish-subscribe service at pubsub.<domain> (XEP-0060): its policy on the one iq front
of protocol.py (which has the operations), nodes in the ``pubsub`` store (both backends).

Any user of our domains creates nodes (instant, or named with a configuration form) and is
their owner; owners configure, delete (with redirect), purge and manage subscriptions and
affiliations (owner, publisher, member, none, outcast). Access models open (the default),
authorize (a subscription is pending until an owner approves it with the XEP-0060 §8.6 form,
sent to each owner) and whitelist (owners, publishers, members). Owners and publishers
publish and retract; entities allowed to read subscribe and unsubscribe (their own bare or
full JID) and get notifications (routed, so they reach contacts on other servers too);
send_last_published_item on_sub (or on_sub_and_presence) sends the newest item on subscribing
(§6.1.7), and on approval; publish_model publishers, subscribers or open. Deleted accounts
lose their subscriptions and affiliations, and the nodes they alone owned, when the nodes are
read (once per start). Subscription options (§6.3: get, submit, with subscribe; §6.4
defaults): pubsub#deliver (false: no notifications, no last item), pubsub#include_body
(kept); stored in the node's state, dropped with the subscription. Node disco: #info with
the meta-data form, #items lists nodes and a node's items.

    [pubsub]
    enabled = true             # the default
    subdomain = "pubsub"
    max_items = 256            # items a node keeps at most
    max_payload_size = 65536   # bytes of one item's payload
    max_nodes_per_user = 100   # nodes one user may own here
    restrict_node_creation = false   # or "admins": only [admins] create nodes
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.config import Invalid, int_option, option, service_fields
from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza
from server.modules.pubsub import engine
from server.modules.pubsub.engine import OWNER, PUBSUB, Node, PubsubError
from server.modules.pubsub.protocol import Host, PubsubProtocol, requester
from server.services import ServiceModule
from server.sessions import Session
from server.storage.pubsub import SERVICE_SPEC, PubsubStore
from server.xml import ns
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.modules.pubsub.cluster import SharedPubsub

# The service's node defaults (max_items 20 and itemreply as Prosody's mod_pubsub has them).
SERVICE_DEFAULTS = {"access_model": "open", "max_items": 20, "send_last_published_item": "never"}
_INFO = ns.q(ns.DISCO_INFO, "query")
_ITEMS = ns.q(ns.DISCO_ITEMS, "query")


@dataclass(frozen=True, slots=True, kw_only=True)
class PubsubSettings:
    enabled: bool = field(metadata=service_fields.enabled(True))
    subdomain: str = field(metadata=service_fields.subdomain("pubsub"))
    max_items: int = field(metadata=int_option(1, 100000, 256))
    max_payload_size: int = field(metadata=int_option(256, 1 << 24, 65536))
    max_nodes_per_user: int = field(metadata=int_option(1, 100000, 100))
    # Who creates nodes: every user of our domains (false, the default), or [admins] only.
    restrict_node_creation: bool | str = field(metadata=option(
        'false or "admins"', lambda value, _ctx: _restriction(value), False))


def _restriction(value: Any) -> bool | str:
    if value is False or value == "admins":
        return value
    raise Invalid


def stored(node: Node) -> dict[str, Any]:
    """A node's state as the store keeps it: its configuration, affiliations, subscriptions
    and their options (§6.3; in the node's state, so no migration, dropped with the
    subscription)."""
    node.options = {j: o for j, o in node.options.items() if j in node.subscriptions}
    return {"config": node.config, "affiliations": node.affiliations,
            "subscriptions": node.subscriptions, "options": node.options}


class PubsubService(PubsubProtocol, ServiceModule):
    name = "pubsub"
    settings = PubsubSettings
    stores = (SERVICE_SPEC,)
    identity = ("pubsub", "service")
    display_name = "Publish-subscribe service"
    service_features = (PUBSUB, *(f"{PUBSUB}#{f}" for f in (
        "access-authorize", "access-open", "access-whitelist", "config-node",
        "create-and-configure", "create-nodes", "delete-items", "delete-nodes", "instant-nodes",
        "item-ids",
        "manage-subscriptions", "meta-data", "modify-affiliations", "persistent-items",
        "publish", "purge-nodes", "retract-items", "retrieve-affiliations", "retrieve-items",
        "retrieve-subscriptions", "subscribe", "subscription-options")))

    def __init__(self, server: Any, config: PubsubSettings) -> None:
        ServiceModule.__init__(self, server, config)
        PubsubProtocol.__init__(self)
        self._nodes: dict[str, dict[str, Node]] = {}  # service domain -> node -> Node
        # [cluster]: the cache dropped on the other nodes when a request changes it here
        self.shared: SharedPubsub | None = None

    async def start(self) -> None:
        await super().start()
        cluster = self.server.cluster
        if cluster is not None and self.config.enabled:
            from server.modules.pubsub.cluster import SharedPubsub
            self.shared = SharedPubsub(self, cluster, "q")
            self.shared.listen(lambda service: self._nodes.pop(service, None))

    async def _changes(self, pending: Awaitable[Any], service: str) -> Any:
        try:
            return await pending
        finally:
            if self.shared is not None:
                await self.shared.changed(service)

    @property
    def store(self) -> PubsubStore:
        store: PubsubStore = self.store_of(SERVICE_SPEC)
        return store

    # -- policy -------------------------------------------------------------------------------

    async def host(self, stanza: Stanza, origin: Session | None) -> Host:
        domain = JID.parse(stanza.get("to", "")).domain
        return Host(domain, "", domain)

    async def nodes(self, host: Host) -> dict[str, Node]:
        service = host.domain
        nodes = self._nodes.get(service)
        if nodes is not None and self.shared is not None and not await self.shared.fresh(
                service):
            self._nodes.pop(service, None)  # [cluster]: changed on another node since
            nodes = None
        if nodes is None:
            found = await self.store.nodes("", service)
            nodes = {name: Node(engine.node_config({**SERVICE_DEFAULTS, **s.get("config", {})}),
                                dict(s.get("affiliations", {})),
                                dict(s.get("subscriptions", {})),
                                dict(s.get("options", {})))
                     for name, s in found.items()}
            await self._prune(service, nodes)
            cached = self._nodes.get(service)
            if cached is not None:
                return cached  # read meanwhile by another call, and maybe changed since
            self._nodes[service] = nodes
        return nodes

    async def _prune(self, service: str, nodes: dict[str, Node]) -> None:
        """Accounts deleted since the nodes were stored (presenced deluser, maybe from another
        process) lose their affiliations and subscriptions, and the nodes they alone owned go
        (with their items)."""
        local = {JID.parse(jid).bare for node in nodes.values()
                 for jid in (*node.affiliations, *node.subscriptions)}
        accounts = self.server.storage.accounts
        gone = set()
        for jid in local:
            if (jid.domain in self.server.hosts and jid.local is not None
                    and not await accounts.exists(jid.local, jid.domain)):
                gone.add(jid)
        if not gone:
            return
        for name, node in list(nodes.items()):
            affiliations = {j: a for j, a in node.affiliations.items()
                            if JID.parse(j).bare not in gone}
            subscriptions = {j: state for j, state in node.subscriptions.items()
                             if JID.parse(j).bare not in gone}
            if "owner" not in affiliations.values():
                await self.store.delete_node("", service, name)
                del nodes[name]
            elif (affiliations, subscriptions) != (node.affiliations, node.subscriptions):
                node.affiliations, node.subscriptions = affiliations, subscriptions
                await self.store.set_config("", service, name, stored(node))

    async def facts(self, host: Host, node: Node, who: JID) -> dict[str, bool]:
        """Affiliations only: the service's access models are open, authorize and
        whitelist."""
        return {**node.facts(who), "subscriber": False, "in_roster": False}

    async def targets(self, host: Host, name: str, node: Node) -> list[str]:
        return engine.subscribers(node)

    def node_defaults(self) -> dict[str, Any]:
        return engine.node_config(SERVICE_DEFAULTS)

    def check_config(self, options: dict[str, Any]) -> None:
        if options.get("access_model", "open") not in ("open", "whitelist", "authorize"):
            raise PubsubError("not-acceptable", "unsupported-access-model",
                              "the service's nodes are open, authorize or whitelist")

    async def save_config(self, host: Host, name: str, node: Node) -> None:
        await self.store.set_config("", host.domain, name, stored(node))

    save_affiliations = save_config

    async def save_subscription(self, host: Host, name: str, node: Node, jid: str) -> None:
        await self.save_config(host, name, node)

    async def publish_node(self, host: Host, name: str, who: JID, options: dict[str, Any],
                           items: list[tuple[str | None, list[Stanza]]]) -> tuple[Node, bool]:
        """An existing node (no auto-create), and pubsub#publish_model: publishers (owners and
        publishers), subscribers (those too) or open (anyone but outcasts), §7.1.3.1."""
        node = await self.node(host, name)
        engine.check_publisher(node, who)
        return node, False

    async def create(self, stanza: Stanza, host: Host, who: JID,
                     actions: list[Stanza]) -> Stanza:
        if who.domain not in self.server.hosts:
            raise PubsubError("forbidden", text="only users of this server create nodes")
        if (self.config.restrict_node_creation == "admins"
                and str(who.bare) not in self.server.config.admins):
            raise PubsubError("forbidden", text="only administrators create nodes here")
        name = actions[0].get("node")
        if name:
            engine.checked_node(name)
        instant = not name
        name = name or uuid.uuid4().hex
        configure = next((c for c in actions[1:] if c.tag == ns.q(PUBSUB, "configure")), None)
        form = configure.find(engine.X) if configure is not None else None
        options = engine.form_values(form, engine.NODE_CONFIG)
        self.check_config(options)
        nodes = await self.nodes(host)
        if name in nodes:
            raise PubsubError("conflict", text=f"node {name!r} exists")
        owned = sum(1 for n in nodes.values() if n.affiliation(who) == "owner")
        if owned >= self.config.max_nodes_per_user:
            raise PubsubError("not-allowed", "max-nodes-exceeded",
                              f"a user owns at most {self.config.max_nodes_per_user} nodes")
        node = Node(engine.node_config({**SERVICE_DEFAULTS, **options}),
                    {str(who.bare): "owner"}, {})
        if not await self.store.create_node("", host.domain, name, stored(node)):
            self._nodes.pop(host.domain, None)
            raise PubsubError("conflict", text=f"node {name!r} exists")
        nodes[name] = node
        if not instant:
            return st.result(stanza)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        st.child(reply, ns.q(PUBSUB, "create"), {"node": name})
        return st.result(stanza, reply)

    # -- routing ------------------------------------------------------------------------------

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if stanza.tag == st.MESSAGE and to.local is None and to.resource is None:
            answer = engine.authorization_answer(stanza)
            if answer is not None:
                if self.shared is not None:
                    return self._changes(self._authorization(stanza, to.domain, *answer),
                                         to.domain)
                return self._authorization(stanza, to.domain, *answer)
        if stanza.tag != st.IQ or stanza.get("type") not in ("get", "set"):
            return True  # messages, presence, results: nothing to do
        if to.local is not None or to.resource is not None:
            return None
        payload = st.payload(stanza)
        if payload is None:
            return None
        if payload.tag in (ns.q(PUBSUB, "pubsub"), ns.q(OWNER, "pubsub")):
            if self.shared is not None and stanza.get("type") == "set":
                return self._changes(self.answer(stanza, origin), to.domain)
            return self.answer(stanza, origin)
        if payload.tag == _INFO:
            return self._disco(stanza, origin, to.domain, payload)
        return None

    async def _authorization(self, stanza: Stanza, service: str, name: str, jid: str,
                             allowed: bool | None) -> None:
        try:
            decider = requester(stanza, None)
        except StanzaError:
            return
        await self.authorize(Host(service, "", service), decider, name, jid, allowed)

    def items(self, stanza: Stanza, origin: Session | None) -> Any:
        query = st.payload(stanza)
        assert query is not None
        return self._disco(stanza, origin, JID.parse(stanza.get("to", "")).domain, query)

    # -- discovery ----------------------------------------------------------------------------

    async def _disco(self, stanza: Stanza, origin: Session | None, service: str,
                     payload: Stanza) -> Stanza:
        try:
            requester(stanza, origin)
            host = Host(service, "", service)
            if payload.tag == _INFO:
                return await self._disco_info(stanza, host, payload)
            return await self._disco_items(stanza, host, payload)
        except StanzaError as err:
            return engine.error_reply(stanza, err)

    async def _disco_info(self, stanza: Stanza, host: Host, query: Stanza) -> Stanza:
        name = query.get("node") or ""
        node = await self.node(host, name)
        reply = st.element(_INFO, {"node": name})
        st.child(reply, ns.q(ns.DISCO_INFO, "identity"), {"category": "pubsub", "type": "leaf"})
        st.child(reply, ns.q(ns.DISCO_INFO, "feature"), {"var": PUBSUB})
        meta = engine.config_form(node.config, engine.META_DATA, "result")
        owners = node.owners()
        if owners:
            owner = st.child(meta, engine.FIELD, {"var": "pubsub#owner", "type": "jid-multi",
                                                  "label": "Node owners"})
            for jid in owners:
                st.child(owner, engine.VALUE, text=jid)
        reply.append(meta)
        return st.result(stanza, reply)

    async def _disco_items(self, stanza: Stanza, host: Host, query: Stanza) -> Stanza:
        name = query.get("node")
        if name is None:
            reply = st.element(_ITEMS)
            for node_name, node in sorted((await self.nodes(host)).items()):
                attrs = {"jid": host.jid, "node": node_name}
                if node.config.get("title"):
                    attrs["name"] = node.config["title"]
                st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), attrs)
            return st.result(stanza, reply)
        await self.node(host, name)
        reply = st.element(_ITEMS, {"node": name})
        for one in await self.store.items("", host.domain, name):
            st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), {"jid": host.jid, "name": one.id})
        return st.result(stanza, reply)
