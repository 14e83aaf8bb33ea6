"""One domain on several nodes (processes or machines) sharing Redis and PostgreSQL.

Only imported with [cluster] (server/cluster/settings.py); without it the server is the
single process it always was. Pieces:

- membership.py: incarnations, heartbeats with a TTL, fencing and rejoining; heartbeat.py:
  the thread that beats, so that a busy event loop does not make a node dead;
- directory.py: the session directory in Redis behind the SessionDirectory Protocol, with a
  replica of the other nodes' sessions kept by invalidation, conflicts settled atomically;
- inbox.py: one Redis Stream per node for stanzas to sessions on that node;
- reaper.py: cleaning up after an incarnation that is gone (kill -9, fenced, stopped): one
  node, by a lock, publishes its sessions' unavailable presence, removes their directory
  entries and settles its inbox; the event cluster/node-died (server/events.py) tells every
  node's modules, e.g. the placement of rooms;
- routes.py: external components (XEP-0114) connected to one node, reachable from all;
- keys.py: every key, stream and channel name.

Caches that modules keep per account (rosters, blocklists, hidden lists, archive preferences,
avatar hashes) are dropped on the other nodes when an account changes here: the module calls its
`changed(bare)` callback, which publishes "<node> <kind> <bare> <ack list>" on the directory's
pub/sub channel; every other node calls that module's `forget(bare)` (kinds in keys.py) and then
pushes its name to the ack list, which the changing node waits for before the module answers:
a client's next stanza, to any node, sees the change.

What is promised (issue 22 item 6):

- **At least once between nodes.** An entry is acknowledged (and deleted) after it was handed
  to the session; an entry read by an incarnation that died before acknowledging it is handed
  over again (claimed by the node's next incarnation or settled by the reaper). Each entry
  carries an id ("m") and a node drops the duplicates it has seen; a stanza may still reach a
  client twice when its node died between handing it over and acknowledging it.
- **Order per sender while neither end moves.** Stanzas from one node to another go through
  one flusher, in order, on one connection, into one stream read in order; a batch that Redis
  refused is retried in front of what came after it. When the receiving session moves (SM
  resumption elsewhere, a node's death) messages may arrive from offline storage after newer
  ones.
- **A message accepted is delivered, in offline storage or in the archive.** A message for a
  session that is gone — closed since, on a node that died, was fenced or stopped — goes to
  offline storage (RFC 6121 §8.5.2) by the node that finds it undeliverable (the receiver, the
  reaper, or the stopping node itself, which drains its inbox before leaving); it is not
  archived again (the accepting node archived it). An iq get/set for such a session is
  answered with service-unavailable (RFC 6121 §8.5.3.2.1); presence is dropped (its unavailable
  presence goes out instead). While Redis is unreachable, local traffic goes on and stanzas for
  other nodes wait and are retried (30 s, then offline storage, as at a stop); when Redis comes
  back without our state (a restart without persistence) each node re-asserts its key, its
  sessions' directory entries and its inbox, unless it was declared dead meanwhile (then it
  fences itself: never two live owners of one session). Entries that were in Redis when it
  restarted without persistence are gone with it: run Redis with appendonly (AOF) to keep the
  promises across a Redis restart.
"""

from __future__ import annotations

# server.config first: it imports settings.py, which imports the option API from it (a
# submodule imported on its own would otherwise meet a half-initialised server.config).
import server.config  # noqa: F401  isort: skip
import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from server import events
from server.cluster import keys
from server.cluster.directory import ClusterDirectory
from server.cluster.handover import Background, Handover
from server.cluster.inbox import Inbox
from server.cluster.membership import ClusterError, Membership
from server.cluster.reaper import LOCK_MS, TOMBSTONE_MS, Reaper
from server.jid import JID, InvalidJID

if TYPE_CHECKING:
    from server.app import Server
    from server.cluster.routes import ComponentRoutes
    from server.modules.carbons import Carbons
    from server.router import Router
    from server.sessions import Session

__all__ = ["Cluster", "ClusterError"]

log = logging.getLogger("presenced.cluster")
_RESYNC = 30.0  # seconds between full reloads of the directory replica
_STOP_STEP = 2.0  # seconds each Redis-bound step of stopping may take at most
_ACK_WAIT = 2.0  # seconds a change waits for the other nodes to drop their cache entries


class SharedCache(Protocol):
    """A module that caches per-account data: `changed` is called (when set) after a change
    here; `forget` drops an account's entry when another node changed it."""

    changed: Callable[[JID], Awaitable[None]] | None

    def forget(self, bare: JID) -> None: ...


