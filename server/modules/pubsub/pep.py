"""Personal Eventing Protocol (XEP-0163): every account is a pubsub service at its bare JID:
its policy on the one iq front of protocol.py (which has the operations), its nodes, items and
subscriptions in the ``pep`` store (both backends).

- publish (auto-create; item ids, overwrite by id; publish-options as preconditions, §7.1.5),
  retrieve items (all, by id, max_items), retract (notify_retract), create, and the owner's
  configure, default, delete (with redirect) and purge;
- access models presence (the default: subscribers of the owner's presence), open, roster
  (pubsub#roster_groups_allowed), authorize (approved subscribers) and whitelist (the owner);
- explicit subscriptions (XEP-0060 §6.1, XEP-0163 §4) in the store (gone with the node, the
  owner's or the subscriber's account): subscribe (pending on an authorize node: the owner gets
  the §8.6.1 form, from and to its bare JID, and answers it to its bare JID), unsubscribe, the
  subscriber's §5.6 list, the owner's §8.8 management; the last item on subscribing (§6.1.7);
  subscription options (§6.3: pubsub#deliver, pubsub#include_body; §6.4 defaults), kept with
  the subscription;
- notifications, as <message type='headline'> from the bare JID, to the owner's available
  resources, to explicit subscribers the access model still admits, and to the available
  resources of contacts allowed to see the node whose XEP-0115 capabilities include
  ``<node>+notify`` (the caps module, caps.py, knows them);
- the last item of each node to a resource that becomes available (or changes capabilities);
- publish_item/retract_item/stored_items for other modules (private.py: XEP-0402 bookmarks
  from XEP-0048; vcard.py: XEP-0398 avatars), and the pep/published event;
- contacts on other servers: caps.py knows which of their resources are available with which
  caps, and notifications go to them by federation.

    [pep]
    max_items = 256          # items a node keeps at most (pubsub#max_items = max)
    max_nodes = 64           # nodes per account
    max_payload_size = 65536 # bytes of one item's payload
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server import events
from server.config import int_option
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.module import Module, Stanza, hook, iq_get, iq_set
from server.modules.caps import EntityCaps
from server.modules.pubsub import engine
from server.modules.pubsub.engine import OWNER, PUBSUB, Node, PubsubError
from server.modules.pubsub.protocol import Host, PubsubProtocol
from server.presence.subscription import is_subscriber
from server.roster import state_of
from server.sessions import Session
from server.storage.base import NoSuchAccount
from server.storage.pubsub import SPEC, PepStore
from server.xml import ns
from server.xml import stanza as st

if TYPE_CHECKING:
    from server.app import Server
    from server.modules.pubsub.cluster import SharedPubsub

log = logging.getLogger("presenced.pep")

_CACHE_SIZE = 10000
FEATURES = (PUBSUB, *(f"{PUBSUB}#{f}" for f in (
    "access-authorize", "access-open", "access-presence", "access-roster", "access-whitelist",
    "auto-create", "config-node", "create-nodes", "delete-items", "delete-nodes",
    "filtered-notifications", "item-ids", "last-published", "manage-subscriptions",
    "persistent-items", "publish", "publish-options", "purge-nodes", "retract-items",
    "retrieve-affiliations", "retrieve-default", "retrieve-items", "retrieve-subscriptions",
    "subscribe", "subscription-options")))


@dataclass(frozen=True, slots=True, kw_only=True)
class PepSettings:
    max_items: int = field(metadata=int_option(1, 100000, 256))
    max_nodes: int = field(metadata=int_option(1, 100000, 64))
    max_payload_size: int = field(metadata=int_option(256, 1 << 24, 65536))


class Pep(PubsubProtocol, Module):
    name = "pep"
    settings = PepSettings
    stores = (SPEC,)
    uses = (EntityCaps,)  # +notify interests (XEP-0115); without it, only explicit subscribers
    max_publish_items = 1  # XEP-0163 §3: one item per publish
    manages_affiliations = False  # the account owns its nodes, nobody else is affiliated

    def __init__(self, server: Server, config: PepSettings) -> None:
        Module.__init__(self, server, config)
        PubsubProtocol.__init__(self)
        # owner bare JID -> node -> its state (the whole account's nodes, with their explicit
        # subscriptions and options, XEP-0060 §6.1, §6.3; read once, dropped with them)
        self._nodes: dict[JID, dict[str, Node]] = {}
        # [cluster]: caches dropped across nodes, +notify checked where sessions are
        self.shared: SharedPubsub | None = None

    async def start(self) -> None:
        await super().start()
        cluster = self.server.cluster
        if cluster is not None:
            from server.modules.pubsub.cluster import SharedPubsub
            self.shared = SharedPubsub(self, cluster, "p")
            self.shared.listen(self._forget_remote)
            self.notify = self._notify_clustered  # type: ignore[method-assign]

    def _forget_remote(self, owner: str) -> None:
        with contextlib.suppress(InvalidJID):
            self._forget(JID.parse(owner))

    async def _changed(self, owner: JID | None) -> None:
        """A request may have changed the account's nodes: other nodes drop their copy."""
        if self.shared is not None and owner is not None:
            await self.shared.changed(str(owner.bare))

    @property
    def store(self) -> PepStore:
        store: PepStore = self.store_of(SPEC)
        return store

    @property
    def _caps(self) -> EntityCaps | None:
        return self.server.module(EntityCaps)

    # -- nodes --------------------------------------------------------------------------------

    @staticmethod
    def host_of(owner: JID) -> Host:
        assert owner.local is not None
        return Host(str(owner), owner.local, owner.domain, owner)

    async def nodes(self, host: Host) -> dict[str, Node]:
        owner = host.owner
        assert owner is not None
        nodes = self._nodes.get(owner)
        if nodes is not None and self.shared is not None and not await self.shared.fresh(
                host.jid):
            self._forget(owner)  # [cluster]: changed on another node since we read it
            nodes = None
        if nodes is None:
            stored = await self.store.nodes(host.user, host.domain)
            subs = await self.store.subscriptions(host.user, host.domain)
            options = await self.store.subscription_options(host.user, host.domain)
            cached = self._nodes.get(owner)
            if cached is not None:
                return cached  # read meanwhile by another call, and maybe changed since
            nodes = {name: Node(engine.node_config(config), {str(owner): "owner"},
                                subs.get(name, {}), options.get(name, {}))
                     for name, config in stored.items()}
            if len(self._nodes) >= _CACHE_SIZE:
                self._nodes.clear()
            self._nodes[owner] = nodes
        return nodes

    def _forget(self, owner: JID) -> None:
        self._nodes.pop(owner, None)

    async def _create(self, host: Host, name: str, options: dict[str, Any]) -> Node:
        nodes = await self.nodes(host)
        if len(nodes) >= self.config.max_nodes:
            raise PubsubError("not-allowed", "max-nodes-exceeded",
                              f"an account has at most {self.config.max_nodes} nodes")
        node = Node(engine.node_config(options), {host.jid: "owner"})
        if not await self.store.create_node(host.user, host.domain, name, node.config):
            assert host.owner is not None
            self._forget(host.owner)  # created meanwhile (another server process)
            raise PubsubError("conflict", text=f"node {name!r} exists")
        nodes[name] = node
        log.info("event=pep-node-created jid=%s node=%s", host.jid, name)
        return node

    # -- policy -------------------------------------------------------------------------------

    async def host(self, stanza: Stanza, origin: Session | None) -> Host:
        """The account addressed (or the sender's own); service-unavailable when there is no
        such account. The owner's own bound session proves the account (no storage read per
        publish)."""
        to = stanza.get("to")
        if to is not None:
            owner = JID.parse(to).bare
        else:
            assert origin is not None
            owner = origin.jid.bare
        own = origin is not None and origin.local_client and origin.jid.bare == owner
        if owner.local is None or not (own or await self.server.storage.accounts.exists(
                owner.local, owner.domain)):
            raise StanzaError("service-unavailable")
        return self.host_of(owner)

    async def facts(self, host: Host, node: Node, who: JID) -> dict[str, bool]:
        owner = host.owner
        assert owner is not None
        bare = who.bare
        if bare == owner:
            return {"owner": True, "subscriber": True, "in_roster": True, "approved": True}
        roster = await self.server.rosters.get(owner)
        item = roster.items.get(str(bare))
        denied = self.server.access.denied(owner, bare)
        in_roster = not denied and item is not None and item.listed
        approved = not denied and node.approved(who)
        groups = node.config.get("roster_groups_allowed")
        if not denied and groups and item is not None:  # §4.5 roster: in one of these groups
            in_roster = in_roster and bool(set(groups) & set(item.groups))
        return {"owner": False, "subscriber": not denied and is_subscriber(state_of(item)),
                "in_roster": in_roster, "approved": approved}

    def check_owner_request(self, host: Host, who: JID) -> None:
        if who.bare != host.owner:
            raise PubsubError("forbidden", text="only the owner manages its nodes")

    def shown_publisher(self, host: Host, node: Node, publisher: str) -> str | None:
        """The owner (the one publisher of a PEP node) when pubsub#itemreply asks for it,
        else none (Prosody's default, what its tests expect)."""
        return host.jid if node.config.get("itemreply") in ("owner", "publisher") else None

    async def publish_node(self, host: Host, name: str, who: JID, options: dict[str, Any],
                           items: list[tuple[str | None, list[Stanza]]]) -> tuple[Node, bool]:
        if who.bare != host.owner:  # XEP-0163 §2.2: one publisher per node
            raise PubsubError("forbidden", text="only the account publishes to its own nodes")
        if not items:
            raise PubsubError("bad-request", "item-required", "publish one item")
        return await self._node_for(host, name, options, items[0][1])

    async def _node_for(self, host: Host, name: str, options: dict[str, Any],
                        payloads: list[Stanza]) -> tuple[Node, bool]:
        node = (await self.nodes(host)).get(name)
        if node is not None:
            return node, False
        # XEP-0163 §3: auto-create, once the item is known to be acceptable.
        engine.item_payload(payloads, engine.node_config(options), self.config.max_payload_size)
        return await self._create(host, name, options), True

    async def create(self, stanza: Stanza, host: Host, who: JID,
                     actions: list[Stanza]) -> Stanza:
        if who.bare != host.owner:
            raise PubsubError("forbidden", text="only the account creates its own nodes")
        name = actions[0].get("node")
        if not name:
            raise engine.unsupported("instant-nodes")
        engine.checked_node(name)
        configure = next((c for c in actions[1:] if c.tag == ns.q(PUBSUB, "configure")), None)
        form = configure.find(engine.X) if configure is not None else None
        await self._create(host, name, engine.form_values(form, engine.NODE_CONFIG))
        return st.result(stanza)

    async def save_config(self, host: Host, name: str, node: Node) -> None:
        await self.store.set_config(host.user, host.domain, name, node.config)

    async def save_affiliations(self, host: Host, name: str, node: Node) -> None:
        raise engine.unsupported("modify-affiliations")

    async def save_subscription(self, host: Host, name: str, node: Node, jid: str) -> None:
        state = node.subscriptions.get(jid)
        if state is None:
            await self.store.remove_subscription(host.user, host.domain, name, jid)
            return
        subscriber = JID.parse(jid)
        account = None
        if subscriber.local is not None and subscriber.domain in self.server.hosts:
            account = (subscriber.local, subscriber.domain)
        try:
            await self.store.set_subscription(host.user, host.domain, name, jid, state,
                                              account, node.options.get(jid))
        except NoSuchAccount:
            raise PubsubError("bad-request", "invalid-jid", f"no account {jid}") from None

    async def published(self, host: Host, name: str,
                        items: list[tuple[str, Stanza | None]]) -> None:
        """Other modules follow some nodes (vcard.py: XEP-0398 avatars)."""
        for item_id, payload in items:
            await self.server.hooks.notify(events.PEP_PUBLISHED, host.owner, name, item_id,
                                           payload)

    async def _notify_clustered(self, host: Host, name: str, node: Node,
                                event: Stanza) -> None:
        """notify() with [cluster] (set in start()): contacts' resources on other nodes, whose
        caps are known there, get the notification through their nodes (pubsub/cluster.py)."""
        assert self.shared is not None
        remote: list[Session] = []
        one = engine.notification(host.jid, node, event,
                                  await self.targets(host, name, node, remote))
        await self.deliver([one])
        if remote:
            if one.message.get("id") is None:
                one.message.set("id", f"{self._prefix}{next(self._ids)}")
            self.shared.notify_remote(one.message, name + "+notify", remote)

    async def targets(self, host: Host, name: str, node: Node,
                      remote: list[Session] | None = None) -> list[str]:
        """XEP-0163 §4.3: the owner's available resources, the contacts' resources that may
        see the node and asked for <node>+notify, and the explicit subscribers the access
        model still admits (§7.1.2.1; not those whose options say deliver = false, §6.3).
        remote ([cluster]): gets the contacts' available resources on other nodes, whose
        interests are checked there."""
        owner = host.owner
        assert owner is not None
        sessions = self.server.sessions
        targets = [s.jid_str for s in sessions.resources(owner) if s.presence is not None]
        caps = self._caps
        if caps is not None and node.config["access_model"] in ("open", "presence", "roster"):
            # authorize: approved subscribers only
            roster = await self.server.rosters.get(owner)
            interest = name + "+notify"
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
                    if remote is not None and self.shared is not None:
                        remote += [s for s in sessions.resources(jid)
                                   if s.presence is not None and self.shared.is_remote(s)]
                else:  # on another server: the resources whose presence we saw
                    targets += caps.remote_wanting(jid, interest)
        # A bare JID's subscription covers its resources (the router delivers a headline to
        # each).
        for subscriber, state in node.subscriptions.items():
            if state != "subscribed" or not node.delivers(subscriber):
                continue
            jid = JID.parse(subscriber)
            if jid.bare == owner or subscriber in targets:
                continue  # the owner's resources have it already
            if not engine.may_access(node.config, **await self.facts(host, node, jid)):
                continue
            if jid.resource is None:
                targets = [t for t in targets if not t.startswith(subscriber + "/")]
            targets.append(subscriber)
        return targets

    def forget_node(self, host: Host, name: str) -> None:
        pass  # its subscriptions went with it (in the store, and in its Node)

    # -- the protocol -------------------------------------------------------------------------

    @iq_get(PUBSUB, "pubsub", to=("self", "bare"))
    async def get_pubsub(self, stanza: Stanza, origin: Session | None) -> Stanza:
        return await self.answer(stanza, origin)

    @iq_set(PUBSUB, "pubsub", to=("self", "bare"))
    async def set_pubsub(self, stanza: Stanza, origin: Session | None) -> Stanza:
        try:
            return await self.answer(stanza, origin)
        finally:
            if self.shared is not None:
                await self._changed(_owner_of(stanza, origin))

    @iq_get(OWNER, "pubsub", to=("self", "bare"))
    async def get_owner(self, stanza: Stanza, origin: Session | None) -> Stanza:
        return await self.answer(stanza, origin)

    @iq_set(OWNER, "pubsub", to=("self", "bare"))
    async def set_owner(self, stanza: Stanza, origin: Session | None) -> Stanza:
        try:
            return await self.answer(stanza, origin)
        finally:
            if self.shared is not None:
                await self._changed(_owner_of(stanza, origin))

    @hook(events.MESSAGE_BARE, priority=10)
    def authorization(self, stanza: Stanza, origin: Session | None, to: JID) -> object:
        """§8.6.2: the owner's answer to an authorization request, sent to its own PEP
        service (its bare JID)."""
        if origin is None or origin.jid.bare != to or stanza.find(engine.X) is None:
            return None
        answer = engine.authorization_answer(stanza)
        if answer is None:
            return None
        if to.local is None:
            return True
        return self.authorize(self.host_of(to), origin.jid, *answer)

    # -- for other modules (private.py: XEP-0402 bookmarks; vcard.py: XEP-0398 avatars) --------

    async def publish_item(self, owner: JID, node: str, item_id: str | None,
                           payloads: list[Stanza], options: dict[str, Any], *,
                           preconditions: bool = True) -> str:
        """Publish one item as the owner, with notifications; its id. For the server's own
        conversions, which create the node with `options` if need be but do not hold an
        existing node to them (preconditions=False)."""
        host = self.host_of(owner)
        found, created = await self._node_for(host, node, options, payloads)
        if preconditions and not created:
            unmet = engine.unmet_preconditions(found.config, options)
            if unmet:
                raise engine.precondition_error(unmet)
        published = await self.put_items(host, node, found, owner, [(item_id, payloads)])
        if self.shared is not None:
            await self._changed(owner)  # the node's newest item, kept in memory (Node.last)
        return published[0][0]

    async def retract_item(self, owner: JID, node: str, item_id: str,
                           notify: bool = False) -> bool:
        """Retract an item (notified when asked or when the node says notify_retract); False
        when there was none."""
        host = self.host_of(owner)
        found = (await self.nodes(host)).get(node)
        removed = found is not None and await self.remove_item(host, node, found, item_id,
                                                               notify)
        if removed and self.shared is not None:
            await self._changed(owner)
        return removed

    async def stored_items(self, owner: JID, node: str) -> list[tuple[str, Stanza | None]]:
        """The node's items (id, payload), oldest first; none when there is no such node."""
        if not await self.has_node(owner, node):
            return []
        assert owner.local is not None
        return [(one.id, engine.parse_stored(one.payload))
                for one in await self.store.items(owner.local, owner.domain, node)]

    async def has_node(self, owner: JID, node: str) -> bool:
        return node in await self.nodes(self.host_of(owner))

    # -- the last items, when a resource's capabilities are known (caps.py) ----------------

    @hook(events.CAPS_KNOWN)
    def caps_known(self, session: Session, _features: frozenset[str]) -> Awaitable[None]:
        """XEP-0163 §4.3.2: the last items, once the presence went out with caps known."""
        return self._send_last_items(session)

    @hook(events.CAPS_REMOTE_KNOWN)
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
        host = self.host_of(owner)
        for name, node in list((await self.nodes(host)).items()):
            if name in wanted:
                await self.send_last(host, name, node, target, on_sub=False)

    # -- discovery ----------------------------------------------------------------------------

    @hook(events.DISCO_ACCOUNT_INFO)
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
        assert origin is not None
        owner = JID.parse(stanza.get("to")).bare if stanza.get("to") else origin.jid.bare
        query = st.payload(stanza)
        assert query is not None and owner.local is not None
        node = query.get("node")
        nodes = await self.nodes(self.host_of(owner))
        reply = st.element(ns.q(ns.DISCO_ITEMS, "query"), {"node": node} if node else None)
        if node is None:
            for name, found in sorted(nodes.items()):
                attrs = {"jid": str(owner), "node": name}
                if found.config.get("title"):
                    attrs["name"] = found.config["title"]
                st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), attrs)
        elif node in nodes:
            for item in await self.store.items(owner.local, owner.domain, node):
                st.child(reply, ns.q(ns.DISCO_ITEMS, "item"), {"jid": str(owner),
                                                               "name": item.id})
        else:
            return engine.error_reply(stanza, PubsubError("item-not-found", text="no such node"))
        return st.result(stanza, reply)

    @hook(events.SESSION_BOUND)
    def bound(self, session: Session) -> None:
        # A login reads the account's nodes afresh (it may have been deleted and made again
        # meanwhile, by the CLI in another process).
        if not self.server.sessions.resources(session.jid.bare)[1:]:
            self._forget(session.jid.bare)

    @hook(events.SESSION_CLOSED)
    def closed(self, session: Session, _reason: str) -> None:
        if not self.server.sessions.resources(session.jid.bare):
            self._forget(session.jid.bare)


def _owner_of(stanza: Stanza, origin: Session | None) -> JID | None:
    """The account a PEP request is for (as host() finds it), None when it cannot be told."""
    to = stanza.get("to")
    try:
        return JID.parse(to).bare if to is not None else (
            origin.jid.bare if origin is not None else None)
    except InvalidJID:
        return None
