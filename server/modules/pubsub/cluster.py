"""PEP and pubsub.<domain> in a cluster ([cluster]; only imported then).

Their state that must be shared — nodes, configurations, items, subscriptions — is in the
shared database already (the pep and pubsub stores), so any node answers any request, and
notifications go out through the router like any stanza, to sessions wherever they are. Two
things are per node and are made cluster-wide here:

- the caches of nodes (PEP: per account, pubsub: per service domain) are dropped on every
  other node when a request changes them here (the cluster's invalidation channel, kinds "p"
  and "q"); the last item a late subscriber gets is read from the store, never cached;
- XEP-0115 interests (<node>+notify) are known where the session is (caps.py verifies them
  there): a PEP notification for contacts' resources on other nodes is sent once per node
  (inbox entry "v", kind "pep-notify": the message serialised once, its interest and the
  candidate resources), and that node delivers it to those of its sessions whose caps ask for
  it (XEP-0163 §4.3.1 filtered notifications), through the filter/user chain.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.cluster import keys
from server.cluster.directory import RemoteSession
from server.jid import JID, InvalidJID
from server.modules.caps import EntityCaps

if TYPE_CHECKING:
    from server.cluster import Cluster
    from server.module import Module
    from server.sessions import Session

log = logging.getLogger("presenced.cluster")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
NOTIFY = "pep-notify"
_VERSIONS = 100_000  # versions remembered (all forgotten past it: copies are then reread)


class SharedPubsub:
    def __init__(self, module: Module, cluster: Cluster, kind: str) -> None:
        self.module = module
        self.cluster = cluster
        self.kind = kind
        self._versions: dict[str, int] = {}  # key -> the version our copy was read at

    def listen(self, forget: Any) -> None:
        """`forget(key)` drops a cache entry another node changed."""
        self.cluster.invalidations[self.kind] = forget
        if self.kind == "p":
            self.cluster.inbox.placed[NOTIFY] = self.received

    async def changed(self, key: str) -> None:
        """Before the request that changed `key` is answered: its version goes up (a client
        told of the change, e.g. by a subscription's result, may at once ask another node,
        whose copy is then older than the version: fresh() reloads it), and the other nodes
        drop their copies now rather than at their next use."""
        redis = self.cluster.redis
        try:
            version = int(await redis.incr(keys.pubsub_version(self.kind, key)))
            if self._versions.get(key) == version - 1:
                self._versions[key] = version  # our copy has the change (and only ours)
            else:
                self._versions.pop(key, None)  # another node's change too: reread
            await redis.publish(keys.INVALIDATE, f"{self.cluster.name} {self.kind} {key}")
        except Exception as exc:  # Redis unreachable: the others' copies may be stale a while
            log.warning("event=cluster-publish-failed kind=%s error=%s", self.kind,
                        type(exc).__name__)

    async def fresh(self, key: str) -> bool:
        """Whether this node's copy of `key` may be used: its version is the latest (one
        Redis read; the pub/sub invalidation alone may come after a request that follows
        the change)."""
        try:
            raw = await self.cluster.redis.get(keys.pubsub_version(self.kind, key))
        except Exception as exc:  # Redis unreachable: the copy, as good as it gets now
            log.warning("event=cluster-version-failed kind=%s error=%s", self.kind,
                        type(exc).__name__)
            return True
        version = int(raw) if raw is not None else 0
        if self._versions.get(key, 0) == version:
            return True
        if len(self._versions) >= _VERSIONS:
            self._versions.clear()
        self._versions[key] = version
        return False

    @staticmethod
    def is_remote(session: Session) -> bool:
        return isinstance(session, RemoteSession)

    def notify_remote(self, message: etree._Element, interest: str,
                      sessions: list[Session]) -> None:
        """A notification for contacts' resources on other nodes, once per node; each
        delivers it to those of them whose caps ask for `interest`."""
        by_node: dict[str, list[str]] = {}
        membership = self.cluster.membership
        for session in sessions:
            assert isinstance(session, RemoteSession)
            if membership.is_live(session.node, session.incarnation):
                by_node.setdefault(session.node, []).append(session.jid_str)
        if not by_node:
            return
        xml = etree.tostring(message, encoding="unicode")
        for node, jids in by_node.items():
            self.cluster.inbox.send_fields(node, {"k": "v", "p": NOTIFY, "j": interest,
                                                  "t": " ".join(jids), "x": xml})

    def received(self, fields: dict[str, str]) -> None:
        interest = fields.get("j", "")
        caps = self.module.server.module(EntityCaps)
        if caps is None:
            return
        directory = self.cluster.directory
        router = self.cluster.inbox.router
        message: etree._Element | None = None
        for text in fields.get("t", "").split():
            try:
                jid = JID.parse(text)
            except InvalidJID:
                continue
            session = directory.local(jid)
            if session is None or session.presence is None or not caps.wants(session,
                                                                             interest):
                continue
            if message is None:
                message = etree.fromstring(fields["x"], _PARSER)
            addressed = copy.copy(message)
            addressed.set("to", text)
            router.deliver_in_order(addressed, jid)
