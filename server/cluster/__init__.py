"""One domain on several nodes (processes or machines) sharing Redis and PostgreSQL.

Only imported with [cluster] (server/cluster/settings.py); without it the server is the
single process it always was. Pieces:

- membership.py: incarnations, heartbeats with a TTL, fencing and rejoining;
- directory.py: the session directory in Redis behind the SessionDirectory Protocol, with a
  replica of the other nodes' sessions kept by invalidation, conflicts settled atomically;
- inbox.py: one Redis Stream per node for stanzas to sessions on that node;
- keys.py: every key, stream and channel name.

Caches that other nodes must drop when an account changes here (rosters) are invalidated
through the same pub/sub channel as the directory.
"""

from __future__ import annotations

# server.config first: it imports settings.py, which imports the option API from it (a
# submodule imported on its own would otherwise meet a half-initialised server.config).
import server.config  # noqa: F401  isort: skip
import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from server.cluster import keys
from server.cluster.directory import ClusterDirectory
from server.cluster.inbox import Inbox
from server.cluster.membership import ClusterError, Membership
from server.jid import JID, InvalidJID

if TYPE_CHECKING:
    from server.app import Server
    from server.router import Router
    from server.sessions import Session

__all__ = ["Cluster", "ClusterError"]

log = logging.getLogger("presenced.cluster")
_RESYNC = 30.0  # seconds between full reloads of the directory replica


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
        self.directory.on_remote_change = self._remote_changed
        self._tasks: list[asyncio.Task[None]] = []
        # kind -> what drops a module's cache entry when another node says it changed
        # (pubsub/cluster.py: "p" a PEP account's nodes, "q" a pubsub service's)
        self.invalidations: dict[str, Callable[[str], None]] = {}

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
        rosters = getattr(self.server, "rosters", None)
        if rosters is not None:
            rosters.changed = self._roster_changed
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

    def _roster_changed(self, bare: JID) -> None:
        task = asyncio.ensure_future(self.redis.publish(keys.INVALIDATE,
                                                        f"{self.name} r {bare}"))
        task.add_done_callback(_quiet)

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
        if kind == "d":
            self.directory.invalidate(bare)
        elif kind == "r":
            rosters = getattr(self.server, "rosters", None)
            if rosters is not None:
                with contextlib.suppress(InvalidJID):
                    rosters.forget(JID.parse(bare))
        else:
            forget = self.invalidations.get(kind)
            if forget is not None:
                forget(bare)

    def _remote_changed(self, bare: JID) -> None:
        # An account no longer online anywhere: drop its cached roster here too.
        rosters = getattr(self.server, "rosters", None)
        if rosters is not None and not self.directory.is_online(bare):
            rosters.forget(bare)

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


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("event=cluster-publish-failed error=%s", type(task.exception()).__name__)
