"""The publish-subscribe service at pubsub.<domain> (XEP-0060), on the engine of engine.py,
nodes in the ``pubsub`` store (both backends).

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

import copy
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from server.config import _Invalid, int_option, option, service_fields
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza
from server.modules.pubsub import engine
from server.modules.pubsub.engine import EVENT, OWNER, PUBSUB, PubsubError
from server.services import ServiceModule
from server.sessions import Session
from server.storage.pubsub import SERVICE_SPEC, StoredItem
from server.xml import ns
from server.xml import stanza as st

# The service's node defaults (max_items 20 and itemreply as Prosody's mod_pubsub has them).
SERVICE_DEFAULTS = {"access_model": "open", "max_items": 20, "send_last_published_item": "never"}
AFFILIATIONS = ("owner", "publisher", "member", "none", "outcast")
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
    raise _Invalid


@dataclass
class Node:
    config: dict[str, Any]
    affiliations: dict[str, str]   # bare JID -> affiliation
    subscriptions: dict[str, str]  # JID (bare or full) -> 'subscribed'
    # XEP-0060 §6.3: subscribed JID -> its options (deliver, include_body), kept in the node's
    # state (so no migration), dropped with the subscription.
    options: dict[str, dict[str, bool]] = field(default_factory=dict)

    def stored(self) -> dict[str, Any]:
        self.options = {j: o for j, o in self.options.items() if j in self.subscriptions}
        return {"config": self.config, "affiliations": self.affiliations,
                "subscriptions": self.subscriptions, "options": self.options}

    def delivers(self, jid: str) -> bool:
        return self.options.get(jid, {}).get("deliver", True)

    def affiliation(self, jid: JID) -> str:
        return self.affiliations.get(str(jid.bare), "none")


class PubsubService(ServiceModule):
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
        super().__init__(server, config)
        self._nodes: dict[str, dict[str, Node]] = {}  # service domain -> node -> Node
        self._ids = itertools.count(1)

    @property
    def store(self) -> Any:
        return getattr(self.server.storage, "pubsub")  # noqa: B009 (declared by SERVICE_SPEC)

    async def nodes(self, service: str) -> dict[str, Node]:
        nodes = self._nodes.get(service)
        if nodes is None:
            stored = await self.store.nodes("", service)
            nodes = {name: Node(engine.node_config({**SERVICE_DEFAULTS, **s.get("config", {})}),
                                dict(s.get("affiliations", {})),
                                dict(s.get("subscriptions", {})),
                                dict(s.get("options", {})))
                     for name, s in stored.items()}
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
                await self._save(service, name, node)

    async def _node(self, service: str, name: str) -> Node:
        node = (await self.nodes(service)).get(name)
        if node is None:
            raise PubsubError("item-not-found", text=f"no node {name!r}")
        return node

    async def _save(self, service: str, name: str, node: Node) -> None:
        await self.store.set_config("", service, name, node.stored())

    def _limit(self, node: Node) -> int:
        return engine.max_items(node.config, self.config.max_items)

    # -- routing ------------------------------------------------------------------------------

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if stanza.tag == st.MESSAGE and to.local is None and to.resource is None:
            answer = engine.authorization_answer(stanza)
            if answer is not None:
                return self._authorize(stanza, to.domain, *answer)
        if stanza.tag != st.IQ or stanza.get("type") not in ("get", "set"):
            return True  # messages, presence, results: nothing to do
        if to.local is not None or to.resource is not None:
            return None
        payload = st.payload(stanza)
        if payload is None:
            return None
        if payload.tag in (ns.q(PUBSUB, "pubsub"), ns.q(OWNER, "pubsub"), _INFO):
            return self._answer(stanza, origin, to.domain, payload)
        return None

    def items(self, stanza: Stanza, origin: Session | None) -> Any:
        query = st.payload(stanza)
        assert query is not None
        return self._answer(stanza, origin, JID.parse(stanza.get("to", "")).domain, query)

    async def _answer(self, stanza: Stanza, origin: Session | None, service: str,
                      payload: Stanza) -> Stanza:
        try:
            who = _requester(stanza, origin)
            if payload.tag == _INFO:
                return await self._disco_info(stanza, service, payload)
            if payload.tag == _ITEMS:
                return await self._disco_items(stanza, service, payload)
            actions = [c for c in payload if isinstance(c.tag, str)]
            if not actions:
                raise PubsubError("bad-request", text="the pubsub element needs an action")
            name = etree.QName(actions[0]).localname
            owner_ns = payload.tag == ns.q(OWNER, "pubsub")
            kind = ("owner-" if owner_ns else "") + stanza.get("type", "") + "-" + name
            handler = getattr(self, "_" + kind.replace("-", "_"), None)
            if handler is None:
                raise engine.unsupported(name)
            reply: Stanza = await handler(stanza, service, who, actions)
            return reply
        except StanzaError as err:
            return engine.error_reply(stanza, err)

    # -- create, configure, delete, purge -----------------------------------------------------

    async def _set_create(self, stanza: Stanza, service: str, who: JID,
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
        _check_service_config(options)
        nodes = await self.nodes(service)
        if name in nodes:
            raise PubsubError("conflict", text=f"node {name!r} exists")
        owned = sum(1 for n in nodes.values() if n.affiliation(who) == "owner")
        if owned >= self.config.max_nodes_per_user:
            raise PubsubError("not-allowed", "max-nodes-exceeded",
                              f"a user owns at most {self.config.max_nodes_per_user} nodes")
        node = Node(engine.node_config({**SERVICE_DEFAULTS, **options}),
                    {str(who.bare): "owner"}, {})
        if not await self.store.create_node("", service, name, node.stored()):
            self._nodes.pop(service, None)
            raise PubsubError("conflict", text=f"node {name!r} exists")
        nodes[name] = node
        if not instant:
            return st.result(stanza)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        st.child(reply, ns.q(PUBSUB, "create"), {"node": name})
        return st.result(stanza, reply)

    async def _owned(self, service: str, action: Stanza, who: JID) -> tuple[str, Node]:
        name = engine.node_attr(action)
        node = await self._node(service, name)
        if node.affiliation(who) != "owner":
            raise PubsubError("forbidden", text="only an owner of the node may do this")
        return name, node

    async def _owner_get_configure(self, stanza: Stanza, service: str, who: JID,
                                   actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        reply = st.element(ns.q(OWNER, "pubsub"))
        st.child(reply, ns.q(OWNER, "configure"), {"node": name}).append(
            engine.config_form(node.config, max_items=self.config.max_items))
        return st.result(stanza, reply)

    async def _owner_get_default(self, stanza: Stanza, service: str, who: JID,
                                 actions: list[Stanza]) -> Stanza:
        reply = st.element(ns.q(OWNER, "pubsub"))
        st.child(reply, ns.q(OWNER, "default")).append(
            engine.config_form(engine.node_config(SERVICE_DEFAULTS),
                               max_items=self.config.max_items))
        return st.result(stanza, reply)

    async def _owner_set_configure(self, stanza: Stanza, service: str, who: JID,
                                   actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        form = actions[0].find(engine.X)
        if form is None:
            raise PubsubError("bad-request", text="configure needs a form")
        if form.get("type") == "cancel":
            return st.result(stanza)
        options = engine.form_values(form, engine.NODE_CONFIG)
        _check_service_config(options)
        node.config.update(options)
        await self._save(service, name, node)
        await self.store.trim("", service, name, self._limit(node))
        return st.result(stanza)

    async def _owner_set_delete(self, stanza: Stanza, service: str, who: JID,
                                actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        redirect = actions[0].find(ns.q(OWNER, "redirect"))
        await self.store.delete_node("", service, name)
        (await self.nodes(service)).pop(name, None)
        if node.config.get("notify_delete", True):
            await self._notify(service, name, node, engine.node_event(
                "delete", name, redirect.get("uri") if redirect is not None else None))
        return st.result(stanza)

    async def _owner_set_purge(self, stanza: Stanza, service: str, who: JID,
                               actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        await self.store.purge("", service, name)
        await self._notify(service, name, node, engine.node_event("purge", name))
        return st.result(stanza)

    # -- subscriptions and affiliations, the owner's management (§8.8, §8.9) ------------------

    async def _owner_get_subscriptions(self, stanza: Stanza, service: str, who: JID,
                                       actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        reply = st.element(ns.q(OWNER, "pubsub"))
        holder = st.child(reply, ns.q(OWNER, "subscriptions"), {"node": name})
        for jid, state in sorted(node.subscriptions.items()):
            st.child(holder, ns.q(OWNER, "subscription"), {"jid": jid, "subscription": state})
        return st.result(stanza, reply)

    async def _owner_set_subscriptions(self, stanza: Stanza, service: str, who: JID,
                                       actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        for entry in actions[0].findall(ns.q(OWNER, "subscription")):
            jid = str(_jid(entry.get("jid")))
            state = entry.get("subscription")
            if state == "none":
                node.subscriptions.pop(jid, None)
            elif state == "subscribed":
                node.subscriptions[jid] = "subscribed"
            else:
                raise PubsubError("bad-request", text=f"unsupported subscription {state!r}")
        await self._save(service, name, node)
        return st.result(stanza)

    async def _owner_get_affiliations(self, stanza: Stanza, service: str, who: JID,
                                      actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        reply = st.element(ns.q(OWNER, "pubsub"))
        holder = st.child(reply, ns.q(OWNER, "affiliations"), {"node": name})
        for jid, affiliation in sorted(node.affiliations.items()):
            st.child(holder, ns.q(OWNER, "affiliation"), {"jid": jid, "affiliation": affiliation})
        return st.result(stanza, reply)

    async def _owner_set_affiliations(self, stanza: Stanza, service: str, who: JID,
                                      actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(service, actions[0], who)
        changed = dict(node.affiliations)
        for entry in actions[0].findall(ns.q(OWNER, "affiliation")):
            jid = str(_jid(entry.get("jid")).bare)
            affiliation = entry.get("affiliation", "")
            if affiliation not in AFFILIATIONS:
                raise PubsubError("bad-request", text=f"unknown affiliation {affiliation!r}")
            if affiliation == "none":
                changed.pop(jid, None)
            else:
                changed[jid] = affiliation
        if "owner" not in changed.values():
            raise PubsubError("not-acceptable", text="a node keeps at least one owner")
        node.affiliations = changed
        for jid in [j for j in node.subscriptions if changed.get(str(_jid(j).bare)) == "outcast"]:
            del node.subscriptions[jid]
        await self._save(service, name, node)
        return st.result(stanza)

    # -- an entity's own subscriptions and affiliations (§5.6, §5.7) -------------------------

    async def _get_subscriptions(self, stanza: Stanza, service: str, who: JID,
                                 actions: list[Stanza]) -> Stanza:
        only = actions[0].get("node")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "subscriptions"), {"node": only} if only else {})
        for name, node in sorted((await self.nodes(service)).items()):
            if only is not None and name != only:
                continue
            for jid, state in sorted(node.subscriptions.items()):
                if _jid(jid).bare == who.bare:
                    st.child(holder, ns.q(PUBSUB, "subscription"),
                             {"node": name, "jid": jid, "subscription": state})
        return st.result(stanza, reply)

    async def _get_affiliations(self, stanza: Stanza, service: str, who: JID,
                                actions: list[Stanza]) -> Stanza:
        only = actions[0].get("node")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "affiliations"), {"node": only} if only else {})
        for name, node in sorted((await self.nodes(service)).items()):
            if only is not None and name != only:
                continue
            affiliation = node.affiliation(who)
            if affiliation != "none":
                st.child(holder, ns.q(PUBSUB, "affiliation"),
                         {"node": name, "affiliation": affiliation})
        return st.result(stanza, reply)

    # -- subscribe, unsubscribe (§6.1, §6.2) ------------------------------------------------

    def _check_read(self, node: Node, who: JID) -> None:
        affiliation = node.affiliation(who)
        if affiliation == "outcast":
            raise PubsubError("forbidden", text="you are banned from this node")
        approved = "subscribed" in (node.subscriptions.get(str(who)),
                                    node.subscriptions.get(str(who.bare)))
        engine.check_access(node.config, owner=affiliation == "owner", subscriber=False,
                            in_roster=False, member=affiliation in ("publisher", "member"),
                            approved=approved)

    async def _set_subscribe(self, stanza: Stanza, service: str, who: JID,
                             actions: list[Stanza]) -> Stanza:
        action = actions[0]
        name = engine.node_attr(action)
        jid = _jid(action.get("jid"))
        if jid.bare != who.bare:
            raise PubsubError("bad-request", "invalid-jid", "subscribe your own JID")
        node = await self._node(service, name)
        # §6.3.7: <options/> beside <subscribe/>, checked before anything changes.
        configure = next((c for c in actions[1:] if c.tag == ns.q(PUBSUB, "options")), None)
        options = (engine.subscription_options(configure.find(engine.X))
                   if configure is not None else None)
        affiliation = node.affiliation(who)
        if (node.config["access_model"] == "authorize" and affiliation != "outcast"
                and affiliation not in ("owner", "publisher", "member")):
            # §6.1.2.2: pending until an owner approves (§8.6).
            known = node.subscriptions.get(str(jid))
            state = "subscribed" if known == "subscribed" else "pending"
        else:
            self._check_read(node, who)
            state = "subscribed"
        node.subscriptions[str(jid)] = state
        if options is not None:
            node.options[str(jid)] = options
        await self._save(service, name, node)
        if state == "pending":
            owners = [j for j, a in sorted(node.affiliations.items()) if a == "owner"]
            await self._route(engine.authorization_request(service, name, str(jid)), owners)
        else:
            self.server.router.spawn(self._send_last(service, name, node, jid))
        return st.result(stanza, engine.subscription_reply(name, str(jid), state))

    async def _send_last(self, service: str, name: str, node: Node, jid: JID) -> None:
        """XEP-0060 §6.1.7: the newest item to a new subscriber, unless the node says never
        (or the subscriber's options say deliver = false, §6.3)."""
        if node.config["send_last_published_item"] == "never" or not node.delivers(str(jid)):
            return
        last = await self.store.items("", service, name, max_items=1)
        if not last:
            return
        item = last[0]
        shown = engine.parse_stored(item.payload) if node.config["deliver_payloads"] else None
        event = engine.items_event(name, [engine.item_element(EVENT, item.id, shown,
                                                              item.publisher)])
        await self._route(engine.event_message(service, event, node.config["notification_type"]),
                          [str(jid)])

    async def _authorize(self, stanza: Stanza, service: str, name: str, jid: str,
                         allowed: bool | None) -> None:
        """§8.6.2: an owner approves (subscribed, told to the subscriber with the last item)
        or denies (removed, told 'none') a pending subscription."""
        node = (await self.nodes(service)).get(name)
        if node is None or allowed is None or node.subscriptions.get(jid) != "pending":
            return
        try:
            if node.affiliation(_requester(stanza, None)) != "owner":
                return  # only an owner decides
            subscriber = JID.parse(jid)
        except (StanzaError, InvalidJID):
            return
        if allowed:
            node.subscriptions[jid] = "subscribed"
        else:
            del node.subscriptions[jid]
        await self._save(service, name, node)
        state = "subscribed" if allowed else "none"
        await self._route(engine.event_message(service, engine.subscription_event(name, jid,
                                                                                   state)), [jid])
        if allowed:
            await self._send_last(service, name, node, subscriber)

    async def _set_unsubscribe(self, stanza: Stanza, service: str, who: JID,
                               actions: list[Stanza]) -> Stanza:
        action = actions[0]
        name = engine.node_attr(action)
        jid = _jid(action.get("jid"))
        node = await self._node(service, name)
        if jid.bare != who.bare and node.affiliation(who) != "owner":
            raise PubsubError("forbidden", text="unsubscribe your own JID")
        if node.subscriptions.pop(str(jid), None) is None:
            raise PubsubError("unexpected-request", "not-subscribed", "no such subscription")
        await self._save(service, name, node)
        # §6.2.2: the result MAY say the subscription is now 'none' (Prosody's does).
        return st.result(stanza, engine.subscription_reply(name, str(jid), "none"))

    # -- subscription options (§6.3, §6.4) ----------------------------------------------------

    async def _subscribed(self, service: str, who: JID, action: Stanza) -> tuple[str, Node, str]:
        """§6.3.4: the node, then the subscriber's JID (bad-request jid-required without one,
        invalid-jid if malformed), others' options only for an owner (forbidden), and a
        subscription (unexpected-request not-subscribed)."""
        name = engine.node_attr(action)
        node = await self._node(service, name)
        if not action.get("jid"):
            raise PubsubError("bad-request", "jid-required", "options name a JID")
        jid = _jid(action.get("jid"))
        if jid.bare != who.bare and node.affiliation(who) != "owner":
            raise PubsubError("forbidden", text="another entity's options")
        if node.subscriptions.get(str(jid)) is None:
            raise PubsubError("unexpected-request", "not-subscribed", "no such subscription")
        return name, node, str(jid)

    async def _get_options(self, stanza: Stanza, service: str, who: JID,
                           actions: list[Stanza]) -> Stanza:
        name, node, jid = await self._subscribed(service, who, actions[0])
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        st.child(reply, ns.q(PUBSUB, "options"), {"node": name, "jid": jid}).append(
            engine.subscription_options_form(node.options.get(jid)))
        return st.result(stanza, reply)

    async def _set_options(self, stanza: Stanza, service: str, who: JID,
                           actions: list[Stanza]) -> Stanza:
        name, node, jid = await self._subscribed(service, who, actions[0])
        values = engine.subscription_options(actions[0].find(engine.X))  # §6.3.5, §6.3.6
        node.options[jid] = {**node.options.get(jid, {}), **values}
        await self._save(service, name, node)
        return st.result(stanza)

    async def _get_default(self, stanza: Stanza, service: str, who: JID,
                           actions: list[Stanza]) -> Stanza:
        """§6.4: the default options, of the service or of a node (which must exist)."""
        name = actions[0].get("node")
        if name:
            await self._node(service, name)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        st.child(reply, ns.q(PUBSUB, "default"), {"node": name} if name else {}).append(
            engine.subscription_options_form())
        return st.result(stanza, reply)

    # -- publish, retrieve, retract ---------------------------------------------------------

    @staticmethod
    def _check_publish(node: Node, who: JID) -> None:
        """§7.1.3.1 and pubsub#publish_model: publishers (owners and publishers), subscribers
        (those too) or open (anyone but outcasts)."""
        affiliation = node.affiliation(who)
        if affiliation in ("owner", "publisher"):
            return
        model = node.config.get("publish_model", "publishers")
        if affiliation != "outcast":
            if model == "open":
                return
            if model == "subscribers" and "subscribed" in (
                    node.subscriptions.get(str(who)), node.subscriptions.get(str(who.bare))):
                return
        raise PubsubError("forbidden", text="you may not publish to this node")

    async def _set_publish(self, stanza: Stanza, service: str, who: JID,
                           actions: list[Stanza]) -> Stanza:
        publish = actions[0]
        name = engine.node_attr(publish)
        node = await self._node(service, name)
        self._check_publish(node, who)
        options_el = next((c for c in actions[1:]
                           if c.tag == ns.q(PUBSUB, "publish-options")), None)
        form = options_el.find(engine.X) if options_el is not None else None
        unmet = engine.unmet_preconditions(node.config,
                                           engine.publish_options(form))
        if unmet:
            raise engine.precondition_error(unmet)
        entries = publish.findall(ns.q(PUBSUB, "item"))
        if not entries and node.config["persist_items"]:
            raise PubsubError("bad-request", "item-required", "publish an item")
        for entry in entries:  # every id checked before anything is stored
            engine.checked_item_id(entry.get("id") or "")
        published: list[tuple[str, Stanza | None]] = []
        for entry in entries or [st.element(ns.q(PUBSUB, "item"))]:
            payloads = [c for c in entry if isinstance(c.tag, str)]
            if len(payloads) > 1:
                raise PubsubError("bad-request", "invalid-payload", "an item has one payload")
            payload, text = engine.item_payload(payloads, node.config,
                                                self.config.max_payload_size)
            item_id = entry.get("id") or uuid.uuid4().hex
            if node.config["persist_items"]:
                await self.store.publish("", service, name,
                                         StoredItem(item_id, str(who.bare), text),
                                         self._limit(node))
            published.append((item_id, payload))
        if node.config["deliver_notifications"]:
            shown = node.config["deliver_payloads"]
            await self._notify(service, name, node, engine.items_event(
                name, [engine.item_element(EVENT, i, p if shown else None, str(who.bare))
                       for i, p in published]))
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        done = st.child(reply, ns.q(PUBSUB, "publish"), {"node": name})
        for item_id, _ in published:
            st.child(done, ns.q(PUBSUB, "item"), {"id": item_id})
        return st.result(stanza, reply)

    async def _get_items(self, stanza: Stanza, service: str, who: JID,
                         actions: list[Stanza]) -> Stanza:
        request = actions[0]
        name = engine.node_attr(request)
        node = await self._node(service, name)
        self._check_read(node, who)
        ids, limit = engine.items_request(request)
        stored = await self.store.items("", service, name, ids=ids or None, max_items=limit)
        if ids and not stored:
            raise PubsubError("item-not-found", text="no such item")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "items"), {"node": name})
        for one in stored:
            holder.append(engine.item_element(PUBSUB, one.id, engine.parse_stored(one.payload),
                                              one.publisher))
        return st.result(stanza, reply)

    async def _set_retract(self, stanza: Stanza, service: str, who: JID,
                           actions: list[Stanza]) -> Stanza:
        retract = actions[0]
        name = engine.node_attr(retract)
        node = await self._node(service, name)
        if node.affiliation(who) not in ("owner", "publisher"):
            raise PubsubError("forbidden", text="only owners and publishers retract")
        ids = [engine.checked_item_id(i.get("id") or "")
               for i in retract.findall(ns.q(PUBSUB, "item"))]
        if not ids or not all(ids):
            raise PubsubError("bad-request", "item-required", "retract names item ids")
        for item_id in ids:
            assert item_id is not None
            if not await self.store.retract("", service, name, item_id):
                raise PubsubError("item-not-found", text=f"no item {item_id!r}")
            if retract.get("notify") in ("1", "true") or node.config["notify_retract"]:
                await self._notify(service, name, node, engine.retract_event(name, item_id))
        return st.result(stanza)

    # -- notifications, discovery -----------------------------------------------------------

    async def _notify(self, service: str, name: str, node: Node, event: Stanza) -> None:
        targets = [jid for jid, state in node.subscriptions.items()
                   if state == "subscribed" and node.delivers(jid)]
        message = engine.event_message(service, event, node.config["notification_type"])
        await self._route(message, targets)

    async def _route(self, message: Stanza, targets: list[str]) -> None:
        router = self.server.router
        for target in targets:
            copied = copy.deepcopy(message)
            copied.set("to", target)
            copied.set("id", f"pubsub-{next(self._ids)}")
            pending = router.route(copied, None)
            if pending is not None:
                await pending

    async def _disco_info(self, stanza: Stanza, service: str, query: Stanza) -> Stanza:
        name = query.get("node") or ""
        node = await self._node(service, name)
        reply = st.element(_INFO, {"node": name})
        st.child(reply, ns.q(ns.DISCO_INFO, "identity"), {"category": "pubsub", "type": "leaf"})
        st.child(reply, ns.q(ns.DISCO_INFO, "feature"), {"var": PUBSUB})
        meta = engine.config_form(node.config, engine.META_DATA, "result")
        for jid, affiliation in sorted(node.affiliations.items()):
            if affiliation == "owner":
                owner = meta.find(f"{engine.FIELD}[@var='pubsub#owner']")
                if owner is None:
                    owner = st.child(meta, engine.FIELD, {"var": "pubsub#owner",
                                                          "type": "jid-multi",
                                                          "label": "Node owners"})
                st.child(owner, engine.VALUE, text=jid)
        reply.append(meta)
        return st.result(stanza, reply)

    async def _disco_items(self, stanza: Stanza, service: str, query: Stanza) -> Stanza:
        name = query.get("node")
        if name is None:
            reply = st.element(_ITEMS)
            for node_name, node in sorted((await self.nodes(service)).items()):
                attrs = {"jid": service, "node": node_name}
                if node.config.get("title"):
                    attrs["name"] = node.config["title"]
                st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), attrs)
            return st.result(stanza, reply)
        await self._node(service, name)
        reply = st.element(_ITEMS, {"node": name})
        for one in await self.store.items("", service, name):
            st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), {"jid": service, "name": one.id})
        return st.result(stanza, reply)


def _check_service_config(options: dict[str, Any]) -> None:
    if options.get("access_model", "open") not in ("open", "whitelist", "authorize"):
        raise PubsubError("not-acceptable", "unsupported-access-model",
                          "the service's nodes are open, authorize or whitelist")


def _requester(stanza: Stanza, origin: Session | None) -> JID:
    sender = stanza.get("from")
    if sender is None:
        if origin is None:
            raise StanzaError("bad-request")
        return origin.jid
    return _jid(sender)


def _jid(text: str | None) -> JID:
    try:
        return JID.parse(text or "")
    except InvalidJID:
        raise PubsubError("bad-request", "invalid-jid", "not a valid JID") from None
