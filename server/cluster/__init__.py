"""One domain on several nodes (processes or machines) sharing Redis and PostgreSQL.

Only imported with [cluster] (server/cluster/settings.py); without it the server is the
single process it always was. Pieces:

- membership.py: incarnations, heartbeats with a TTL, fencing and rejoining;
- directory.py: the session directory in Redis behind the SessionDirectory Protocol, with a
  replica of the other nodes' sessions kept by invalidation, conflicts settled atomically;
- inbox.py: one Redis Stream per node for stanzas to sessions on that node;
- keys.py: every key, stream and channel name.

Caches that modules keep per account (rosters, blocklists, hidden lists, archive preferences,
avatar hashes) are dropped on the other nodes when an account changes here: the module calls its
`changed(bare)` callback, which publishes "<node> <kind> <bare>" on the directory's pub/sub
channel, and every other node calls that module's `forget(bare)` (kinds in keys.py).
"""

from __future__ import annotations

# server.config first: it imports settings.py, which imports the option API from it (a
# submodule imported on its own would otherwise meet a half-initialised server.config).
import server.config  # noqa: F401  isort: skip
import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from server.cluster import keys
from server.cluster.directory import ClusterDirectory
from server.cluster.handover import Handover
from server.cluster.inbox import Inbox
from server.cluster.membership import ClusterError, Membership
from server.jid import JID, InvalidJID

if TYPE_CHECKING:
    from server.app import Server
    from server.modules.carbons import Carbons
    from server.router import Router
    from server.sessions import Session

__all__ = ["Cluster", "ClusterError"]

log = logging.getLogger("presenced.cluster")
_RESYNC = 30.0  # seconds between full reloads of the directory replica


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
        self.handover = Handover(self.redis, self.membership, self.inbox, self.directory)
        self.directory.handover = self.handover
        self.directory.on_remote_change = self._remote_changed
        self._tasks: list[asyncio.Task[None]] = []
        self._caches: dict[str, Callable[[JID], None]] = {}  # kind -> forget(bare)
        self._carbons: Carbons | None = None

    def attach(self, router: Router) -> None:
        """The router that undeliverable stanzas go back through (made after the directory)."""
        self.inbox.router = router

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
        await self.inbox.prepare()
        await self.membership.join()
        self.membership.start()
        self.directory.start()
        await self.directory.resync()
        self._tasks.append(asyncio.ensure_future(self._listen()))
        self._tasks.append(asyncio.ensure_future(self._resync()))
        await self.inbox.claim_orphans()
        self.inbox.start()

    async def stop(self) -> None:
        """Graceful: the directory writes and outgoing stanzas are in Redis, then leave."""
        await self.directory.flush()
        await self.inbox.stop()
        await self.handover.flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.membership.leave()
        except Exception as exc:
            log.warning("event=cluster-leave-failed error=%s", type(exc).__name__)
        await self.directory.stop()
        await self.redis.aclose()

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
        return asyncio.ensure_future(self._publish(f"{self.name} {kind} {bare.bare}"))

    async def _publish(self, text: str) -> None:
        try:
            await self.redis.publish(keys.INVALIDATE, text)
        except Exception as exc:  # the other nodes drop it when the account goes offline
            log.warning("event=cluster-publish-failed error=%s", type(exc).__name__)

    # -- events from the others --------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.INVALIDATE)
                # Changes made while we were not subscribed.
                await self.directory.resync()
                async for message in pubsub.listen():
                    self._invalidated(message["data"].decode())
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:
                log.warning("event=cluster-invalidation-lost error=%s", type(exc).__name__)
                await pubsub.aclose()
                await asyncio.sleep(1.0)

    def _invalidated(self, text: str) -> None:
        node, _, rest = text.partition(" ")
        kind, _, bare = rest.partition(" ")
        if node == self.name:
            return
        if kind == keys.DIRECTORY:
            self.directory.invalidate(bare)
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
        while True:
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

