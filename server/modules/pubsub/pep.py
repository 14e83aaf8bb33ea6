"""Personal Eventing Protocol (XEP-0163): every account is a pubsub service at its bare JID,
on the engine of engine.py, its nodes and items in the ``pep`` store (both backends).

- publish (auto-create; item ids, overwrite by id; publish-options as preconditions, §7.1.5),
  retrieve items (all, by id, max_items), retract (notify_retract), create, and the owner's
  configure, default, delete (with redirect) and purge;
- access models presence (the default: subscribers of the owner's presence), open, roster and
  whitelist (only the owner);
- notifications, as <message type='headline'> from the bare JID, to the owner's available
  resources and to the available resources of contacts allowed to see the node whose XEP-0115
  capabilities include ``<node>+notify``. Capabilities are cached by their ``ver``: the first
  resource with an unknown one is asked once with disco#info, the answer's hash is verified
  (XEP-0115 §5) and kept; an unverifiable answer serves that resource only;
- the last item of each node to a resource that becomes available (or changes capabilities);
- contacts on other servers: the presence their resources send our users says which are
  available with which caps (asked over s2s from the user's bare JID), and notifications go to
  them by federation.

    [pep]
    max_items = 256          # items a node keeps at most (pubsub#max_items = max)
    max_nodes = 64           # nodes per account
    max_payload_size = 65536 # bytes of one item's payload
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.config import int_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, SessionSlot, Stanza, hook, iq_get, iq_set
from server.modules.pubsub import engine
from server.modules.pubsub.engine import EVENT, OWNER, PUBSUB, PubsubError
from server.presence.subscription import is_subscriber
from server.roster import state_of
from server.sessions import Session
from server.storage.pubsub import SPEC, StoredItem
from server.xml import ns
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.pep")

_CAPS = ns.q(engine.CAPS, "c")
_INFO = ns.q(ns.DISCO_INFO, "query")
_CAPS_TIMEOUT = 10.0
_CACHE_SIZE = 10000
FEATURES = (PUBSUB, *(f"{PUBSUB}#{f}" for f in (
    "access-open", "access-presence", "access-roster", "access-whitelist", "auto-create",
    "config-node", "create-nodes", "delete-items", "delete-nodes", "filtered-notifications",
    "item-ids", "last-published", "persistent-items", "publish", "publish-options",
    "purge-nodes", "retract-items", "retrieve-default", "retrieve-items")))


@dataclass(frozen=True, slots=True, kw_only=True)
class PepSettings:
    max_items: int = field(metadata=int_option(1, 100000, 256))
    max_nodes: int = field(metadata=int_option(1, 100000, 64))
    max_payload_size: int = field(metadata=int_option(256, 1 << 24, 65536))


@dataclass(slots=True)
class Caps:
    """What a resource's presence says about its capabilities."""
    ver: str | None
    features: frozenset[str] | None  # None: not known (yet)


