"""Cleaning up after an incarnation that is gone: a node killed (kill -9), fenced, or stopped.

Every incarnation is listed in presenced:incarnations from its join until it is cleaned up.
On every heartbeat each node looks for listed incarnations that are no longer live (their
node's key is gone or holds another incarnation); exactly one node cleans up each, the one
that takes the lock ``SET presenced:reap:<node>:<incarnation> NX PX`` (keys.py):

1. its sessions (presenced:dir-node:<node>:<incarnation>): each directory entry still naming
   that incarnation is removed (the other nodes reload the account: an invalidation), and an
   available session's contacts get its unavailable presence as if its stream had closed
   (RFC 6121 §4.6.3: through the presence module's broadcast, so local, remote-node and
   federated contacts alike, and the account's other resources, §4.5.2);
2. its inbox: the entries it read and did not acknowledge (the consumer named after the
   incarnation) or, when no incarnation of that node is live any more, every entry of the
   stream, are settled as undeliverable (inbox.py: a message to offline storage, RFC 6121
   §8.5.2 — not archived again, the sender's node archived it when it accepted it; an iq
   get/set answered with service-unavailable, §8.5.3.2.1; presence dropped) and deleted
   (XDEL), then the stream itself when it is empty;
3. the incarnation's field is removed from presenced:incarnations and the lock stays as a
   tombstone for a day: a node paused longer than dead_after that comes back finds it and
   knows it was reaped (it fences itself, membership.py), whereas a node whose key vanished
   because Redis lost its data takes the lock itself and re-asserts its state instead.

A node that rejoins (restart with the same name, or after fencing) cleans up its own previous
incarnations the same way before it reads its inbox — or waits for the survivor that holds the
lock — so that one incarnation's entries are never handled twice. A stopping node takes its own
lock, leaves, and drains its own stream (graceful stop, Cluster.stop).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from server.cluster import keys
from server.cluster.directory import RemoteSession
from server.jid import JID, InvalidJID
from server.presence import presentity as pt

if TYPE_CHECKING:
    from server.cluster import Cluster

log = logging.getLogger("presenced.cluster")
LOCK_MS = 60_000            # a reaper that dies mid-way lets another one try after this
TOMBSTONE_MS = 86_400_000   # a reaped incarnation's lock is kept this long once done
_BATCH = 256
_WAIT_OWN = 30.0            # seconds a rejoining node waits for the survivor reaping it

# KEYS[1] dir hash; ARGV: resource, incarnation. Removes the entry only while it is still the
# dead incarnation's (a newer session of the resource, bound since, stays).
_REMOVE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old or cjson.decode(old)['i'] ~= ARGV[2] then return nil end
redis.call('HDEL', KEYS[1], ARGV[1])
return old
"""
_EXTEND = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
           "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0")
_DEL_IF_EMPTY = ("if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('XLEN', KEYS[1]) == 0 "
                 "then redis.call('DEL', KEYS[1]) end return 1")


