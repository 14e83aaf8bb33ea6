"""Routes to external components (XEP-0114) across the cluster: a component connected to one
node serves its domain for every node (issue 22 item 4).

The node a component authenticates on claims the domain in presenced:component:<domain>
("<node>:<incarnation>"), with the compare-and-set script rooms are claimed with
(placement.py): the claim is written only while no live incarnation holds it, so a second
connection for the same domain, on any node, gets <conflict/> as on one node, unless the first
node is dead (its claim is then taken over). The claim is released when the component
disconnects; the incarnations' sets of claims (presenced:placed:component:<owner>) let the
node that cleans up after a dead incarnation (reaper.py) remove its claims, and a claim left
by an incarnation that is not live is never used meanwhile.

A stanza for a component connected to another node is forwarded to that node's inbox (an
entry of kind "v", p "component": in order behind what this node sent there before) and
written to the component there. Where it lives is cached per domain while its owner is live
and the claim unchanged (each claim and release is published on the invalidation channel,
kind "k"); a node that gets a stanza for a component no longer connected to it looks once
more in Redis and forwards it there, else answers as for a component that is away
(service-unavailable).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.cluster import keys
from server.cluster.handover import Background
from server.cluster.placement import CLAIM_SCRIPT, RELEASE_SCRIPT
from server.errors import StanzaError
from server.jid import JID
from server.xml import stanza as st

if TYPE_CHECKING:
    from lxml.etree import _Element

    from server.cluster import Cluster
    from server.stream.component import Components

log = logging.getLogger("presenced.cluster")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_STOP_WAIT = 2.0  # seconds the releases at a stop may take


class ComponentRoutes:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.redis = cluster.redis
        self.membership = cluster.membership
        self._claim = self.redis.register_script(CLAIM_SCRIPT)
        self._release = self.redis.register_script(RELEASE_SCRIPT)
        self._owners: dict[str, tuple[str, str]] = {}  # domain -> (node, incarnation)
        self._background = Background("component-route-failed")
        self.components: Components | None = None  # set by the components (the streams here)
        cluster.inbox.placed[keys.COMPONENT] = self._received
        cluster.invalidations[keys.COMPONENT_ROUTE] = self.forget

    @property
    def me(self) -> str:
        return f"{self.membership.name}:{self.membership.incarnation}"

    # -- claims ------------------------------------------------------------------------------

    async def claim(self, domain: str) -> bool:
        """Claim the component's domain for this node: False when a live node holds it."""
        me = self.me
        owner = await self._claim(
            keys=[keys.placed(keys.COMPONENT, domain)],
            args=[me, keys.node(""), keys.placed_by(keys.COMPONENT, ""), domain])
        owner = owner.decode() if isinstance(owner, bytes) else owner
        if owner != me:
            log.info("event=component-claim-refused domain=%s owner=%s", domain, owner)
            return False
        # The other nodes drop what they cached (a dead node's claim taken over).
        await self.cluster.publish(keys.COMPONENT_ROUTE, JID.from_parts(None, domain))
        return True

    def release(self, domain: str) -> None:
        """The component disconnected from this node."""
        owner = self.me
        self._background.spawn(self._release_claim(domain, owner))

    async def _release_claim(self, domain: str, owner: str) -> None:
        await self._release(keys=[keys.placed(keys.COMPONENT, domain),
                                  keys.placed_by(keys.COMPONENT, owner)], args=[owner, domain])
        await self.cluster.publish(keys.COMPONENT_ROUTE, JID.from_parts(None, domain))

    async def remove_claims(self, owner: str) -> None:
        """An incarnation ("<node>:<incarnation>") is gone: its claims go (reaper.py, by the
        one node that cleans up after it, or by the node itself when it joins again)."""
        claims = keys.placed_by(keys.COMPONENT, owner)
        for raw in await self.redis.smembers(claims):
            domain = raw.decode()
            await self._release(keys=[keys.placed(keys.COMPONENT, domain), claims],
                                args=[owner, domain])
            self._owners.pop(domain, None)
            log.info("event=component-route-removed domain=%s owner=%s", domain, owner)
        await self.redis.delete(claims)

    def rejoined(self) -> None:
        """Fenced (declared dead, joined again as a new incarnation): our claims were the old
        incarnation's, which the survivors remove; each component still connected here claims
        its domain again, or ends with <conflict/> when it connected elsewhere meanwhile."""
        if self.components is not None:
            for domain in list(self.components.connected):
                self._background.spawn(self._claim_again(domain))

    async def _claim_again(self, domain: str) -> None:
        if not await self.claim(domain) and self.components is not None:
            stream = self.components.connected.get(domain)
            if stream is not None:
                stream.close("conflict", "this component connected to another node")

    def forget(self, domain: str) -> None:
        """Another node claimed or released the domain: look it up again."""
        self._owners.pop(domain, None)

    # -- stanzas -----------------------------------------------------------------------------

    def route(self, domain: str, stanza: _Element) -> Any:
        """A stanza for a component not connected to this node: forwarded to the node it is
        connected to (True), or an awaitable that looks it up first."""
        owner = self._owners.get(domain)
        if owner is not None and self.membership.is_live(*owner):
            self._forward(owner[0], domain, stanza)
            return True
        return self._look_up_and_forward(domain, stanza)

    async def _look_up_and_forward(self, domain: str, stanza: _Element) -> bool:
        owner = await self._owner(domain)
        if owner is None:
            raise StanzaError("service-unavailable", f"{domain} is not connected")
        self._forward(owner[0], domain, stanza)
        return True

    async def _owner(self, domain: str) -> tuple[str, str] | None:
        """The live node, other than this one, the component is connected to (cached)."""
        raw = await self.redis.get(keys.placed(keys.COMPONENT, domain))
        if raw is None:
            return None
        node, _, incarnation = raw.decode().partition(":")
        if node == self.membership.name or not self.membership.is_live(node, incarnation):
            return None  # ours (it left meanwhile), or a dead node's claim
        self._owners[domain] = (node, incarnation)
        return node, incarnation

    def _forward(self, node: str, domain: str, stanza: _Element, hops: int = 0) -> None:
        fields = {"k": "v", "p": keys.COMPONENT, "j": domain,
                  "x": etree.tostring(stanza, encoding="unicode")}
        if hops:
            fields["f"] = str(hops)
        self.cluster.inbox.send_fields(node, fields)

    def _received(self, fields: dict[str, str]) -> None:
        """A "v" entry of our inbox: a stanza another node forwarded to a component here."""
        domain = fields.get("j", "")
        try:
            stanza = etree.fromstring(fields["x"], _PARSER)
        except (KeyError, etree.XMLSyntaxError):
            log.warning("event=component-entry-bad domain=%s", domain)
            return
        stream = self.components.connected.get(domain) if self.components is not None else None
        if stream is not None:
            stream.deliver(stanza)
            return
        # Not (or no longer) here: where it is now, once; else as if it were away.
        self._owners.pop(domain, None)
        if not fields.get("f"):
            self._background.spawn(self._forward_once(domain, stanza))
            return
        self._away(domain, stanza)

    async def _forward_once(self, domain: str, stanza: _Element) -> None:
        owner = await self._owner(domain)
        if owner is None:
            self._away(domain, stanza)
            return
        self._forward(owner[0], domain, stanza, hops=1)

    def _away(self, domain: str, stanza: _Element) -> None:
        log.info("event=component-undeliverable domain=%s stanza=%s", domain,
                 etree.QName(stanza).localname)
        kind = stanza.get("type")
        if self.components is None or kind in ("error", "headline", "groupchat") or (
                stanza.tag == st.IQ and kind == "result"):
            return  # as the router does for a service that took nothing (RFC 6120 §8.3.1)
        self.components.router.reply_error(stanza, StanzaError(
            "service-unavailable", f"{domain} is not connected"), None)

    # -- lifecycle ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Stopping: the releases under way reach Redis (bounded)."""
        await self._background.flush(_STOP_WAIT)