def connect(url: str) -> Any:
    import redis.asyncio  # only with [cluster]

    return redis.asyncio.from_url(url, health_check_interval=10, socket_connect_timeout=5)


class Cluster:
    def __init__(self, server: Server) -> None:
        settings = server.config.cluster
        assert settings.redis is not None and settings.node is not None
        self.server = server
        self.name = settings.node
        self.redis = connect(settings.redis)
        self.membership = Membership(self.redis, settings, self._session_count, self._fenced)
        self.directory = ClusterDirectory(server.config.limits.max_sessions_per_user,
                                          self.redis, self.membership)
        self.inbox = Inbox(self.redis, self.membership, self.directory)
        self.directory.inbox = self.inbox
        self.reaper = Reaper(self)
        self.membership.on_gone = self._gone
        self.membership.on_rejoined = self._rejoined
        self.membership.on_reasserted = self._reasserted
        self.directory.on_remote_change = self._remote_changed
        self._tasks: list[asyncio.Task[None]] = []
        # kind -> what drops a module's cache entry when another node says it changed
        # (pubsub/cluster.py: "p" a PEP account's nodes, "q" a pubsub service's)
        self.invalidations: dict[str, Callable[[str], None]] = {}
        self.drained = 0  # inbox entries this node settled itself when it stopped
        self._stopping = False
        self.handover = Handover(self.redis, self.membership, self.inbox, self.directory)
        self.directory.handover = self.handover
        self._caches: dict[str, Callable[[JID], None]] = {}  # kind -> forget(bare)
        self._ack_numbers = itertools.count()
        # Publications nobody may await (the roster's) and acknowledgements, kept until done.
        self._acking = Background("cluster-ack-failed")
        self._refreshes = Background("cluster-refresh-failed")  # another node joined or left
        self._subscribed = False  # our own invalidation subscription hears what we publish
        self._carbons: Carbons | None = None
        self.routes: ComponentRoutes | None = None  # components on any node (routes.py)

    def attach(self, router: Router) -> None:
        """The router that undeliverable stanzas go back through (made after the directory)."""
        self.inbox.router = router
        router.miss = self.directory.recheck

    def component_routes(self) -> ComponentRoutes:
        """External components (XEP-0114) reachable from every node (routes.py)."""
        from server.cluster.routes import ComponentRoutes

        routes = self.routes = ComponentRoutes(self)
        return routes

    def _session_count(self) -> int:
        return len(self.directory)

    async def start(self) -> None:
        """Join before the listeners open: the replica is loaded, the inbox is read."""
        try:
            await self.redis.ping()
        except Exception as exc:
            raise ClusterError(f"Redis at {self.server.config.cluster.redis} is not "
                               f"reachable: {exc}") from None
        hooks = self.server.hooks
        hooks.add("presence/available", self._presence_changed, -100)
        hooks.add("presence/unavailable", self._presence_changed, -100)
        self._wire_caches()
        await self.membership.join()
        self.membership.start()  # heartbeats while we wait below
        # The previous incarnation's sessions and unread entries (kill -9, then restart):
        # cleaned up here unless a survivor does it (then after it), never both (reaper.py).
        await self.reaper.claim_own()
        await self.inbox.prepare()
        self.directory.start()
        await self.directory.resync()
        self._tasks.append(asyncio.ensure_future(self._listen()))
        self._tasks.append(asyncio.ensure_future(self._resync()))
        self._tasks.append(asyncio.ensure_future(self._reap()))
        await self.inbox.claim_orphans()
        self.inbox.start()
        await self._announce()

    async def _announce(self) -> None:
        """The others read the live nodes now rather than at their next heartbeat: rooms
        are placed by the hashing over what each node sees."""
        try:
            await self.redis.publish(keys.INVALIDATE, f"{self.name} {keys.MEMBERSHIP} -")
        except Exception as exc:  # their heartbeat reads it anyway
            log.warning("event=cluster-announce-failed error=%s", type(exc).__name__)

    async def stop(self) -> None:
        """Graceful: the directory writes and outgoing stanzas are in Redis, then leave.

        Every step that waits on Redis is bounded (_STOP_STEP): a Redis that is down, paused
        or slow makes the stop give up on that step (logged), never hang."""
        await _bounded(self.directory.flush(), "directory-flush")
        await _bounded(self.inbox.stop(), "inbox-stop")
        await self.inbox.abandon()
        await _bounded(self.handover.flush(), "handover-flush")
        # The loops also end by the flag: a cancellation swallowed deep in a Redis call (seen
        # once: _reap sleeping on, 'cancelling', with the stop waiting for it) cannot hold
        # the stop, and the wait for them is bounded too.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await _bounded(asyncio.gather(*self._tasks, return_exceptions=True), "tasks")
        await _bounded(self._acking.flush(), "acks")
        await _bounded(self._refreshes.flush(), "refreshes")
        await self.membership.stop()
        settings = self.server.config.cluster
        await _bounded(self._hand_over(), "hand-over", _STOP_STEP + settings.heartbeat * 1.5)
        await self.directory.stop()
        await _bounded(self.redis.aclose(), "redis-close")

    async def _hand_over(self) -> None:
        """Graceful stop (issue 22 item 6): leave, let the other nodes see it (a heartbeat),
        then settle what is left in our inbox ourselves (a message to offline storage, an iq
        answered), under our own reap lock so that no survivor does it as well."""
        me, incarnation = self.name, self.membership.incarnation
        lock = keys.reap(me, incarnation)
        if not await self.redis.set(lock, me, nx=True, px=LOCK_MS):
            log.info("event=cluster-leave-reaped node=%s", me)  # declared dead meanwhile
            await self.membership.leave()
            return
        await self.membership.leave()
        await self._announce()
        await asyncio.sleep(self.server.config.cluster.heartbeat * 1.5)
        entries = self.drained = await self.reaper.drain_stream(me, "node-stopped")
        await self.redis.delete(keys.node_sessions(me, incarnation))
        await self.redis.hdel(keys.INCARNATIONS, keys.incarnation(me, incarnation))
        await self.redis.set(lock, me, px=TOMBSTONE_MS)
        log.info("event=cluster-drained node=%s entries=%d", me, entries)

    async def _reap(self) -> None:
        """Each heartbeat: clean up after incarnations that are gone (reaper.py)."""
        while not self._stopping:
            await asyncio.sleep(self.server.config.cluster.heartbeat)
            try:
                await self.reaper.tick()
                await self.reaper.dead_inboxes(n.decode() for n in
                                               await self.redis.hkeys(keys.NODES))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event=cluster-reap-failed error=%s", type(exc).__name__)

    def _gone(self, node: str, incarnation: str) -> None:
        """Another node's incarnation is no longer live: every module that placed something
        on it hears of it (the MUC/PEP placement re-homes rooms)."""
        log.info("event=cluster-node-died node=%s incarnation=%s", node, incarnation)
        for pending in self.server.hooks.notify_nowait(events.CLUSTER_NODE_DIED, node,
                                                       incarnation):
            asyncio.ensure_future(pending).add_done_callback(_quiet)

    async def _rejoined(self, old: str) -> None:
        """Fenced and joined again: our inbox's group (Redis may have lost it), and the old
        incarnation's leftovers in the background (the heartbeat must go on meanwhile)."""
        await self.inbox.prepare()
        if self.routes is not None:
            self.routes.rejoined()
        task = asyncio.ensure_future(self.reaper.claim_own())
        task.add_done_callback(_quiet)
        self._tasks.append(task)

    async def _reasserted(self) -> None:
        """Redis came back without our state (restarted without persistence): our sessions'
        entries and our inbox's group again; the other nodes reload them (invalidations)."""
        await self.inbox.prepare()
        self.directory.reassert()

    # -- events from this node ---------------------------------------------------------------

    def _presence_changed(self, session: Session, *_args: Any) -> None:
        self.directory.changed(session)

    def _wire_caches(self) -> None:
        """Each per-account cache: its changes published, the others' changes dropped."""
        from server.modules.blocking import Blocking
        from server.modules.carbons import Carbons
        from server.modules.mam import Mam
        from server.modules.vcard import VCard
        from server.modules.visibility import Visibility

        rosters = getattr(self.server, "rosters", None)
        if rosters is not None:
            rosters.changed = functools.partial(self.publish, keys.ROSTER)
            self._caches[keys.ROSTER] = rosters.forget
        for kind, cls in ((keys.BLOCKLIST, Blocking), (keys.HIDDEN, Visibility),
                          (keys.ARCHIVE_PREFS, Mam), (keys.AVATAR, VCard)):
            module = cast("SharedCache | None", self.server.module(cls))
            if module is not None:
                module.changed = functools.partial(self.publish, kind)
                self._caches[kind] = module.forget
        self._carbons = self.server.module(Carbons)  # copies to resources on other nodes

    def publish(self, kind: str, bare: JID) -> asyncio.Future[None]:
        """An account's cached data of this kind changed here: the other nodes drop theirs.
        Awaitable (a module answers once every node was told); it never raises."""
        return self._acking.spawn(self._publish(f"{self.name} {kind} {bare.bare}"))

    async def _publish(self, text: str) -> None:
        ack = f"{keys.ACK}{self.name}:{next(self._ack_numbers)}"
        try:
            heard = await self.redis.publish(keys.INVALIDATE, f"{text} {ack}")
            # Every other subscribed node drops its entry, then says so: wait for all of them
            # (a node that dies meanwhile is not waited for longer than _ACK_WAIT).
            waiting = heard - (1 if self._subscribed else 0)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _ACK_WAIT
            while waiting > 0:
                left = deadline - loop.time()
                if left <= 0 or await self.redis.blpop([ack], timeout=left) is None:
                    log.warning("event=cluster-ack-timeout missing=%d", waiting)
                    break
                waiting -= 1
        except Exception as exc:  # the other nodes drop it when the account goes offline
            log.warning("event=cluster-publish-failed error=%s", type(exc).__name__)

    async def _push_ack(self, ack: str) -> None:
        # A failure is logged (Background); the changing node stops waiting after _ACK_WAIT.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(ack, self.name)
            pipe.expire(ack, int(_ACK_WAIT) + 10)
            await pipe.execute()

    # -- events from the others --------------------------------------------------------------

    async def _listen(self) -> None:
        while not self._stopping:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.INVALIDATE)
                self._subscribed = True
                # Changes made while we were not subscribed.
                await self.directory.resync()
                async for message in pubsub.listen():
                    self._invalidated(message["data"].decode())
            except asyncio.CancelledError:
                self._subscribed = False
                await pubsub.aclose()
                raise
            except Exception as exc:
                self._subscribed = False
                log.warning("event=cluster-invalidation-lost error=%s", type(exc).__name__)
                await pubsub.aclose()
                await asyncio.sleep(1.0)

    def _invalidated(self, text: str) -> None:
        node, _, rest = text.partition(" ")
        kind, _, rest = rest.partition(" ")
        bare, _, ack = rest.partition(" ")
        if node == self.name:
            return
        try:
            self._drop(kind, bare)
        finally:
            if ack:
                self._acking.spawn(self._push_ack(ack))

    def _drop(self, kind: str, bare: str) -> None:
        if kind == keys.MEMBERSHIP:
            self._refreshes.spawn(self.membership.refresh())
            return
        if kind == keys.DIRECTORY:
            self.directory.invalidate(bare)
            return
        placed = self.invalidations.get(kind)  # pubsub/cluster.py's kinds
        if placed is not None:
            placed(bare)
            return
        forget = self._caches.get(kind)
        if forget is None:
            return  # a kind this node does not cache (the module is not loaded here)
        try:
            jid = JID.parse(bare)
        except InvalidJID:
            log.warning("event=cluster-invalidation-bad kind=%s", kind)
            return
        forget(jid)

    def _remote_changed(self, bare: JID) -> None:
        # An account no longer online anywhere: drop what we cached of it here too (the
        # modules keep their caches only while the account is online).
        if not self.directory.is_online(bare):
            for forget in self._caches.values():
                forget(bare)
        if self._carbons is not None:
            self._carbons.remote_changed(bare)

    async def _resync(self) -> None:
        while not self._stopping:
            await asyncio.sleep(_RESYNC)
            try:
                await self.directory.resync()
            except Exception as exc:
                log.warning("event=cluster-resync-failed error=%s", type(exc).__name__)

    async def _fenced(self) -> None:
        """Declared dead (we lost Redis for longer than dead_after): no session may have two
        live owners, so ours end (clients reconnect, to us or another node) and the replica
        starts again from Redis."""
        sessions = self.directory.all()
        log.warning("event=cluster-closing-sessions node=%s count=%d", self.name, len(sessions))
        for session in sessions:
            session.close("system-shutdown", "this node left the cluster; reconnect")
        self.directory.forget_remote()


async def _bounded(step: Awaitable[Any], what: str, timeout: float | None = None) -> None:
    """One step of stopping, given up after timeout seconds or on a Redis error (logged)."""
    try:
        await asyncio.wait_for(step, _STOP_STEP if timeout is None else timeout)
    except TimeoutError:
        log.warning("event=cluster-stop-step-timeout step=%s", what)
    except Exception as exc:
        log.warning("event=cluster-stop-step-failed step=%s error=%s", what,
                    type(exc).__name__)


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("event=cluster-publish-failed error=%s", type(task.exception()).__name__)
