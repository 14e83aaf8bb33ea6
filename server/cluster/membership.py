"""Membership: which nodes are alive, and this node's own incarnation.

Each start (and each rejoin) is a new *incarnation*, a random id. The node holds the key
presenced:node:<name> = incarnation with a TTL of dead_after and refreshes it every heartbeat
through a compare-and-expire script, from a thread of its own (heartbeat.py: a busy event loop
does not make a node dead; a hung one, a frozen or killed process, or one cut off from Redis
does). When the key is gone or holds another incarnation, the node has been declared dead (it
lost Redis, or was paused, longer than dead_after). The thread says so; the event loop, which
reads the live nodes every heartbeat, confirms with a beat of its own and *fences* the node: it
closes its client streams (so that no session has two live owners) and joins again as a new
incarnation. Liveness is read from these keys, never from keyspace expiry events (they fire
late or never).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server.cluster import keys
from server.cluster.heartbeat import BEAT, HeartbeatThread
from server.cluster.settings import ClusterSettings

log = logging.getLogger("presenced.cluster")
_THREAD_STOP = 2.0  # seconds stop() waits for a beat in flight (a no-op once the key is gone)


class ClusterError(ConnectionError):
    """The cluster cannot be joined (Redis unreachable, the node name held by a live node)."""


def new_incarnation() -> str:
    return secrets.token_hex(8)


class Membership:
    def __init__(self, redis: Any, settings: ClusterSettings,
                 sessions: Callable[[], int],
                 fenced: Callable[[], Awaitable[None]]) -> None:
        assert settings.node is not None
        self.redis = redis
        self.name = settings.node
        self.settings = settings
        self.incarnation = new_incarnation()
        self.started = time.time()
        self.live: dict[str, str] = {}  # node -> its live incarnation, as of the last beat
        self._sessions = sessions
        # the MUC rooms this node holds (set by server/modules/muc/cluster.py), for status
        self.room_count: Callable[[], int] = lambda: 0
        self._fenced = fenced
        self._beat = redis.register_script(BEAT)
        # Shared with the heartbeat thread (heartbeat.py), each written by one side only:
        # the incarnation it beats for (None: not joined, or rejoining), the loop's last sign
        # of progress (time.monotonic()), the counts it publishes, and, from the thread, the
        # incarnation whose beat found the key lost.
        self.beating: str | None = None
        self.progress = time.monotonic()
        self.counts: tuple[int, int] = (0, 0)
        self.lost: str | None = None
        assert settings.redis is not None
        self.thread = HeartbeatThread(settings.redis, self)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._refreshing = asyncio.Lock()
        self.on_live_changed: Callable[[], None] | None = None
        # (node, incarnation) of another node's incarnation that stopped being live.
        self.on_gone: Callable[[str, str], None] | None = None
        # After re-asserting our key (Redis lost it, nobody declared us dead).
        self.on_reasserted: Callable[[], Awaitable[None]] | None = None
        # After a rejoin (fenced): the incarnation left behind.
        self.on_rejoined: Callable[[str], Awaitable[None]] | None = None

    @property
    def ttl_ms(self) -> int:
        return int(self.settings.dead_after * 1000)

    async def join(self) -> None:
        """Take the node's key (waiting out a previous incarnation's TTL, e.g. after kill -9);
        ClusterError when a live node keeps it."""
        deadline = time.monotonic() + self.settings.dead_after * 2
        while not await self.redis.set(keys.node(self.name), self.incarnation, nx=True,
                                       px=self.ttl_ms):
            if time.monotonic() > deadline:
                raise ClusterError(f"node name {self.name!r} is held by a live node")
            await asyncio.sleep(self.settings.heartbeat)
        self.started = time.time()
        info = {"incarnation": self.incarnation, "started": self.started}
        await self.redis.hset(keys.NODES, self.name, json.dumps(info))
        # Listed until cleaned up after (reaper.py): by a survivor when it dies, by itself
        # when it stops or its next incarnation joins.
        await self.redis.hset(keys.INCARNATIONS, keys.incarnation(self.name, self.incarnation),
                              json.dumps({"node": self.name, **info}))
        await self.beat()
        self.beating = self.incarnation
        log.info("event=cluster-joined node=%s incarnation=%s", self.name, self.incarnation)

    def start(self) -> None:
        self._progressed()
        self._task = asyncio.ensure_future(self._run())
        self.thread.start()

    def _progressed(self) -> None:
        """The loop is alive: the thread may beat for it (and publishes these counts)."""
        self.progress = time.monotonic()
        self.counts = (self._sessions(), self.room_count())

    async def beat(self) -> bool:
        """Refresh our key from the loop (joining, re-asserting, confirming what the thread
        saw); False when we were declared dead. Then refresh the live view."""
        self._progressed()
        ok = await self._beat(keys=[keys.node(self.name), keys.stats(self.name)],
                              args=[self.incarnation, self.ttl_ms, int(time.time() * 1000),
                                    *self.counts, self.thread.missed])
        await self.refresh()
        return bool(ok)

    async def refresh(self) -> None:
        # One at a time (the heartbeat's and an announcement's): an older read applied after
        # a newer one would bring a dead node back for a beat, and report its death twice.
        async with self._refreshing:
            names = sorted(n.decode() for n in await self.redis.hkeys(keys.NODES))
            values = await self.redis.mget([keys.node(n) for n in names]) if names else []
            self._apply({n: v.decode() for n, v in zip(names, values, strict=True)
                         if v is not None})

    def _apply(self, live: dict[str, str]) -> None:
        if live != self.live:
            gone = [(n, i) for n, i in self.live.items() if live.get(n) != i and n != self.name]
            self.live = live
            if self.on_gone is not None:
                for node, incarnation in gone:
                    self.on_gone(node, incarnation)
            if self.on_live_changed is not None:
                self.on_live_changed()

    def is_live(self, node: str, incarnation: str) -> bool:
        return self.live.get(node) == incarnation

    async def _run(self) -> None:
        """The loop's side of each heartbeat: a sign of progress for the thread, the live
        view read again, and what the thread saw acted upon."""
        # Also ends by the flag: a cancellation swallowed inside a Redis call (Python 3.11's
        # asyncio.timeout can) left this loop beating on, 'cancelling', while stop() waited.
        while not self._stopping:
            await asyncio.sleep(self.settings.heartbeat)
            if self._stopping:
                return
            self._progressed()
            lost = self.lost
            try:
                if lost is None or lost != self.incarnation:
                    await self.refresh()
                else:
                    self.lost = None
                    await self._confirm_lost()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis unreachable: local traffic goes on; try again
                log.warning("event=cluster-refresh-failed node=%s error=%s", self.name,
                            type(exc).__name__)
                if lost == self.incarnation or self.beating != self.incarnation:
                    self.lost = self.incarnation  # confirmed at the next heartbeat

    async def _confirm_lost(self) -> None:
        """The thread found our key lost. Confirmed here first, on the loop's connection (a
        beat of the thread's in flight across a rejoin or a re-assertion may have seen the key
        before it came back); then re-asserted (Redis lost its data) or fenced and rejoined
        (we were declared dead)."""
        if await self.beat():
            self.beating = self.incarnation  # ours after all (a rejoin that failed half-way)
            return
        if await self._lost_by_redis() and await self._reassert():
            return
        await self._rejoin()

    async def _lost_by_redis(self) -> bool:
        """Our key is gone. Declared dead (the key expired: we were cut off or paused longer
        than dead_after), our incarnation is still listed or its reap lock exists (reaper.py);
        when neither is there, Redis lost its data (a restart without persistence) and nobody
        declared us dead."""
        listed = await self.redis.hexists(keys.INCARNATIONS,
                                          keys.incarnation(self.name, self.incarnation))
        reaped = await self.redis.exists(keys.reap(self.name, self.incarnation))
        return not listed and not reaped

    async def _reassert(self) -> bool:
        """Redis lost our state: the same incarnation takes its key again (False when another
        process holds the name meanwhile: then we rejoin)."""
        if not await self.redis.set(keys.node(self.name), self.incarnation, nx=True,
                                    px=self.ttl_ms):
            return False
        info = {"incarnation": self.incarnation, "started": self.started}
        await self.redis.hset(keys.NODES, self.name, json.dumps(info))
        await self.redis.hset(keys.INCARNATIONS, keys.incarnation(self.name, self.incarnation),
                              json.dumps({"node": self.name, **info}))
        log.warning("event=cluster-reasserted node=%s incarnation=%s", self.name,
                    self.incarnation)
        if self.on_reasserted is not None:
            await self.on_reasserted()
        await self.beat()
        self.beating = self.incarnation
        return True

    async def _rejoin(self) -> None:
        old = self.incarnation
        self.beating = None  # the thread waits for the new incarnation's key
        log.warning("event=cluster-fenced node=%s incarnation=%s", self.name, old)
        await self._fenced()
        self.incarnation = new_incarnation()
        try:
            await self.join()
        except ClusterError as exc:
            log.error("event=cluster-rejoin-failed node=%s reason=%s", self.name, exc)
            self.lost = self.incarnation  # tried again at the next heartbeat
            return
        if self.on_rejoined is not None:
            await self.on_rejoined(old)

    async def stop(self) -> None:
        """No more heartbeats (stopping): the thread first (bounded), then the loop's side."""
        self._stopping = True
        self.beating = None
        stopped = (await asyncio.to_thread(self.thread.stop, _THREAD_STOP) if self.thread.alive
                   else self.thread.stop(0))
        if not stopped:
            log.warning("event=cluster-heartbeat-stop-timeout node=%s", self.name)
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.settings.heartbeat + 2.0)

    async def leave(self) -> None:
        """Graceful stop: give the name back at once."""
        await self.stop()
        script = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "redis.call('DEL', KEYS[1]); redis.call('HDEL', KEYS[2], ARGV[2]); "
                  "redis.call('DEL', KEYS[3]) end return 1")
        await self.redis.eval(script, 3, keys.node(self.name), keys.NODES, keys.stats(self.name),
                              self.incarnation, self.name)
        log.info("event=cluster-left node=%s incarnation=%s", self.name, self.incarnation)


async def status(redis: Any) -> list[dict[str, Any]]:
    """Every node that joined: name, incarnation, alive, age (s since start), heartbeat age,
    sessions, rooms, beats missed (since its process started). For `presenced cluster
    status`."""
    now = time.time()
    out = []
    for name_b, info_b in sorted((await redis.hgetall(keys.NODES)).items()):
        name = name_b.decode()
        info = json.loads(info_b)
        live = await redis.get(keys.node(name))
        stats = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.stats(name))).items()}
        beat = int(stats.get("heartbeat", 0)) / 1000
        out.append({
            "node": name,
            "incarnation": info["incarnation"],
            "alive": live is not None and live.decode() == info["incarnation"],
            "age": now - float(info["started"]),
            "heartbeat_age": (now - beat) if beat else None,
            "sessions": int(stats.get("sessions", 0)),
            "rooms": int(stats.get("rooms", 0)),  # the MUC rooms it holds
            "missed": int(stats.get("missed", 0)),  # heartbeats missed (heartbeat.py)
        })
    return out