class Reaper:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.redis = cluster.redis
        self.membership = cluster.membership
        self._remove = self.redis.register_script(_REMOVE)
        self._extend = self.redis.register_script(_EXTEND)
        self._done: set[str] = set()  # incarnation fields this node saw cleaned up
        self.reaped = 0  # incarnations this node cleaned up (tests, metrics)

    @property
    def me(self) -> str:
        return self.membership.name

    # -- finding the dead --------------------------------------------------------------------

    async def tick(self) -> None:
        """Clean up every listed incarnation that is not live (one at a time)."""
        registry = await self.redis.hgetall(keys.INCARNATIONS)
        for field_b, info_b in registry.items():
            field = field_b.decode()
            if field in self._done:
                continue
            info = json.loads(info_b)
            node, incarnation = info["node"], info["incarnation"]
            if self.membership.live.get(node) == incarnation or (
                    node == self.me and incarnation == self.membership.incarnation):
                continue  # live as of the last heartbeat
            # Fresh from Redis, not the view of the last beat: a node that joined since is
            # live, never reaped.
            current = await self.redis.get(keys.node(node))
            if current is not None and current.decode() == incarnation:
                continue
            await self.try_reap(node, incarnation)

    async def try_reap(self, node: str, incarnation: str) -> bool:
        """Clean up that incarnation if no other node does (the lock); True when this one
        did."""
        lock = keys.reap(node, incarnation)
        if not await self.redis.set(lock, self.me, nx=True, px=LOCK_MS):
            return False
        keeper = asyncio.ensure_future(self._keep(lock))
        try:
            await self.reap(node, incarnation)
        except BaseException:
            await _cancel(keeper)
            await self.redis.delete(lock)  # another node (or this one) tries again
            raise
        await _cancel(keeper)
        await self.redis.set(lock, self.me, px=TOMBSTONE_MS)
        return True

    async def _keep(self, lock: str) -> None:
        """A long clean-up (many sessions) keeps its lock: nobody starts it a second time."""
        while True:
            await asyncio.sleep(LOCK_MS / 3000)
            await self._extend(keys=[lock], args=[self.me, LOCK_MS])

    async def claim_own(self) -> None:
        """At (re)join: the previous incarnations of this node, cleaned up by this node unless
        a survivor holds their lock (then wait until it is done: never both)."""
        registry = await self.redis.hgetall(keys.INCARNATIONS)
        for info_b in registry.values():
            info = json.loads(info_b)
            node, incarnation = info["node"], info["incarnation"]
            if node != self.me or incarnation == self.membership.incarnation:
                continue
            if await self.try_reap(node, incarnation):
                continue
            field = keys.incarnation(node, incarnation)
            deadline = time.monotonic() + _WAIT_OWN
            while (time.monotonic() < deadline
                   and await self.redis.hexists(keys.INCARNATIONS, field)):
                await asyncio.sleep(0.1)
            log.info("event=cluster-reaped-by-other node=%s incarnation=%s", node, incarnation)
        # A survivor draining this node's stream while it was down finishes first.
        deadline = time.monotonic() + _WAIT_OWN
        while time.monotonic() < deadline and await self.redis.exists(keys.reap(self.me,
                                                                                 "inbox")):
            await asyncio.sleep(0.1)

    # -- cleaning up -------------------------------------------------------------------------

    async def reap(self, node: str, incarnation: str) -> None:
        started = time.monotonic()
        sessions = await self._sessions(node, incarnation)
        entries = await self._inbox(node, incarnation)
        if self.cluster.routes is not None:  # its components' routes (routes.py)
            await self.cluster.routes.remove_claims(keys.incarnation(node, incarnation))
        await self.redis.hdel(keys.INCARNATIONS, keys.incarnation(node, incarnation))
        self._done.add(keys.incarnation(node, incarnation))
        self.reaped += 1
        log.info("event=cluster-reaped node=%s incarnation=%s sessions=%d entries=%d ms=%d",
                 node, incarnation, sessions, entries, (time.monotonic() - started) * 1000)

    async def _sessions(self, node: str, incarnation: str) -> int:
        owned = keys.node_sessions(node, incarnation)
        members = await self.redis.smembers(owned)
        cluster = self.cluster
        ghosts: list[RemoteSession] = []
        bares: set[str] = set()
        for member_b in members:
            bare, _, resource = member_b.decode().partition("/")
            raw = await self._remove(keys=[keys.directory(bare)], args=[resource, incarnation])
            if raw is None:
                continue
            try:
                jid = JID.parse(bare).with_resource(resource)
            except InvalidJID:
                continue
            ghosts.append(RemoteSession(jid, json.loads(raw), cluster.inbox))
            bares.add(bare)
        await self.redis.delete(owned)
        for bare in bares:
            await self.redis.publish(keys.INVALIDATE, f"{self.me} d {bare}")
            cluster.directory.invalidate(bare)
        # RFC 6121 §4.6.3: the server of a session that ends without unavailable presence
        # broadcasts it for the client; the node that would have is gone, so we do.
        hooks = cluster.server.hooks
        for ghost in ghosts:
            if ghost.presence is None:
                continue
            try:
                done = hooks.fire("presence/broadcast", pt.unavailable(ghost), ghost)
                if inspect.isawaitable(done):
                    await done
            except Exception as exc:
                log.warning("event=cluster-reap-presence-failed jid=%s error=%s", ghost.jid,
                            type(exc).__name__)
        return len(ghosts)

    async def _inbox(self, node: str, incarnation: str) -> int:
        live = await self.redis.get(keys.node(node))
        if live is None:
            return await self.drain_stream(node)
        return await self._drain_consumer(node, incarnation)

    async def drain_stream(self, node: str, reason: str = "node-died") -> int:
        """Every entry of a node's stream not yet handed over, when no incarnation of that
        node will read it (the node is not live): the pending ones (read by a dead
        incarnation, not acknowledged) and the unread ones, through the consumer group, so an
        entry handed over already is never settled again; then the stream if it is empty."""
        stream = keys.inbox(node)
        if not await self.redis.exists(stream):
            return 0
        try:
            await self.redis.xgroup_create(stream, keys.GROUP, id="0")
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        consumer = f"reaper-{self.me}"
        count = 0
        start: Any = "0-0"

        async def still_dead() -> bool:
            # A new incarnation (fenced and joined again) reads the rest itself: what it
            # reads may be for its new sessions.
            return node == self.me or await self.redis.get(keys.node(node)) is None

        while await still_dead():  # pending, whoever read them
            answer = await self.redis.xautoclaim(stream, keys.GROUP, consumer, 0, start,
                                                 count=_BATCH)
            start, entries = answer[0], answer[1]
            count += await self._settle(stream, entries, reason)
            if start in (b"0-0", "0-0") or not entries:
                break
        while await still_dead():  # unread
            answer = await self.redis.xreadgroup(keys.GROUP, consumer, {stream: ">"},
                                                 count=_BATCH)
            entries = [e for _s, batch in answer or () for e in batch]
            if not entries:
                break
            count += await self._settle(stream, entries, reason)
        await self._forget_consumer(stream, consumer)
        await self.redis.eval(_DEL_IF_EMPTY, 1, stream)
        await self.cluster.inbox.flush()
        return count

    async def _settle(self, stream: str, entries: list[Any], reason: str) -> int:
        """The entries' records settled (a packed entry holds several: inbox.records)."""
        inbox = self.cluster.inbox
        settled = 0
        for _entry_id, raw in entries:
            if raw:
                settled += await inbox.settle(raw, reason)
        ids = [entry_id for entry_id, _ in entries]
        if ids:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(stream, keys.GROUP, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()
        return settled

    async def _drain_consumer(self, node: str, incarnation: str) -> int:
        """The entries a dead incarnation read and did not acknowledge, while a newer
        incarnation of its node reads the rest."""
        stream = keys.inbox(node)
        consumer = f"reaper-{self.me}"
        count = 0
        while True:
            try:
                pending = await self.redis.xpending_range(stream, keys.GROUP, min="-", max="+",
                                                          count=_BATCH, consumername=incarnation)
            except Exception as exc:
                if "NOGROUP" in str(exc):
                    break
                raise
            if not pending:
                break
            ids = [p["message_id"] for p in pending]
            claimed = await self.redis.xclaim(stream, keys.GROUP, consumer, 0, ids)
            count += await self._settle(stream, [(i, r) for i, r in claimed if r],
                                        "incarnation-died")
            # Entries deleted meanwhile come back empty: acknowledged all the same.
            await self.redis.xack(stream, keys.GROUP, *ids)
        await self._forget_consumer(stream, incarnation)
        await self.cluster.inbox.flush()
        return count

    async def _forget_consumer(self, stream: str, consumer: str) -> None:
        try:
            await self.redis.xgroup_delconsumer(stream, keys.GROUP, consumer)
        except Exception as exc:
            if "NOGROUP" not in str(exc):
                raise

    async def dead_inboxes(self, nodes: Any) -> None:
        """Entries added to the stream of a node that is not live after it was drained (a
        sender whose view was one heartbeat late): settled the same way, under a lock."""
        for node in nodes:
            if node == self.me or await self.redis.get(keys.node(node)) is not None:
                continue
            stream = keys.inbox(node)
            if await self.redis.xlen(stream) == 0:  # 0 as well when there is no stream
                continue
            if any(f.decode().startswith(node + ":")
                   for f in await self.redis.hkeys(keys.INCARNATIONS)):
                continue  # an incarnation of it is still to be reaped: that drains it
            lock = keys.reap(node, "inbox")
            if not await self.redis.set(lock, self.me, nx=True, px=LOCK_MS):
                continue
            try:
                count = await self.drain_stream(node, "node-gone")
                log.info("event=cluster-dead-inbox-drained node=%s entries=%d", node, count)
            finally:
                await self.redis.delete(lock)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
