"""The one XEP-0060 iq front, for PEP (pep.py: a service at each account's bare JID) and the
service at pubsub.<domain> (service.py): requests are read, checked and answered here, on the
pure engine (engine.py), with the notifications they cause fanned out once per payload
(`server/xml/writer.addressed_copies`, as MUC does).

Here: retrieve items (§6.5), subscribe (§6.1, pending on an authorize node with the §8.6 form to
the owners; with options, §6.3.7), unsubscribe (§6.2), subscription options and their defaults
(§6.3, §6.4), an entity's subscriptions and affiliations (§5.6, §5.7), publish (§7.1, with
publish-options as preconditions, §7.1.5), retract (§7.2), and the owner's configure and default
(§8.2, §8.3), delete with redirect (§8.4), purge (§8.5), subscription management (§8.8) and
affiliation management (§8.9), the owners' answers to authorization requests (§8.6.2), the last
item on subscribing (§6.1.7) and the notifications.

A front keeps only its policy, as the methods marked "policy" below: where its nodes live and
who owns them, whether publishing creates a node, the facts the access models are checked on
(§4.5), who is notified besides the explicit subscribers, how nodes are created.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Stanza
from server.modules.pubsub import engine
from server.modules.pubsub.engine import EVENT, OWNER, PUBSUB, Node, PubsubError
from server.modules.pubsub.writer import ItemWriter
from server.sessions import Session
from server.storage.pubsub import Published, PubsubStore, StoredItem
from server.xml import ns
from server.xml import stanza as st
from server.xml.writer import addressed_copies

if TYPE_CHECKING:
    from server.module import ModuleContext

STATES = ("none", "subscribed", "pending")


@dataclass(frozen=True, slots=True)
class Host:
    """One pubsub service: an account's PEP service (owner: the account) or pubsub.<domain>.
    `jid` is its address (the 'from' of its notifications); (user, domain) its key in the
    store ('' and the service domain for pubsub.<domain>)."""
    jid: str
    user: str
    domain: str
    owner: JID | None = None


Operation = Callable[[Stanza, Host, JID, list[Stanza]], Awaitable[Stanza]]


def requester(stanza: Stanza, origin: Session | None) -> JID:
    """Who asks: the 'from' (stamped by the server for its own clients), or the session's
    JID; RFC 6120 §8.3.3.8 jid-malformed when 'from' is not a JID."""
    sender = stanza.get("from")
    if sender is None:
        if origin is None:
            raise StanzaError("bad-request", "no sender")
        return origin.jid
    try:
        return JID.parse(sender)
    except InvalidJID:
        raise StanzaError("jid-malformed") from None


def jid_attr(element: Stanza) -> JID:
    """The 'jid' of a subscribe, unsubscribe, options, subscription or affiliation element:
    bad-request with <invalid-jid/> when malformed (XEP-0060 §6.1.3.1, §6.3.4)."""
    try:
        return JID.parse(element.get("jid") or "")
    except InvalidJID:
        raise PubsubError("bad-request", "invalid-jid", "not a valid JID") from None


class PubsubProtocol:
    """The XEP-0060 operations, mixed into the PEP module and the service module."""

    server: ModuleContext
    config: Any  # max_items, max_payload_size
    # Items one publish may carry (PEP: one, XEP-0163 §3); None: any number.
    max_publish_items: ClassVar[int | None] = None
    # Whether owners manage affiliations (§8.9); PEP: the account is the only owner.
    manages_affiliations: ClassVar[bool] = True
    # The feature named in <unsupported/> for an action a front does not serve.
    unsupported_features: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self._item_writer: ItemWriter | None = None
        self._ids = itertools.count(1)
        self._prefix = f"pubsub-{uuid.uuid4().hex[:8]}-"
        self._operations: dict[tuple[bool, str, str], Operation] = {
            (False, "get", "items"): self._get_items,
            (False, "get", "subscriptions"): self._get_subscriptions,
            (False, "get", "affiliations"): self._get_affiliations,
            (False, "get", "options"): self._get_options,
            (False, "get", "default"): self._get_default,
            (False, "set", "create"): self.create,
            (False, "set", "publish"): self._publish,
            (False, "set", "retract"): self._retract,
            (False, "set", "subscribe"): self._subscribe,
            (False, "set", "unsubscribe"): self._unsubscribe,
            (False, "set", "options"): self._set_options,
            (True, "get", "configure"): self._owner_get_configure,
            (True, "get", "default"): self._owner_get_default,
            (True, "get", "subscriptions"): self._owner_get_subscriptions,
            (True, "get", "affiliations"): self._owner_get_affiliations,
            (True, "set", "configure"): self._owner_set_configure,
            (True, "set", "delete"): self._owner_set_delete,
            (True, "set", "purge"): self._owner_set_purge,
            (True, "set", "subscriptions"): self._owner_set_subscriptions,
            (True, "set", "affiliations"): self._owner_set_affiliations,
        }

    @property
    def _writer(self) -> ItemWriter:
        """The group commit of published items, on the store the front has now."""
        store = self.store
        writer = self._item_writer
        if writer is None or writer.store is not store:
            writer = self._item_writer = ItemWriter(store)
        return writer

    # -- policy: what each front says ---------------------------------------------------------

    @property
    def store(self) -> PubsubStore:
        raise NotImplementedError

    async def host(self, stanza: Stanza, origin: Session | None) -> Host:
        """The service a request is addressed to (an error if there is none)."""
        raise NotImplementedError

    async def nodes(self, host: Host) -> dict[str, Node]:
        raise NotImplementedError

    async def facts(self, host: Host, node: Node, who: JID) -> dict[str, bool]:
        """The facts the access model is checked on (engine.check_access's arguments)."""
        raise NotImplementedError

    async def targets(self, host: Host, name: str, node: Node) -> list[str]:
        """Who gets the node's notifications."""
        raise NotImplementedError

    async def create(self, stanza: Stanza, host: Host, who: JID,
                     actions: list[Stanza]) -> Stanza:
        """<create/> (§8.1)."""
        raise NotImplementedError

    async def publish_node(self, host: Host, name: str, who: JID, options: dict[str, Any],
                           items: list[tuple[str | None, list[Stanza]]]) -> tuple[Node, bool]:
        """The node a publish goes to, once the publisher may publish there; True when it was
        created for it (auto-create, §7.1.4: then the options are its configuration, not
        preconditions)."""
        raise NotImplementedError

    async def save_config(self, host: Host, name: str, node: Node) -> None:
        raise NotImplementedError

    async def save_subscription(self, host: Host, name: str, node: Node, jid: str) -> None:
        """Persist one subscription as the node now has it (gone when not in it)."""
        raise NotImplementedError

    async def save_affiliations(self, host: Host, name: str, node: Node) -> None:
        raise NotImplementedError

    def node_defaults(self) -> dict[str, Any]:
        """The configuration a new node gets (§8.3)."""
        return engine.node_config()

    def check_config(self, options: dict[str, Any]) -> None:
        """Refuse a configuration the front does not serve (§8.2.5)."""

    def check_owner_request(self, host: Host, who: JID) -> None:
        """Before any pubsub#owner request (PEP: the account only)."""

    def shown_publisher(self, host: Host, node: Node, publisher: str) -> str | None:
        """The 'publisher' an event's item carries (§7.1.2.3)."""
        return publisher

    async def published(self, host: Host, name: str,
                        items: list[tuple[str, Stanza | None]]) -> None:
        """After items went out (PEP: the pep/published event)."""

    def forget_node(self, host: Host, name: str) -> None:
        """A node was deleted."""

    # -- the front door -----------------------------------------------------------------------

    async def answer(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """The reply to a <pubsub/> (or pubsub#owner) iq: the result, or the error."""
        try:
            payload = st.payload(stanza)
            assert payload is not None
            actions = [c for c in payload if isinstance(c.tag, str)]
            host = await self.host(stanza, origin)
            if not actions:
                raise PubsubError("bad-request", text="the pubsub element needs an action")
            who = requester(stanza, origin)
            owner_ns = payload.tag == ns.q(OWNER, "pubsub")
            name = etree.QName(actions[0]).localname
            operation = self._operations.get((owner_ns, stanza.get("type", ""), name))
            if operation is None:
                raise engine.unsupported(self.unsupported_features.get(name, name))
            if owner_ns:
                self.check_owner_request(host, who)
            return await operation(stanza, host, who, actions)
        except StanzaError as err:
            return engine.error_reply(stanza, err)

    async def node(self, host: Host, name: str) -> Node:
        node = (await self.nodes(host)).get(name)
        if node is None:
            raise PubsubError("item-not-found", text=f"no node {name!r}")
        return node

    async def _owned(self, host: Host, action: Stanza, who: JID) -> tuple[str, Node]:
        name = engine.node_attr(action)
        node = await self.node(host, name)
        if node.affiliation(who) != "owner":
            raise PubsubError("forbidden", text="only an owner of the node may do this")
        return name, node

    def limit(self, node: Node) -> int:
        return engine.max_items(node.config, self.config.max_items)

    # -- retrieve (§6.5), an entity's subscriptions and affiliations (§5.6, §5.7) ---------------

    async def _get_items(self, stanza: Stanza, host: Host, who: JID,
                         actions: list[Stanza]) -> Stanza:
        request = actions[0]
        name = engine.node_attr(request)
        node = await self.node(host, name)
        engine.check_access(node.config, **await self.facts(host, node, who))
        ids, limit = engine.items_request(request)
        stored = await self.store.items(host.user, host.domain, name, ids=ids or None,
                                        max_items=limit)
        if ids and not stored:
            raise PubsubError("item-not-found", text="no such item")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "items"), {"node": name})
        for one in stored:
            holder.append(engine.item_element(PUBSUB, one.id, engine.parse_stored(one.payload),
                                              one.publisher))
        return st.result(stanza, reply)

    async def _get_subscriptions(self, stanza: Stanza, host: Host, who: JID,
                                 actions: list[Stanza]) -> Stanza:
        only = actions[0].get("node")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "subscriptions"), {"node": only} if only else {})
        for name, node in sorted((await self.nodes(host)).items()):
            if only is not None and name != only:
                continue
            for jid, state in sorted(node.subscriptions.items()):
                if _bare(jid) == who.bare:
                    holder.append(engine.subscription_element(PUBSUB, name, jid, state))
        return st.result(stanza, reply)

    async def _get_affiliations(self, stanza: Stanza, host: Host, who: JID,
                                actions: list[Stanza]) -> Stanza:
        only = actions[0].get("node")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "affiliations"), {"node": only} if only else {})
        for name, node in sorted((await self.nodes(host)).items()):
            if only is not None and name != only:
                continue
            affiliation = node.affiliation(who)
            if affiliation != "none":
                st.child(holder, ns.q(PUBSUB, "affiliation"),
                         {"node": name, "affiliation": affiliation})
        return st.result(stanza, reply)

    # -- subscribe, unsubscribe (§6.1, §6.2) --------------------------------------------------

    async def _subscribe(self, stanza: Stanza, host: Host, who: JID,
                         actions: list[Stanza]) -> Stanza:
        action = actions[0]
        name = engine.node_attr(action)
        jid = jid_attr(action)
        if jid.bare != who.bare:  # §6.1.3.1, before the node is looked at
            raise PubsubError("bad-request", "invalid-jid", "subscribe your own JID")
        node = await self.node(host, name)
        # §6.3.7: <options/> beside <subscribe/>, checked before anything changes.
        configure = next((c for c in actions[1:] if c.tag == ns.q(PUBSUB, "options")), None)
        options = (engine.subscription_options(configure.find(engine.X))
                   if configure is not None else None)
        state = engine.subscription_state(node, who, jid, await self.facts(host, node, who))
        await self._set_subscription(host, name, node, str(jid), state, options)
        if state == "pending":
            await self.deliver(engine.authorization_requests(host.jid, name, node, str(jid)))
        else:
            self.server.router.spawn(self.send_last(host, name, node, jid, on_sub=True))
        return st.result(stanza, engine.subscription_reply(name, str(jid), state))

    async def _set_subscription(self, host: Host, name: str, node: Node, jid: str,
                                state: str | None,
                                options: dict[str, bool] | None = None) -> None:
        """Change one subscription (None: remove it, with its options), kept as it was when
        the store refuses."""
        before = (node.subscriptions.get(jid), node.options.get(jid))
        if state is None:
            node.subscriptions.pop(jid, None)
            node.options.pop(jid, None)
        else:
            node.subscriptions[jid] = state
            if options is not None:
                node.options[jid] = {**node.options.get(jid, {}), **options}
        try:
            await self.save_subscription(host, name, node, jid)
        except BaseException:
            _restore(node, jid, *before)
            raise

    async def _unsubscribe(self, stanza: Stanza, host: Host, who: JID,
                           actions: list[Stanza]) -> Stanza:
        action = actions[0]
        name = engine.node_attr(action)
        jid = jid_attr(action)
        node = await self.node(host, name)
        engine.check_unsubscribe(node, who, jid)
        await self._set_subscription(host, name, node, str(jid), None)
        # §6.2.2: the result MAY say the subscription is now 'none' (Prosody's does).
        return st.result(stanza, engine.subscription_reply(name, str(jid), "none"))

    # -- subscription options (§6.3, §6.4) ----------------------------------------------------

    async def _subscribed(self, host: Host, who: JID, action: Stanza) -> tuple[str, Node, str]:
        """§6.3.4: the node, then the subscriber's JID (bad-request jid-required without one,
        invalid-jid if malformed), others' options only for an owner (forbidden), and a
        subscription (unexpected-request not-subscribed)."""
        name = engine.node_attr(action)
        node = await self.node(host, name)
        jid = jid_attr(action) if action.get("jid") else None
        return name, node, engine.check_options_request(node, who, jid)

    async def _get_options(self, stanza: Stanza, host: Host, who: JID,
                           actions: list[Stanza]) -> Stanza:
        name, node, jid = await self._subscribed(host, who, actions[0])
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        st.child(reply, ns.q(PUBSUB, "options"), {"node": name, "jid": jid}).append(
            engine.subscription_options_form(node.options.get(jid)))
        return st.result(stanza, reply)

    async def _set_options(self, stanza: Stanza, host: Host, who: JID,
                           actions: list[Stanza]) -> Stanza:
        name, node, jid = await self._subscribed(host, who, actions[0])
        values = engine.subscription_options(actions[0].find(engine.X))  # §6.3.5, §6.3.6
        await self._set_subscription(host, name, node, jid, node.subscriptions[jid], values)
        return st.result(stanza)

    async def _get_default(self, stanza: Stanza, host: Host, who: JID,
                           actions: list[Stanza]) -> Stanza:
        """§6.4: the default options, of the service or of a node (which must exist)."""
        name = actions[0].get("node")
        if name:
            await self.node(host, name)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        st.child(reply, ns.q(PUBSUB, "default"), {"node": name} if name else {}).append(
            engine.subscription_options_form())
        return st.result(stanza, reply)

    # -- publish, retract (§7.1, §7.2) --------------------------------------------------------

    async def _publish(self, stanza: Stanza, host: Host, who: JID,
                       actions: list[Stanza]) -> Stanza:
        publish = actions[0]
        name = engine.node_attr(publish)
        entries = publish.findall(ns.q(PUBSUB, "item"))
        if self.max_publish_items is not None and len(entries) > self.max_publish_items:
            raise PubsubError("bad-request", "invalid-payload", "publish one item at a time")
        items: list[tuple[str | None, list[Stanza]]] = []
        for entry in entries:  # every item checked before anything is stored
            payloads = [c for c in entry if isinstance(c.tag, str)]
            if len(payloads) > 1:
                raise PubsubError("bad-request", "invalid-payload", "an item has one payload")
            items.append((engine.checked_item_id(entry.get("id") or "") or None, payloads))
        options_el = next((c for c in actions[1:]
                           if c.tag == ns.q(PUBSUB, "publish-options")), None)
        options = engine.publish_options(options_el.find(engine.X)
                                         if options_el is not None else None)
        node, created = await self.publish_node(host, name, who, options, items)
        if not created:
            unmet = engine.unmet_preconditions(node.config, options)
            if unmet:
                raise engine.precondition_error(unmet)
        if not items:
            if node.config["persist_items"]:  # §7.1.3.6
                raise PubsubError("bad-request", "item-required", "publish an item")
            items = [(None, [])]
        published = await self.put_items(host, name, node, who, items)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        done = st.child(reply, ns.q(PUBSUB, "publish"), {"node": name})
        for item_id, _ in published:
            st.child(done, ns.q(PUBSUB, "item"), {"id": item_id})
        return st.result(stanza, reply)

    async def put_items(self, host: Host, name: str, node: Node, who: JID,
                        items: list[tuple[str | None, list[Stanza]]]
                        ) -> list[tuple[str, Stanza | None]]:
        """Keep the items (as the node says) and notify them; their ids and payloads."""
        checked = [(item_id, *engine.item_payload(payloads, node.config,
                                                  self.config.max_payload_size))
                   for item_id, payloads in items]
        publisher = str(who.bare)
        published: list[tuple[str, Stanza | None]] = []
        stored: list[asyncio.Future[None]] = []
        for item_id, payload, text in checked:
            item_id = item_id or uuid.uuid4().hex
            if node.config["persist_items"]:
                limit = self.limit(node)
                stored.append(self._writer.add(
                    Published(host.user, host.domain, name, StoredItem(item_id, publisher, text),
                              limit),
                    functools.partial(node.remember_last,
                                      (item_id, publisher, text) if limit > 0 else None)))
            published.append((item_id, payload))
        for one in stored:  # committed with the publications of other sessions (writer.py)
            await one
        if node.config["deliver_notifications"]:
            shown = node.config["deliver_payloads"]
            shown_publisher = self.shown_publisher(host, node, publisher)
            await self.notify(host, name, node, engine.items_event(
                name, [engine.item_element(EVENT, i, p if shown else None, shown_publisher)
                       for i, p in published]))
        await self.published(host, name, published)
        return published

    async def _retract(self, stanza: Stanza, host: Host, who: JID,
                       actions: list[Stanza]) -> Stanza:
        retract = actions[0]
        name = engine.node_attr(retract)
        node = await self.node(host, name)
        engine.check_retracter(node, who)
        ids = [engine.checked_item_id(i.get("id") or "")
               for i in retract.findall(ns.q(PUBSUB, "item"))]
        if not ids or not all(ids):
            raise PubsubError("bad-request", "item-required", "retract names item ids")
        for item_id in ids:
            if not await self.remove_item(host, name, node, item_id,
                                          retract.get("notify") in ("1", "true")):
                raise PubsubError("item-not-found", text=f"no item {item_id!r}")
        return st.result(stanza)

    async def remove_item(self, host: Host, name: str, node: Node, item_id: str,
                          notify: bool = False) -> bool:
        """Retract an item (notified when asked or when the node says notify_retract); False
        when there was none."""
        if not await self.store.retract(host.user, host.domain, name, item_id):
            return False
        node.forget_last()
        if notify or node.config["notify_retract"]:
            await self.notify(host, name, node, engine.retract_event(name, item_id))
        return True

    # -- the owner's use cases (§8) -----------------------------------------------------------

    async def _owner_get_configure(self, stanza: Stanza, host: Host, who: JID,
                                   actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(host, actions[0], who)
        reply = st.element(ns.q(OWNER, "pubsub"))
        st.child(reply, ns.q(OWNER, "configure"), {"node": name}).append(
            engine.config_form(node.config, max_items=self.config.max_items))
        return st.result(stanza, reply)

    async def _owner_get_default(self, stanza: Stanza, host: Host, who: JID,
                                 actions: list[Stanza]) -> Stanza:
        reply = st.element(ns.q(OWNER, "pubsub"))
        st.child(reply, ns.q(OWNER, "default")).append(
            engine.config_form(self.node_defaults(), max_items=self.config.max_items))
        return st.result(stanza, reply)

    async def _owner_set_configure(self, stanza: Stanza, host: Host, who: JID,
                                   actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(host, actions[0], who)
        form = actions[0].find(engine.X)
        if form is None:
            raise PubsubError("bad-request", text="configure needs a form")
        if form.get("type") == "cancel":
            return st.result(stanza)
        options = engine.form_values(form, engine.NODE_CONFIG)
        self.check_config(options)
        node.config = {**node.config, **options}
        await self.save_config(host, name, node)
        await self.store.trim(host.user, host.domain, name, self.limit(node))
        node.forget_last()
        return st.result(stanza)

    async def _owner_set_delete(self, stanza: Stanza, host: Host, who: JID,
                                actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(host, actions[0], who)
        redirect = actions[0].find(ns.q(OWNER, "redirect"))
        await self.store.delete_node(host.user, host.domain, name)
        node.forget_last()
        (await self.nodes(host)).pop(name, None)
        if node.config.get("notify_delete", True):  # to its subscribers, before they go too
            await self.notify(host, name, node, engine.node_event(
                "delete", name, redirect.get("uri") if redirect is not None else None))
        self.forget_node(host, name)
        return st.result(stanza)

    async def _owner_set_purge(self, stanza: Stanza, host: Host, who: JID,
                               actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(host, actions[0], who)
        await self.store.purge(host.user, host.domain, name)
        node.forget_last()
        await self.notify(host, name, node, engine.node_event("purge", name))
        return st.result(stanza)

    async def _owner_get_subscriptions(self, stanza: Stanza, host: Host, who: JID,
                                       actions: list[Stanza]) -> Stanza:
        name, node = await self._owned(host, actions[0], who)
        reply = st.element(ns.q(OWNER, "pubsub"))
        holder = st.child(reply, ns.q(OWNER, "subscriptions"), {"node": name})
        for jid, state in sorted(node.subscriptions.items()):  # §8.8.1: the node named once
            st.child(holder, ns.q(OWNER, "subscription"), {"jid": jid, "subscription": state})
        return st.result(stanza, reply)

    async def _owner_set_subscriptions(self, stanza: Stanza, host: Host, who: JID,
                                       actions: list[Stanza]) -> Stanza:
        """§8.8.2: the owner sets subscriptions ('none' removes one); each subscriber whose
        state changed is told (§8.8.4)."""
        name, node = await self._owned(host, actions[0], who)
        changes = []
        for entry in actions[0].findall(ns.q(OWNER, "subscription")):
            jid = jid_attr(entry)
            state = entry.get("subscription") or ""
            if state not in STATES:
                raise PubsubError("bad-request", text=f"unknown subscription state {state!r}")
            changes.append((jid, state))
        for jid, state in changes:
            await self.change_subscription(host, name, node, jid, state)
        return st.result(stanza)

    async def change_subscription(self, host: Host, name: str, node: Node, jid: JID,
                                  state: str) -> None:
        """An owner's change of a subscription (§8.8.2, §8.6.2), told to the subscriber
        (§8.8.4), with the last item when it is now subscribed."""
        if state == node.subscriptions.get(str(jid), "none"):
            return
        await self._set_subscription(host, name, node, str(jid),
                                     None if state == "none" else state)
        await self.deliver([engine.subscription_changed(host.jid, name, str(jid), state)])
        if state == "subscribed":
            await self.send_last(host, name, node, jid, on_sub=True)

    async def _owner_get_affiliations(self, stanza: Stanza, host: Host, who: JID,
                                      actions: list[Stanza]) -> Stanza:
        if not self.manages_affiliations:
            raise engine.unsupported("modify-affiliations")
        name, node = await self._owned(host, actions[0], who)
        reply = st.element(ns.q(OWNER, "pubsub"))
        holder = st.child(reply, ns.q(OWNER, "affiliations"), {"node": name})
        for jid, affiliation in sorted(node.affiliations.items()):
            st.child(holder, ns.q(OWNER, "affiliation"), {"jid": jid, "affiliation": affiliation})
        return st.result(stanza, reply)

    async def _owner_set_affiliations(self, stanza: Stanza, host: Host, who: JID,
                                      actions: list[Stanza]) -> Stanza:
        """§8.9.2: the owner changes affiliations; a node keeps an owner (§8.9.2.4), and an
        outcast loses its subscriptions."""
        if not self.manages_affiliations:
            raise engine.unsupported("modify-affiliations")
        name, node = await self._owned(host, actions[0], who)
        engine.change_affiliations(node, [(jid_attr(entry), entry.get("affiliation", ""))
                                          for entry in actions[0].findall(
                                              ns.q(OWNER, "affiliation"))])
        await self.save_affiliations(host, name, node)
        return st.result(stanza)

    async def authorize(self, host: Host, decider: JID, name: str, jid: str,
                        allowed: bool | None) -> None:
        """§8.6.2: an owner approves (subscribed, told to the subscriber with the last item)
        or denies (removed, told 'none') a pending subscription; a cancelled form (allowed
        None) leaves it pending."""
        node = (await self.nodes(host)).get(name)
        if node is None or allowed is None or node.subscriptions.get(jid) != "pending":
            return  # answered already, or never asked
        if node.affiliation(decider) != "owner":
            return  # only an owner decides
        try:
            subscriber = JID.parse(jid)
        except InvalidJID:
            return
        await self.change_subscription(host, name, node, subscriber,
                                       "subscribed" if allowed else "none")

    # -- notifications ------------------------------------------------------------------------

    async def send_last(self, host: Host, name: str, node: Node, jid: JID, *,
                        on_sub: bool) -> None:
        """The node's newest item to one entity that may see it: on a new subscription
        (§6.1.7) when send_last_published_item is on_sub or on_sub_and_presence, on presence
        (XEP-0163 §4.3.2) when it is on_sub_and_presence; not when the subscriber's options
        say deliver = false (§6.3)."""
        when = node.config["send_last_published_item"]
        if when == "never" or (when == "on_sub" and not on_sub) or not node.delivers(str(jid)):
            return  # before any storage read
        if node.last_known:
            item = node.last
        else:
            generation = node.generation
            last = await self.store.items(host.user, host.domain, name, max_items=1)
            item = (last[0].id, last[0].publisher, last[0].payload) if last else None
            if node.generation == generation:  # no commit, retract or purge came between
                node.remember_last(item)
        found = engine.last_item(host.jid, name, node, jid, await self.facts(host, node, jid),
                                 item, self.shown_publisher(host, node, item[1]) if item else None,
                                 on_sub=on_sub)
        if found is not None:
            await self.deliver([found])

    async def notify(self, host: Host, name: str, node: Node, event: Stanza) -> None:
        """An event to everyone the front says is notified."""
        await self.deliver([engine.notification(host.jid, node, event,
                                                await self.targets(host, name, node))])

    async def deliver(self, notifications: Iterable[engine.Notification]) -> None:
        """Each message (without 'to') to its recipients, serialised once for them all.
        Routed, not written to a session directly: the recipient's filters (blocking,
        XEP-0191; CSI) apply as to any message, and remote contacts get it by federation."""
        router = self.server.router
        for one in notifications:
            if not one.to:
                continue
            one.message.set("id", f"{self._prefix}{next(self._ids)}")
            for addressed in addressed_copies(one.message, one.to):
                pending = router.route(addressed, None)
                if pending is not None:
                    await pending


def _bare(jid: str) -> JID:
    return JID.parse(jid).bare


def _restore(node: Node, jid: str, state: str | None,
             options: dict[str, bool] | None) -> None:
    if state is None:
        node.subscriptions.pop(jid, None)
    else:
        node.subscriptions[jid] = state
    if options is None:
        node.options.pop(jid, None)
    else:
        node.options[jid] = options
