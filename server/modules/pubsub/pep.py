"""Personal Eventing Protocol (XEP-0163): every account is a pubsub service at its bare JID,
on the engine of engine.py, its nodes and items in the ``pep`` store (both backends).

- publish (auto-create; item ids, overwrite by id; publish-options as preconditions, §7.1.5),
  retrieve items (all, by id, max_items), retract (notify_retract), create, and the owner's
  configure, default, delete (with redirect) and purge;
- access models presence (the default: subscribers of the owner's presence), open, roster
  (pubsub#roster_groups_allowed), authorize (approved subscribers) and whitelist (the owner);
- explicit subscriptions (XEP-0060 §6.1, XEP-0163 §4) in the store (gone with the node, the
  owner's or the subscriber's account): subscribe (pending on an authorize node: the owner gets
  the §8.6.1 form, from and to its bare JID, and answers it to its bare JID), unsubscribe, the
  subscriber's §5.6 list, the owner's §8.8 management; the last item on subscribing (§6.1.7);
- notifications, as <message type='headline'> from the bare JID, to the owner's available
  resources, to explicit subscribers the access model still admits, and to the available
  resources of contacts allowed to see the node whose XEP-0115 capabilities include
  ``<node>+notify``. Capabilities are cached by their ``ver``: a resource with an unknown one
  is asked with disco#info before its presence goes out, the answer's hash is verified
  (XEP-0115 §5) and kept for everyone; an unverifiable answer serves that resource only;
- the last item of each node to a resource that becomes available (or changes capabilities);
- publish_item/retract_item/stored_items for other modules (private.py: XEP-0402 bookmarks
  from XEP-0048; vcard.py: XEP-0398 avatars), and the pep/published event;
- contacts on other servers: the presence their resources send our users says which are
  available with which caps (asked over s2s from the user's bare JID), and notifications go to
  them by federation.

    [pep]
    max_items = 256          # items a node keeps at most (pubsub#max_items = max)
    max_nodes = 64           # nodes per account
    max_payload_size = 65536 # bytes of one item's payload
"""

from __future__ import annotations

import copy
import itertools
import logging
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.config import int_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, Stanza, hook, iq_get, iq_set
from server.modules.caps import EntityCaps
from server.modules.pubsub import engine
from server.modules.pubsub.engine import EVENT, OWNER, PUBSUB, PubsubError
from server.presence.subscription import is_subscriber
from server.roster import state_of
from server.sessions import Session
from server.storage.base import NoSuchAccount
from server.storage.pubsub import SPEC, StoredItem
from server.xml import ns
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.pep")

_CACHE_SIZE = 10000
FEATURES = (PUBSUB, *(f"{PUBSUB}#{f}" for f in (
    "access-authorize", "access-open", "access-presence", "access-roster", "access-whitelist",
    "auto-create", "config-node", "create-nodes", "delete-items", "delete-nodes",
    "filtered-notifications", "item-ids", "last-published", "manage-subscriptions",
    "persistent-items", "publish", "publish-options", "purge-nodes", "retract-items",
    "retrieve-affiliations", "retrieve-default", "retrieve-items", "retrieve-subscriptions",
    "subscribe")))


@dataclass(frozen=True, slots=True, kw_only=True)
class PepSettings:
    max_items: int = field(metadata=int_option(1, 100000, 256))
    max_nodes: int = field(metadata=int_option(1, 100000, 64))
    max_payload_size: int = field(metadata=int_option(256, 1 << 24, 65536))