class Pep(Module):
    name = "pep"
    settings = PepSettings
    stores = (SPEC,)

    caps = SessionSlot[Caps | None](None)

    def __init__(self, server: Server, config: PepSettings) -> None:
        super().__init__(server, config)
        # owner bare JID -> node -> configuration (the whole account's nodes, once read)
        self._nodes: dict[JID, dict[str, dict[str, Any]]] = {}
        self._known: dict[str, frozenset[str]] = {}           # verified ver -> features
        self._asking: dict[str, asyncio.Future[Stanza]] = {}  # iq id -> its answer
        self._asked: dict[str, asyncio.Future[frozenset[str] | None]] = {}  # ver -> lookup
        # remote bare JID -> its available resources (full JID) -> their caps
        self._remote: dict[JID, dict[str, Caps]] = {}
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
            nodes = {name: engine.node_config(config) for name, config in stored.items()}
            if len(self._nodes) >= _CACHE_SIZE:
                self._nodes.clear()
            self._nodes[owner] = nodes
        return nodes

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
            self._nodes.pop(owner, None)  # created meanwhile (another server process)
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

    async def _facts(self, owner: JID, who: JID) -> dict[str, bool]:
        bare = who.bare
        if bare == owner:
            return {"owner": True, "subscriber": True, "in_roster": True}
        roster = await self.server.rosters.get(owner)
        item = roster.items.get(str(bare))
        denied = self.server.access.denied(owner, bare)
        return {"owner": False, "subscriber": not denied and is_subscriber(state_of(item)),
                "in_roster": not denied and item is not None}

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
            if owner.local is None or not await self.server.storage.accounts.exists(
                    owner.local, owner.domain):
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
        raise engine.unsupported({"subscriptions": "retrieve-subscriptions",
                                  "affiliations": "retrieve-affiliations",
                                  "options": "subscription-options"}.get(name, name))

    async def _set(self, stanza: Stanza, _origin: Session | None, owner: JID, who: JID,
                   actions: list[Stanza]) -> Stanza:
        action = actions[0]
        name = etree.QName(action).localname
        if name in ("subscribe", "unsubscribe", "options"):
            raise engine.unsupported("subscribe")
        if who.bare != owner:
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
                engine.config_form(config))
            return st.result(stanza, reply)
        if name == "default":
            return st.result(stanza, self._default_reply(OWNER))
        raise engine.unsupported({"subscriptions": "manage-subscriptions",
                                  "affiliations": "modify-affiliations"}.get(name, name))

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
            if config.get("notify_delete", True):
                await self._notify(owner, node, config, engine.node_event(
                    "delete", node, redirect.get("uri") if redirect is not None else None))
            return st.result(stanza)
        if name == "purge":
            await self.store.purge(owner.local, owner.domain, node)
            await self._notify(owner, node, config, engine.node_event("purge", node))
            return st.result(stanza)
        raise engine.unsupported({"subscriptions": "manage-subscriptions",
                                  "affiliations": "modify-affiliations"}.get(name, name))

    def _default_reply(self, namespace: str) -> Stanza:
        reply = st.element(ns.q(namespace, "pubsub"))
        st.child(reply, ns.q(namespace, "default")).append(
            engine.config_form(engine.node_config()))
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
        options = engine.form_values(form, engine.PUBLISH_OPTIONS)
        config = (await self.nodes(owner)).get(node)
        if config is None:
            config = await self._create(owner, node, options)  # XEP-0163 §3: auto-create
        else:
            unmet = engine.unmet_preconditions(config, options)
            if unmet:
                raise PubsubError("conflict", "precondition-not-met",
                                  f"the node's configuration differs: {', '.join(unmet)}")
        payload, text = engine.item_payload(payloads, config, self.config.max_payload_size)
        item_id = item.get("id") or uuid.uuid4().hex
        if config["persist_items"]:
            assert owner.local is not None
            await self.store.publish(owner.local, owner.domain, node,
                                     StoredItem(item_id, str(who.bare), text),
                                     self._limit(config))
        if config["deliver_notifications"]:
            shown = payload if config["deliver_payloads"] else None
            event = engine.items_event(node, [engine.item_element(EVENT, item_id, shown,
                                                                  str(who.bare))])
            await self._notify(owner, node, config, event)
        reply = st.element(ns.q(PUBSUB, "pubsub"))
        done = st.child(reply, ns.q(PUBSUB, "publish"), {"node": node})
        st.child(done, ns.q(PUBSUB, "item"), {"id": item_id})
        return reply

    async def _items(self, owner: JID, who: JID, request: Stanza) -> Stanza:
        node = engine.node_attr(request)
        config = await self._node(owner, node)
        engine.check_access(config, **await self._facts(owner, who))
        ids = [i.get("id") or "" for i in request.findall(ns.q(PUBSUB, "item"))]
        limit = None
        if request.get("max_items") is not None:
            try:
                limit = int(request.get("max_items", ""))
            except ValueError:
                raise PubsubError("bad-request", text="max_items is a number") from None
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
        config = await self._node(owner, node)
        item = retract.find(ns.q(PUBSUB, "item"))
        if item is None or not item.get("id"):
            raise PubsubError("bad-request", "item-required", "retract names an item id")
        item_id = item.get("id", "")
        assert owner.local is not None
        if not await self.store.retract(owner.local, owner.domain, node, item_id):
            raise PubsubError("item-not-found", text=f"no item {item_id!r}")
        if retract.get("notify") in ("1", "true") or config["notify_retract"]:
            await self._notify(owner, node, config, engine.retract_event(node, item_id))

    # -- notifications ----------------------------------------------------------------------

    async def _notify(self, owner: JID, node: str, config: dict[str, Any],
                      event: Stanza) -> None:
        """XEP-0163 §4.3: the owner's available resources, and the contacts' resources that
        may see the node and asked for <node>+notify."""
        sessions = self.server.sessions
        targets = [s.jid_str for s in sessions.resources(owner) if s.presence is not None]
        if config["access_model"] != "whitelist":
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
                                if s.presence is not None and self.wants(s, interest)]
                else:  # on another server: the resources whose presence we saw
                    targets += [full for full, caps in self._remote.get(jid, {}).items()
                                if caps.features is not None and interest in caps.features]
        message = engine.event_message(str(owner), event, config["notification_type"])
        for target in targets:
            await self._send(target, message)

    def wants(self, session: Session, interest: str) -> bool:
        caps = self.caps.get(session)
        return caps is not None and caps.features is not None and interest in caps.features

    async def _send(self, target: str, message: Stanza) -> None:
        """Routed, not written to a session directly: the recipient's filters (blocking,
        XEP-0191; CSI) apply as to any message, and remote contacts get it by federation."""
        copied = copy.deepcopy(message)
        copied.set("to", target)
        copied.set("id", f"{self._prefix}{next(self._ids)}")
        pending = self.server.router.route(copied, None)
        if pending is not None:
            await pending

    # -- entity capabilities and the last items ----------------------------------------------

    @hook("presence/available")
    def available(self, session: Session, first: bool) -> None:
        presence = session.presence
        c = presence.find(_CAPS) if presence is not None else None
        ver = c.get("ver") if c is not None else None
        old = self.caps.get(session)
        if not first and old is not None and old.ver == ver:
            return None
        if ver is None:
            self.caps.set(session, Caps(None, frozenset()))
            return None
        assert c is not None
        known = self._known.get(ver)
        self.caps.set(session, Caps(ver, known))
        if known is not None:
            self.server.router.spawn(self._send_last_items(session))
        else:
            self.server.router.spawn(self._discover(session, ver, c.get("hash"),
                                                    c.get("node") or ""))
        return None

    async def _lookup(self, target: str, from_: str, ver: str, algorithm: str | None,
                      node: str) -> frozenset[str] | None:
        """What a caps ver means: asked of the resource once per ver (lookups of the same ver
        meanwhile wait for that answer); kept when its hash verifies (XEP-0115 §5.4)."""
        lookup = self._asked.get(ver)
        if lookup is not None:
            return await lookup
        lookup = asyncio.get_running_loop().create_future()
        self._asked[ver] = lookup
        features = None
        try:
            answer = await self._ask_info(target, from_, f"{node}#{ver}")
            query = answer.find(_INFO) if answer.get("type") == "result" else None
            if query is not None:
                features = engine.features_of(query)
                if algorithm is not None and engine.caps_hash(query, algorithm) == ver:
                    if len(self._known) >= _CACHE_SIZE:
                        self._known.clear()
                    self._known[ver] = features
                else:
                    log.info("event=caps-unverified jid=%s ver=%s", target, ver)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            del self._asked[ver]
            lookup.set_result(features)
        return features

    async def _discover(self, session: Session, ver: str, algorithm: str | None,
                        node: str) -> None:
        # From the account's own bare JID (its PEP service), as Prosody's mod_pep asks.
        features = await self._lookup(session.jid_str, session.bare_str, ver, algorithm, node)
        caps = self.caps.get(session)
        if caps is None or caps.ver != ver:
            return  # the resource changed its presence meanwhile
        self.caps.set(session, Caps(ver, features or frozenset()))
        await self._send_last_items(session)

    async def _ask_info(self, target: str, from_: str, node: str) -> Stanza:
        ident = f"{self._prefix}caps-{next(self._ids)}"
        iq = st.iq("get", to=target, from_=from_, id_=ident)
        st.child(iq, _INFO, {"node": node})
        answer: asyncio.Future[Stanza] = asyncio.get_running_loop().create_future()
        self._asking[ident] = answer
        try:
            pending = self.server.router.route(iq, None)
            if pending is not None:
                await pending
            return await asyncio.wait_for(answer, _CAPS_TIMEOUT)
        finally:
            self._asking.pop(ident, None)

    # -- contacts on other servers: their resources' caps, from the presence they send us ----

    @hook("presence/bare", priority=50)
    @hook("presence/full", priority=50)
    def remote_presence(self, stanza: Stanza, _origin: Session | None, to: JID) -> None:
        """Watch (never consume) presence from remote resources to our users: which of them
        are available, with which caps, so that our PEP services notify them too."""
        try:
            sender = JID.parse(stanza.get("from") or "")
        except InvalidJID:
            return None
        if sender.resource is None or self.server.router.is_local(sender.domain):
            return None
        type_ = stanza.get("type")
        bare = sender.bare
        full = str(sender)
        if type_ == "unavailable":
            resources = self._remote.get(bare)
            if resources is not None:
                resources.pop(full, None)
                if not resources:
                    del self._remote[bare]
            return None
        if type_ is not None:
            return None
        c = stanza.find(_CAPS)
        ver = c.get("ver") if c is not None else None
        resources = self._remote.get(bare)
        if resources is None:
            if len(self._remote) >= _CACHE_SIZE:
                self._remote.clear()
            resources = self._remote[bare] = {}
        old = resources.get(full)
        if old is not None and old.ver == ver:
            return None
        if ver is None or c is None:
            resources[full] = Caps(None, frozenset())
            return None
        known = self._known.get(ver)
        resources[full] = Caps(ver, known)
        self.server.router.spawn(self._discover_remote(to.bare, sender, ver, c.get("hash"),
                                                       c.get("node") or "", known))
        return None

    async def _discover_remote(self, user: JID, sender: JID, ver: str, algorithm: str | None,
                               node: str, known: frozenset[str] | None) -> None:
        features = known
        if features is None:
            features = await self._lookup(str(sender), str(user), ver, algorithm, node)
            caps = self._remote.get(sender.bare, {}).get(str(sender))
            if caps is None or caps.ver != ver:
                return
            caps.features = features or frozenset()
        if features and user.local is not None:
            await self._send_last_of(sender, user, features)  # the user's own nodes

    @hook("iq-response")
    def answered(self, stanza: Stanza, _origin: Session | None, _to: JID) -> object:
        answer = self._asking.get(stanza.get("id", ""))
        if answer is None or answer.done():
            return None
        answer.set_result(st.standalone(stanza))
        return True

    async def _send_last_items(self, session: Session) -> None:
        """XEP-0163 §4.3.2 (send_last_published_item = on_sub_and_presence): the newest item
        of each node the resource is interested in, of its own account and of the contacts
        whose presence it is subscribed to."""
        caps = self.caps.get(session)
        if caps is None or not caps.features:
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
            await self._send_last_of(session.jid, owner, caps.features)

    async def _send_last_of(self, target: JID, owner: JID, features: Iterable[str]) -> None:
        wanted = {f[:-len("+notify")] for f in features if f.endswith("+notify")}
        nodes = await self.nodes(owner)
        candidates = [(n, c) for n, c in nodes.items()
                      if n in wanted and c["send_last_published_item"] == "on_sub_and_presence"]
        if not candidates:
            return
        facts = await self._facts(owner, target)
        assert owner.local is not None
        for node, config in candidates:
            if not engine.may_access(config, **facts):
                continue
            last = await self.store.items(owner.local, owner.domain, node, max_items=1)
            if not last:
                continue
            shown = engine.parse_stored(last[0].payload) if config["deliver_payloads"] else None
            event = engine.items_event(node, [engine.item_element(EVENT, last[0].id, shown,
                                                                  last[0].publisher)])
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
            self._nodes.pop(session.jid.bare, None)

    @hook("session-closed")
    def closed(self, session: Session, _reason: str) -> None:
        if not self.server.sessions.resources(session.jid.bare):
            self._nodes.pop(session.jid.bare, None)