class Pep(Module):
    name = "pep"
    settings = PepSettings
    stores = (SPEC,)

    def __init__(self, server: Server, config: PepSettings) -> None:
        super().__init__(server, config)
        # owner bare JID -> node -> configuration (the whole account's nodes, once read)
        self._nodes: dict[JID, dict[str, dict[str, Any]]] = {}
        # owner bare JID -> node -> subscriber JID -> 'subscribed' | 'pending' (explicit
        # subscriptions, XEP-0060 §6.1; read with the nodes, dropped with them)
        self._subs: dict[JID, dict[str, dict[str, str]]] = {}
        self._ids = itertools.count(1)
        self._prefix = f"pep-{uuid.uuid4().hex[:8]}-"

    @property
    def store(self) -> Any:
        return getattr(self.server.storage, "pep")  # noqa: B009 (declared by SPEC)

    # -- nodes --------------------------------------------------------------------------------

    async def nodes(self, owner: JID) -> dict[str, dict[str, Any]]:
        nodes = self._nodes.get(owner)
        if nodes is None:
            assert owner.local is not None
            stored = await self.store.nodes(owner.local, owner.domain)
            subs = await self.store.subscriptions(owner.local, owner.domain)
            cached = self._nodes.get(owner)
            if cached is not None:
                return cached  # read meanwhile by another call, and maybe changed since
            nodes = {name: engine.node_config(config) for name, config in stored.items()}
            if len(self._nodes) >= _CACHE_SIZE:
                self._nodes.clear()
                self._subs.clear()
            self._nodes[owner] = nodes
            self._subs[owner] = subs
        return nodes

    async def subscriptions(self, owner: JID, node: str) -> dict[str, str]:
        """The explicit subscriptions to one of the owner's nodes: JID -> state."""
        await self.nodes(owner)
        return self._subs.setdefault(owner, {}).setdefault(node, {})

    def _forget(self, owner: JID) -> None:
        self._nodes.pop(owner, None)
        self._subs.pop(owner, None)

    async def _node(self, owner: JID, node: str) -> dict[str, Any]:
        config = (await self.nodes(owner)).get(node)
        if config is None:
            raise PubsubError("item-not-found", text=f"no node {node!r}")
        return config

    async def _create(self, owner: JID, node: str, options: dict[str, Any]) -> dict[str, Any]:
        nodes = await self.nodes(owner)
        if len(nodes) >= self.config.max_nodes:
            raise PubsubError("not-allowed", "max-nodes-exceeded",
                              f"an account has at most {self.config.max_nodes} nodes")
        config = engine.node_config(options)
        assert owner.local is not None
        if not await self.store.create_node(owner.local, owner.domain, node, config):
            self._forget(owner)  # created meanwhile (another server process)
            raise PubsubError("conflict", text=f"node {node!r} exists")
        nodes[node] = config
        log.info("event=pep-node-created jid=%s node=%s", owner, node)
        return config

    def _limit(self, config: dict[str, Any]) -> int:
        return engine.max_items(config, self.config.max_items)

    # -- who asks -----------------------------------------------------------------------------

    @staticmethod
    def _requester(stanza: Stanza, origin: Session | None) -> JID:
        sender = stanza.get("from")
        if origin is not None and sender is None:
            return origin.jid
        try:
            return JID.parse(sender or "")
        except InvalidJID:
            raise StanzaError("jid-malformed") from None

    @staticmethod
    def _owner(stanza: Stanza, origin: Session | None) -> JID:
        to = stanza.get("to")
        if to is not None:
            return JID.parse(to).bare
        assert origin is not None
        return origin.jid.bare

    async def _facts(self, owner: JID, who: JID, node: str | None = None) -> dict[str, bool]:
        bare = who.bare
        if bare == owner:
            return {"owner": True, "subscriber": True, "in_roster": True, "approved": True}
        roster = await self.server.rosters.get(owner)
        item = roster.items.get(str(bare))
        denied = self.server.access.denied(owner, bare)
        approved = False
        in_roster = not denied and item is not None and item.listed
        if node is not None and not denied:
            subs = await self.subscriptions(owner, node)
            approved = "subscribed" in (subs.get(str(who)), subs.get(str(bare)))
            groups = (await self.nodes(owner)).get(node, {}).get("roster_groups_allowed")
            if groups and item is not None:  # §4.5 roster: in one of these groups
                in_roster = in_roster and bool(set(groups) & set(item.groups))
        return {"owner": False, "subscriber": not denied and is_subscriber(state_of(item)),
                "in_roster": in_roster, "approved": approved}

    # -- the protocol -------------------------------------------------------------------------

    @iq_get(PUBSUB, "pubsub", to=("self", "bare"))
    async def get_pubsub(self, stanza: Stanza, origin: Session | None) -> Stanza:
        return await self._answer(stanza, origin, self._get)

    @iq_set(PUBSUB, "pubsub", to=("self", "bare"))
    async def set_pubsub(self, stanza: Stanza, origin: Session | None) -> Stanza:
        return await self._answer(stanza, origin, self._set)

    @iq_get(OWNER, "pubsub", to=("self", "bare"))
    async def get_owner(self, stanza: Stanza, origin: Session | None) -> Stanza:
        return await self._answer(stanza, origin, self._owner_get)

    @iq_set(OWNER, "pubsub", to=("self", "bare"))
    async def set_owner(self, stanza: Stanza, origin: Session | None) -> Stanza:
        return await self._answer(stanza, origin, self._owner_set)

    async def _answer(self, stanza: Stanza, origin: Session | None, handle: Any) -> Stanza:
        request = st.payload(stanza)
        assert request is not None
        actions = [c for c in request if isinstance(c.tag, str)]
        owner = self._owner(stanza, origin)
        try:
            if not actions:
                raise PubsubError("bad-request", text="the pubsub element needs an action")
            # The owner's own bound session proves the account (no storage read per publish).
            own = origin is not None and origin.local_client and origin.jid.bare == owner
            if owner.local is None or not (own or await self.server.storage.accounts.exists(
                    owner.local, owner.domain)):
                raise StanzaError("service-unavailable")
            reply: Stanza = await handle(stanza, origin, owner, self._requester(stanza, origin),
                                         actions)
            return reply
        except StanzaError as err:
            return engine.error_reply(stanza, err)

    async def _get(self, stanza: Stanza, _origin: Session | None, owner: JID, who: JID,
                   actions: list[Stanza]) -> Stanza:
        action = actions[0]
        name = etree.QName(action).localname
        if name == "items":
            return st.result(stanza, await self._items(owner, who, action))
        if name == "default":
            return st.result(stanza, self._default_reply(PUBSUB))
        if name == "subscriptions":
            return st.result(stanza, await self._own_subscriptions(owner, who, action))
        if name == "affiliations":
            return st.result(stanza, await self._own_affiliations(owner, who, action))
        raise engine.unsupported({"options": "subscription-options"}.get(name, name))

    async def _set(self, stanza: Stanza, _origin: Session | None, owner: JID, who: JID,
                   actions: list[Stanza]) -> Stanza:
        action = actions[0]
        name = etree.QName(action).localname
        if name == "subscribe":
            return st.result(stanza, await self._subscribe(owner, who, action))
        if name == "unsubscribe":
            jid = await self._unsubscribe(owner, who, action)
            # §6.2.2: the result MAY say the subscription is now 'none' (Prosody's does).
            return st.result(stanza, engine.subscription_reply(action.get("node", ""), jid,
                                                               "none"))
        if name == "options":
            raise engine.unsupported("subscription-options")
        if who.bare != owner:  # XEP-0163 §2.2: one publisher per node, whatever publish_model
            raise PubsubError("forbidden", text="only the account publishes to its own nodes")
        if name == "publish":
            options = next((c for c in actions[1:]
                            if c.tag == ns.q(PUBSUB, "publish-options")), None)
            return st.result(stanza, await self._publish(owner, who, action, options))
        if name == "retract":
            await self._retract(owner, action)
            return st.result(stanza)
        if name == "create":
            node = action.get("node")
            if not node:
                raise engine.unsupported("instant-nodes")
            engine.checked_node(node)
            configure = next((c for c in actions[1:] if c.tag == ns.q(PUBSUB, "configure")),
                             None)
            form = configure.find(engine.X) if configure is not None else None
            await self._create(owner, node, engine.form_values(form, engine.NODE_CONFIG))
            return st.result(stanza)
        raise PubsubError("bad-request", text=f"unknown pubsub action <{name}/>")

    async def _owner_get(self, stanza: Stanza, _origin: Session | None, owner: JID, who: JID,
                         actions: list[Stanza]) -> Stanza:
        if who.bare != owner:
            raise PubsubError("forbidden", text="only the owner configures its nodes")
        action = actions[0]
        name = etree.QName(action).localname
        if name == "configure":
            node = engine.node_attr(action)
            config = await self._node(owner, node)
            reply = st.element(ns.q(OWNER, "pubsub"))
            st.child(reply, ns.q(OWNER, "configure"), {"node": node}).append(
                engine.config_form(config, max_items=self.config.max_items))
            return st.result(stanza, reply)
        if name == "default":
            return st.result(stanza, self._default_reply(OWNER))
        if name == "subscriptions":
            node = engine.node_attr(action)
            await self._node(owner, node)
            reply = st.element(ns.q(OWNER, "pubsub"))
            holder = st.child(reply, ns.q(OWNER, "subscriptions"), {"node": node})
            for jid, state in sorted((await self.subscriptions(owner, node)).items()):
                holder.append(engine.subscription_element(OWNER, node, jid, state))
                holder[-1].attrib.pop("node")  # §8.8.1: the node is named once, above
            return st.result(stanza, reply)
        raise engine.unsupported({"affiliations": "modify-affiliations"}.get(name, name))

    async def _owner_set(self, stanza: Stanza, _origin: Session | None, owner: JID, who: JID,
                         actions: list[Stanza]) -> Stanza:
        if who.bare != owner:
            raise PubsubError("forbidden", text="only the owner manages its nodes")
        action = actions[0]
        name = etree.QName(action).localname
        node = engine.node_attr(action)
        config = await self._node(owner, node)
        assert owner.local is not None
        if name == "configure":
            form = action.find(engine.X)
            if form is None:
                raise PubsubError("bad-request", text="configure needs a form")
            if form.get("type") == "cancel":
                return st.result(stanza)
            changed = dict(config)
            changed.update(engine.form_values(form, engine.NODE_CONFIG))
            await self.store.set_config(owner.local, owner.domain, node, changed)
            (await self.nodes(owner))[node] = changed
            await self.store.trim(owner.local, owner.domain, node, self._limit(changed))
            return st.result(stanza)
        if name == "delete":
            redirect = action.find(ns.q(OWNER, "redirect"))
            await self.store.delete_node(owner.local, owner.domain, node)
            (await self.nodes(owner)).pop(node, None)
            if config.get("notify_delete", True):  # to its subscribers, before they go too
                await self._notify(owner, node, config, engine.node_event(
                    "delete", node, redirect.get("uri") if redirect is not None else None))
            self._subs.get(owner, {}).pop(node, None)
            return st.result(stanza)
        if name == "subscriptions":
            await self._manage_subscriptions(owner, node, action)
            return st.result(stanza)
        if name == "purge":
            await self.store.purge(owner.local, owner.domain, node)
            await self._notify(owner, node, config, engine.node_event("purge", node))
            return st.result(stanza)
        raise engine.unsupported({"affiliations": "modify-affiliations"}.get(name, name))

    def _default_reply(self, namespace: str) -> Stanza:
        reply = st.element(ns.q(namespace, "pubsub"))
        st.child(reply, ns.q(namespace, "default")).append(
            engine.config_form(engine.node_config(), max_items=self.config.max_items))
        return reply

    # -- publish, retrieve, retract ---------------------------------------------------------

    async def _publish(self, owner: JID, who: JID, publish: Stanza,
                       options_el: Stanza | None) -> Stanza:
        node = engine.node_attr(publish)
        items = publish.findall(ns.q(PUBSUB, "item"))
        if not items:
            raise PubsubError("bad-request", "item-required", "publish one item")
        if len(items) > 1:
            raise PubsubError("bad-request", "invalid-payload", "publish one item at a time")
        item = items[0]
        payloads = [c for c in item if isinstance(c.tag, str)]
        if len(payloads) > 1:
            raise PubsubError("bad-request", "invalid-payload", "an item has one payload")
        form = options_el.find(engine.X) if options_el is not None else None
        options = engine.publish_options(form)
        item_id = engine.checked_item_id(item.get("id") or "") or None
        item_id = await self.publish_item(owner, node, item_id, payloads, options)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        done = st.child(reply, ns.q(PUBSUB, "publish"), {"node": node})
        st.child(done, ns.q(PUBSUB, "item"), {"id": item_id})
        return reply

    async def publish_item(self, owner: JID, node: str, item_id: str | None,
                           payloads: list[Stanza], options: dict[str, Any], *,
                           preconditions: bool = True) -> str:
        """Publish one item as the owner, with notifications; its id. For the protocol, and
        for the server's own conversions (XEP-0402 bookmarks from private XML, XEP-0398
        avatars from the vCard), which create the node with `options` if need be but do
        not hold an existing node to them (preconditions=False)."""
        config = (await self.nodes(owner)).get(node)
        if config is None:
            # XEP-0163 §3: auto-create, once the item is known to be acceptable.
            engine.item_payload(payloads, engine.node_config(options),
                                self.config.max_payload_size)
            config = await self._create(owner, node, options)
        elif preconditions:
            unmet = engine.unmet_preconditions(config, options)
            if unmet:
                raise engine.precondition_error(unmet)
        payload, text = engine.item_payload(payloads, config, self.config.max_payload_size)
        item_id = item_id or uuid.uuid4().hex
        if config["persist_items"]:
            assert owner.local is not None
            await self.store.publish(owner.local, owner.domain, node,
                                     StoredItem(item_id, str(owner), text),
                                     self._limit(config))
        if config["deliver_notifications"]:
            shown = payload if config["deliver_payloads"] else None
            event = engine.items_event(node, [engine.item_element(EVENT, item_id, shown,
                                                                  _publisher(config, owner))])
            await self._notify(owner, node, config, event)
        # Other modules follow some nodes (vcard.py: XEP-0398 avatars).
        for pending in self.server.hooks.fire_all("pep/published", owner, node, item_id,
                                                  payload):
            await pending
        return item_id

    async def stored_items(self, owner: JID, node: str) -> list[tuple[str, Stanza | None]]:
        """The node's items (id, payload), oldest first; none when there is no such node."""
        if node not in await self.nodes(owner):
            return []
        assert owner.local is not None
        return [(one.id, engine.parse_stored(one.payload))
                for one in await self.store.items(owner.local, owner.domain, node)]

    async def has_node(self, owner: JID, node: str) -> bool:
        return node in await self.nodes(owner)

    async def _items(self, owner: JID, who: JID, request: Stanza) -> Stanza:
        node = engine.node_attr(request)
        config = await self._node(owner, node)
        engine.check_access(config, **await self._facts(owner, who, node))
        ids, limit = engine.items_request(request)
        assert owner.local is not None
        stored = await self.store.items(owner.local, owner.domain, node,
                                        ids=ids or None, max_items=limit)
        if ids and not stored:
            raise PubsubError("item-not-found", text="no such item")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "items"), {"node": node})
        for one in stored:
            holder.append(engine.item_element(PUBSUB, one.id, engine.parse_stored(one.payload),
                                              one.publisher))
        return reply

    async def _retract(self, owner: JID, retract: Stanza) -> None:
        node = engine.node_attr(retract)
        await self._node(owner, node)
        item = retract.find(ns.q(PUBSUB, "item"))
        if item is None or not item.get("id"):
            raise PubsubError("bad-request", "item-required", "retract names an item id")
        item_id = engine.checked_item_id(item.get("id", ""))
        if not await self.retract_item(owner, node, item_id,
                                       retract.get("notify") in ("1", "true")):
            raise PubsubError("item-not-found", text=f"no item {item_id!r}")

    async def retract_item(self, owner: JID, node: str, item_id: str,
                           notify: bool = False) -> bool:
        """Retract an item (notified when asked or when the node says notify_retract); False
        when there was none."""
        config = (await self.nodes(owner)).get(node)
        assert owner.local is not None
        if config is None or not await self.store.retract(owner.local, owner.domain, node,
                                                          item_id):
            return False
        if notify or config["notify_retract"]:
            await self._notify(owner, node, config, engine.retract_event(node, item_id))
        return True

    # -- explicit subscriptions (XEP-0060 §6.1, §6.2, §5.6, §8.6, §8.8 on PEP nodes) ----------

    async def _subscribe(self, owner: JID, who: JID, action: Stanza) -> Stanza:
        node = engine.node_attr(action)
        jid = _jid_attr(action)
        if jid.bare != who.bare:  # §6.1.3.1: one subscribes one's own (bare or full) JID
            raise PubsubError("bad-request", "invalid-jid", "subscribe your own JID")
        config = await self._node(owner, node)
        facts = await self._facts(owner, who, node)
        subs = await self.subscriptions(owner, node)
        if config["access_model"] == "authorize" and not facts["owner"]:
            # §6.1.2.2 / §8.6.1: pending until the owner approves.
            state = "subscribed" if subs.get(str(jid)) == "subscribed" else "pending"
        else:
            engine.check_access(config, **facts)  # §6.1.3.2-§6.1.3.4
            state = "subscribed"
        await self._set_subscription(owner, node, jid, state)
        if state == "pending":
            request = engine.authorization_request(str(owner), node, str(jid))
            self.server.router.spawn(self._send(str(owner), request))
        else:
            self.server.router.spawn(self._send_last(jid, owner, node, config, on_sub=True))
        return engine.subscription_reply(node, str(jid), state)

    async def _set_subscription(self, owner: JID, node: str, jid: JID, state: str) -> None:
        account = None
        if jid.local is not None and jid.domain in self.server.hosts:
            account = (jid.local, jid.domain)
        assert owner.local is not None
        try:
            await self.store.set_subscription(owner.local, owner.domain, node, str(jid), state,
                                              account)
        except NoSuchAccount:
            raise PubsubError("bad-request", "invalid-jid", f"no account {jid}") from None
        (await self.subscriptions(owner, node))[str(jid)] = state

    async def _remove_subscription(self, owner: JID, node: str, jid: str) -> bool:
        assert owner.local is not None
        subs = await self.subscriptions(owner, node)
        if subs.pop(jid, None) is None:
            return False
        await self.store.remove_subscription(owner.local, owner.domain, node, jid)
        return True

    async def _unsubscribe(self, owner: JID, who: JID, action: Stanza) -> str:
        node = engine.node_attr(action)
        jid = _jid_attr(action)
        await self._node(owner, node)
        if jid.bare != who.bare and who.bare != owner:
            raise PubsubError("forbidden", text="unsubscribe your own JID")  # §6.2.3.3
        if not await self._remove_subscription(owner, node, str(jid)):
            raise PubsubError("unexpected-request", "not-subscribed",
                              "no such subscription")  # §6.2.3.2
        return str(jid)

    async def _own_subscriptions(self, owner: JID, who: JID, action: Stanza) -> Stanza:
        """§5.6: the requester's subscriptions to this account's nodes (of one node, if named)."""
        only = action.get("node")
        nodes = await self.nodes(owner)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "subscriptions"), {"node": only} if only else {})
        for name in sorted(nodes):
            if only is not None and name != only:
                continue
            for jid, state in sorted((await self.subscriptions(owner, name)).items()):
                if JID.parse(jid).bare == who.bare:
                    holder.append(engine.subscription_element(PUBSUB, name, jid, state))
        return reply

    async def _own_affiliations(self, owner: JID, who: JID, action: Stanza) -> Stanza:
        """§5.7: the owner owns every node of its account; nobody else is affiliated."""
        only = action.get("node")
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        holder = st.child(reply, ns.q(PUBSUB, "affiliations"), {"node": only} if only else {})
        if who.bare == owner:
            for name in sorted(await self.nodes(owner)):
                if only is None or name == only:
                    st.child(holder, ns.q(PUBSUB, "affiliation"),
                             {"node": name, "affiliation": "owner"})
        return reply

    async def _manage_subscriptions(self, owner: JID, node: str, action: Stanza) -> None:
        """§8.8.2: the owner sets subscriptions ('none' removes one); each subscriber whose
        state changed is told (§8.8.4)."""
        changes = []
        for entry in action.findall(ns.q(OWNER, "subscription")):
            jid = _jid_attr(entry)
            state = entry.get("subscription")
            if state not in ("none", "subscribed", "pending"):
                raise PubsubError("bad-request", text=f"unknown subscription state {state!r}")
            changes.append((jid, state))
        config = await self._node(owner, node)
        for jid, state in changes:
            await self._change_subscription(owner, node, config, jid, state)

    async def _change_subscription(self, owner: JID, node: str, config: dict[str, Any],
                                   jid: JID, state: str) -> None:
        before = (await self.subscriptions(owner, node)).get(str(jid), "none")
        if state == before:
            return
        if state == "none":
            await self._remove_subscription(owner, node, str(jid))
        else:
            await self._set_subscription(owner, node, jid, state)
        message = engine.event_message(str(owner), engine.subscription_event(node, str(jid),
                                                                              state))
        await self._send(str(jid), message)
        if state == "subscribed":
            await self._send_last(jid, owner, node, config, on_sub=True)

    @hook("message/bare", priority=10)
    def authorization(self, stanza: Stanza, origin: Session | None, to: JID) -> object:
        """§8.6.2: the owner's answer to an authorization request, sent to its own PEP
        service (its bare JID)."""
        if origin is None or origin.jid.bare != to or stanza.find(engine.X) is None:
            return None
        answer = engine.authorization_answer(stanza)
        if answer is None:
            return None
        return self._authorize(to, *answer)

    async def _authorize(self, owner: JID, node: str, jid: str, allowed: bool | None) -> None:
        config = (await self.nodes(owner)).get(node)
        if config is None or allowed is None:
            return
        if (await self.subscriptions(owner, node)).get(jid) != "pending":
            return  # answered already, or never asked
        try:
            subscriber = JID.parse(jid)
        except InvalidJID:
            return
        await self._change_subscription(owner, node, config, subscriber,
                                        "subscribed" if allowed else "none")

    # -- notifications ----------------------------------------------------------------------

    async def _notify(self, owner: JID, node: str, config: dict[str, Any],
                      event: Stanza) -> None:
        """XEP-0163 §4.3: the owner's available resources, and the contacts' resources that
        may see the node and asked for <node>+notify."""
        sessions = self.server.sessions
        targets = [s.jid_str for s in sessions.resources(owner) if s.presence is not None]
        caps = self._caps
        if caps is not None and config["access_model"] in ("open", "presence", "roster"):
            # authorize: approved subscribers only
            roster = await self.server.rosters.get(owner)
            interest = node + "+notify"
            for contact, item in roster.items.items():
                if not is_subscriber(state_of(item)):
                    continue  # only those who see the owner's presence know it is there
                try:
                    jid = JID.parse(contact)
                except InvalidJID:
                    continue
                if self.server.access.denied(owner, jid):
                    continue
                if jid.domain in self.server.hosts:
                    targets += [s.jid_str for s in sessions.resources(jid)
                                if s.presence is not None and caps.wants(s, interest)]
                else:  # on another server: the resources whose presence we saw
                    targets += caps.remote_wanting(jid, interest)
        # XEP-0060 §7.1.2.1: explicit subscribers that may (still) see the node; a bare JID's
        # subscription covers its resources (the router delivers a headline to each).
        for subscriber, state in self._subs.get(owner, {}).get(node, {}).items():
            if state != "subscribed":
                continue
            jid = JID.parse(subscriber)
            if jid.bare == owner or subscriber in targets:
                continue  # the owner's resources have it already
            if not engine.may_access(config, **await self._facts(owner, jid, node)):
                continue
            if jid.resource is None:
                targets = [t for t in targets if not t.startswith(subscriber + "/")]
            targets.append(subscriber)
        message = engine.event_message(str(owner), event, config["notification_type"])
        for target in targets:
            await self._send(target, message)

    async def _send(self, target: str, message: Stanza) -> None:
        """Routed, not written to a session directly: the recipient's filters (blocking,
        XEP-0191; CSI) apply as to any message, and remote contacts get it by federation."""
        copied = copy.deepcopy(message)
        copied.set("to", target)
        copied.set("id", f"{self._prefix}{next(self._ids)}")
        pending = self.server.router.route(copied, None)
        if pending is not None:
            await pending

    # -- the last items, when a resource's capabilities are known (caps.py) ----------------

    @property
    def _caps(self) -> EntityCaps | None:
        caps = self.server.modules.get("caps")
        return caps if isinstance(caps, EntityCaps) else None

    @hook("caps/known")
    def caps_known(self, session: Session, _features: frozenset[str]) -> Awaitable[None]:
        """XEP-0163 §4.3.2: the last items, once the presence went out with caps known."""
        return self._send_last_items(session)

    @hook("caps/remote-known")
    def remote_caps_known(self, user: JID, sender: JID,
                          features: frozenset[str]) -> Awaitable[None]:
        return self._send_last_of(sender, user, features)  # the user's own nodes

    async def _send_last_items(self, session: Session) -> None:
        """XEP-0163 §4.3.2 (send_last_published_item = on_sub_and_presence): the newest item
        of each node the resource is interested in, of its own account and of the contacts
        whose presence it is subscribed to."""
        caps = self._caps
        features = caps.known_features(session) if caps is not None else None
        if not features:
            return
        user = session.jid.bare
        owners = [user]
        roster = await self.server.rosters.get(user)
        for contact, item in roster.items.items():
            state = state_of(item)
            if state is not None and state.to:
                try:
                    jid = JID.parse(contact)
                except InvalidJID:
                    continue
                if jid.domain in self.server.hosts and jid.local is not None:
                    owners.append(jid)
        for owner in owners:
            await self._send_last_of(session.jid, owner, features)

    async def _send_last_of(self, target: JID, owner: JID, features: Iterable[str]) -> None:
        wanted = {f[:-len("+notify")] for f in features if f.endswith("+notify")}
        nodes = await self.nodes(owner)
        for node, config in list(nodes.items()):
            if node in wanted:
                await self._send_last(target, owner, node, config)

    async def _send_last(self, target: JID, owner: JID, node: str, config: dict[str, Any],
                         on_sub: bool = False) -> None:
        """The node's newest item to one entity that may see it: on presence (XEP-0163
        §4.3.2) when send_last_published_item is on_sub_and_presence, on a new subscription
        (XEP-0060 §6.1.7) when it is on_sub too."""
        when = config["send_last_published_item"]
        if when == "never" or (when == "on_sub" and not on_sub):
            return
        if not engine.may_access(config, **await self._facts(owner, target, node)):
            return
        assert owner.local is not None
        last = await self.store.items(owner.local, owner.domain, node, max_items=1)
        if not last:
            return
        shown = engine.parse_stored(last[0].payload) if config["deliver_payloads"] else None
        event = engine.items_event(node, [engine.item_element(EVENT, last[0].id, shown,
                                                              _publisher(config, owner))])
        await self._send(str(target), engine.event_message(str(owner), event,
                                                           config["notification_type"]))

    # -- discovery ----------------------------------------------------------------------------

    @hook("disco/account-info")
    def account_features(self, query: Stanza, _stanza: Stanza,
                         _origin: Session | None) -> None:
        """XEP-0163 §6.1: the account is a PEP service."""
        st.child(query, ns.q(ns.DISCO_INFO, "identity"), {"category": "pubsub", "type": "pep"})
        for feature in FEATURES:
            st.child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})

    @iq_get(ns.DISCO_ITEMS, "query", to=("self",))
    async def own_items(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """XEP-0060 §5.2/§5.5 on the owner's own account: its nodes, or a node's item ids
        (others' disco#items of the account go to the disco module)."""
        owner = self._owner(stanza, origin)
        query = st.payload(stanza)
        assert query is not None and owner.local is not None
        node = query.get("node")
        nodes = await self.nodes(owner)
        reply = st.element(ns.q(ns.DISCO_ITEMS, "query"), {"node": node} if node else None)
        if node is None:
            for name, config in sorted(nodes.items()):
                attrs = {"jid": str(owner), "node": name}
                if config.get("title"):
                    attrs["name"] = config["title"]
                st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), attrs)
        elif node in nodes:
            for item in await self.store.items(owner.local, owner.domain, node):
                st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), {"jid": str(owner),
                                                               "name": item.id})
        else:
            return engine.error_reply(stanza, PubsubError("item-not-found", text="no such node"))
        return st.result(stanza, reply)

    @hook("session-bound")
    def bound(self, session: Session) -> None:
        # A login reads the account's nodes afresh (it may have been deleted and made again
        # meanwhile, by the CLI in another process).
        if not self.server.sessions.resources(session.jid.bare)[1:]:
            self._forget(session.jid.bare)

    @hook("session-closed")
    def closed(self, session: Session, _reason: str) -> None:
        if not self.server.sessions.resources(session.jid.bare):
            self._forget(session.jid.bare)


def _jid_attr(element: Stanza) -> JID:
    """The 'jid' of a subscribe, unsubscribe or subscription element (§6.1.3.1 invalid-jid)."""
    try:
        return JID.parse(element.get("jid") or "")
    except InvalidJID:
        raise PubsubError("bad-request", "invalid-jid", "not a valid JID") from None


def _publisher(config: dict[str, Any], owner: JID) -> str | None:
    """The 'publisher' of an event's items: the owner (the one publisher of a PEP node) when
    pubsub#itemreply asks for it, else none (Prosody's default, what its tests expect)."""
    return str(owner) if config.get("itemreply") in ("owner", "publisher") else None
