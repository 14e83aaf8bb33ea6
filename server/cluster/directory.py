"""The session directory of a cluster: the local sessions in memory (SessionManager), every
node's in Redis, and a replica of the other nodes' entries in memory so that the directory's
synchronous Protocol (server/sessions.py) answers without a round trip.

Redis holds, per bare JID, the hash presenced:dir:<bare>: resource -> entry (JSON):
    {"n": node, "i": incarnation, "s": session id, "p": priority, "a": available (0/1),
     "r": interested in roster pushes (0/1), "x": the last available presence (XML) or "",
     "f": the session's flags (features it turned on, e.g. carbons), optional}
A node writes only its own entries, in order, from one writer task; each write publishes
"<node> d <bare>" on presenced:invalidate and every other node reloads that bare JID (the
local cache is kept correct by invalidation; a periodic full resync covers a lost message).

Resource conflicts across nodes (RFC 6120 §7.7.2.2) are settled by one atomic script that
swaps the entry in and returns the one it replaced: the older session, wherever it is, gets a
<conflict/> stream error (a "kick" through its node's inbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.cluster import keys
from server.errors import StanzaError
from server.jid import JID
from server.sessions import Session, SessionManager

if TYPE_CHECKING:
    from lxml.etree import _Element

    from server.cluster.handover import Handover
    from server.cluster.inbox import Inbox
    from server.cluster.membership import Membership

log = logging.getLogger("presenced.cluster")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_RETRY = 0.5  # seconds between attempts of a write while Redis is unreachable
_WRITTEN = 1.0  # seconds the inbox waits at most for the directory's earlier writes
_RECHECK = 1.0  # seconds a stanza waits at most for a miss to be looked up again
_BATCH = 256  # accounts whose entries one reload (or resync) pipeline reads


def _unreachable() -> tuple[type[Exception], ...]:
    """What a call raises while Redis cannot be reached (the call is worth trying again)."""
    import redis.exceptions  # only with [cluster]

    return (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


UNREACHABLE = _unreachable()

# KEYS[1] dir hash, KEYS[2] node-sessions set; ARGV: resource, entry, member
_BIND = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return old
"""
# Write (ARGV[2] an entry) or delete (ARGV[2] "") our entry, only while it is still ours
# (ARGV[3], the session id): a newer session of the same resource elsewhere is left alone.
_UPDATE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old or cjson.decode(old)['s'] ~= ARGV[3] then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[4])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""
# Re-assert (ARGV: resource, entry, member, node, session id): our entry again, unless the
# resource has since been bound elsewhere (that newer session wins).
_REASSERT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local e = cjson.decode(old)
  if e['n'] ~= ARGV[4] or e['s'] ~= ARGV[5] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""


class RemoteSession(Session):
    """A session bound on another node, as this node's replica knows it. Its send() goes to
    that node's inbox; its presence, priority and interest are those the node published."""

    __slots__ = ("_inbox", "incarnation", "node", "sid")
    remote = True

    def __init__(self, jid: JID, entry: dict[str, Any], inbox: Inbox) -> None:
        super().__init__(jid, None)
        self.node: str = entry["n"]
        self.incarnation: str = entry["i"]
        self.sid: str = entry["s"]
        self.priority = int(entry.get("p", 0))
        self.interested = bool(entry.get("r"))
        flags = entry.get("f")
        if flags:
            self.flags = frozenset(flags)
        xml = entry.get("x")
        self.presence = etree.fromstring(xml.encode(), _PARSER) if xml else None
        self._inbox = inbox

    @property
    def connected(self) -> bool:
        """Its own node carries it: what a detached session there needs (a push) is that
        node's to decide, not ours."""
        return True

    def send(self, stanza: _Element) -> None:
        self._inbox.send(self, stanza)

    def deliver(self, stanza: _Element) -> None:
        self._inbox.send(self, stanza)

    def close(self, condition: str | None = None, text: str | None = None) -> None:
        self._inbox.kick(self.node, self.jid_str, self.sid)

    def __repr__(self) -> str:
        return f"<RemoteSession {self.jid_str} on {self.node}>"


class ClusterDirectory(SessionManager):
    """SessionDirectory over the cluster: local sessions as SessionManager keeps them, other
    nodes' as RemoteSession proxies (only those of live incarnations)."""

    def __init__(self, max_per_user: int, redis: Any, membership: Membership) -> None:
        super().__init__(max_per_user)
        self.redis = redis
        self.membership = membership
        self.inbox: Inbox  # set by Cluster
        self.handover: Handover  # set by Cluster
        self.sids: dict[Session, str] = {}
        self._remote: dict[JID, dict[str, RemoteSession]] = {}
        self._ops: asyncio.Queue[tuple[str, Session, dict[str, Any] | None]] = asyncio.Queue()
        self._bind = redis.register_script(_BIND)
        self._update = redis.register_script(_UPDATE)
        self._reassert = redis.register_script(_REASSERT)
        self._writer: asyncio.Task[None] | None = None
        # Accounts to read again (insertion-ordered), the one task reading them in batches,
        # and the futures of rechecks waiting for a read that starts after they asked.
        self._stale: dict[JID, None] = {}
        self._reloader: asyncio.Task[None] | None = None
        self._waiting: dict[JID, asyncio.Future[None]] = {}
        self.on_remote_change: Callable[[JID], None] | None = None
        self.rechecks = 0  # misses looked up again in Redis (recheck)
        self._queued = 0   # writes queued so far, and done so far (written())
        self._done = 0
        self._progress = asyncio.Event()

    # -- the Protocol ------------------------------------------------------------------------

    def bind(self, session: Session, requested: str | None) -> JID:
        bare = JID.parse(str(session.jid.bare))
        remote = self._live(bare)
        if len(remote) + len(super().resources(bare)) >= self.max_per_user and not (
                requested and any(r.jid.resource == requested for r in remote)):
            raise StanzaError("resource-constraint", "too many sessions for this account")
        full = super().bind(session, requested)
        # (a session moving here from another node comes with the id it announced there)
        self.sids[session] = self.sids.get(session) or secrets.token_hex(8)
        self._put("bind", session, self.entry(session))
        return full

    def unbind(self, session: Session) -> bool:
        if not super().unbind(session):
            return False
        self._put("unbind", session, None)
        return True

    def get(self, full: JID) -> Session | None:
        local = super().get(full)
        if local is not None or full.resource is None:
            return local
        remote = self._remote.get(full.bare)
        session = remote.get(full.resource) if remote else None
        if session is not None and self.membership.is_live(session.node, session.incarnation):
            return session
        return None

    def resources(self, bare: JID) -> list[Session]:
        local = super().resources(bare)
        if bare not in self._remote:
            return local
        return local + self._live(bare)

    def is_online(self, bare: JID) -> bool:
        return super().is_online(bare) or bool(self._live(bare))

    def release(self, session: Session) -> None:
        """The session moves to another node (handover.py): forget it here without deleting
        its entry in Redis, which the taker overwrites when it binds it (so that the account
        never looks offline meanwhile)."""
        if super().unbind(session):
            self.sids.pop(session, None)

    def moved(self, full: JID, entry: dict[str, Any]) -> None:
        """A session released here is bound on another node now (entry: its directory entry
        there, as the taker announced it): route to it there until the replica reloads."""
        bare = JID.parse(str(full.bare))
        assert full.resource is not None
        self._remote.setdefault(bare, {})[full.resource] = RemoteSession(full, entry, self.inbox)

    def local(self, full: JID) -> Session | None:
        """A session bound on this node."""
        return super().get(full)

    # all() and len(): this node's own sessions (metrics, shutdown, fencing).

    def _live(self, bare: JID) -> list[Session]:
        remote = self._remote.get(bare)
        if not remote:
            return []
        live = self.membership.is_live
        local = self._by_bare.get(bare) or {}  # a resource bound here since: ours wins
        return [s for r, s in remote.items()
                if r not in local and live(s.node, s.incarnation)]

    # -- publishing our sessions -------------------------------------------------------------

    def entry(self, session: Session) -> dict[str, Any]:
        presence = session.presence
        return {"n": self.membership.name, "i": self.membership.incarnation,
                "s": self.sids.get(session, ""), "p": session.priority,
                "a": int(presence is not None), "r": int(session.interested),
                "x": etree.tostring(presence, encoding="unicode") if presence is not None else "",
                "f": sorted(session.flags)}

    def changed(self, session: Session) -> None:
        """The session's presence (or priority, interest) changed: publish it."""
        if session in self.sids and super().get(session.jid) is session:
            self._put("update", session, self.entry(session))

    def reassert(self) -> None:
        """Redis lost our entries: every local session's again, in order with other writes."""
        for session in list(self.sids):
            if super().get(session.jid) is session:
                self._put("reassert", session, self.entry(session))

    def _put(self, op: str, session: Session, entry: dict[str, Any] | None) -> None:
        self._queued += 1
        self._ops.put_nowait((op, session, entry))

    def written(self) -> Awaitable[None] | None:
        """What to await until the writes queued so far are in Redis (not those queued
        meanwhile); None when they are. The inbox flushes a batch after this: a stanza a
        session sent to another node reaches Redis after the session's entry, so that node
        finds it there (recheck) when it answers before its replica caught up. Bounded
        (_WRITTEN): with Redis unreachable the inbox has its own retries."""
        target = self._queued
        if self._done >= target or self._writer is None or self._writer.done():
            return None
        return self._written(target)

    async def _written(self, target: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _WRITTEN
        while self._done < target:
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)

    def start(self) -> None:
        self._writer = asyncio.ensure_future(self._write())

    async def flush(self) -> None:
        """Wait until every queued write is in Redis (graceful stop)."""
        if self._writer is not None and not self._writer.done():
            await self._ops.join()

    async def stop(self) -> None:
        for task in [self._writer, self._reloader]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _write(self) -> None:
        while True:
            op, session, entry = await self._ops.get()
            try:
                # Redis unreachable: the write waits and is tried again, in order (the
                # directory is re-asserted as a whole when Redis comes back empty).
                while True:
                    try:
                        await self._apply(op, session, entry)
                        break
                    except UNREACHABLE as exc:
                        log.warning("event=cluster-directory-write-retry op=%s jid=%s "
                                    "error=%s", op, session.jid_str, type(exc).__name__)
                        await asyncio.sleep(_RETRY)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event=cluster-directory-write-failed op=%s jid=%s", op,
                              session.jid_str)
            finally:
                self._ops.task_done()
                self._done += 1
                self._progress.set()
                self._progress = asyncio.Event()

    async def _apply(self, op: str, session: Session, entry: dict[str, Any] | None) -> None:
        membership = self.membership
        bare, resource = session.bare_str, session.jid.resource or ""
        member = f"{bare}/{resource}"
        owned = keys.node_sessions(membership.name, membership.incarnation)
        if op == "bind":
            assert entry is not None
            old = await self._bind(keys=[keys.directory(bare), owned],
                                   args=[resource, json.dumps(entry), member])
            if old is not None:
                previous = json.loads(old)
                if previous["n"] != membership.name and previous["s"] != entry["s"]:
                    # RFC 6120 §7.7.2.2: the older session is closed with <conflict/>.
                    log.info("event=cluster-conflict jid=%s old_node=%s", session.jid_str,
                             previous["n"])
                    self.inbox.kick(previous["n"], session.jid_str, previous["s"])
        elif op == "reassert":
            await self._reassert(keys=[keys.directory(bare), owned],
                                 args=[resource, json.dumps(entry), member, membership.name,
                                       self.sids.get(session, "")])
        elif op == "update":
            await self._update(keys=[keys.directory(bare), owned],
                               args=[resource, json.dumps(entry), self.sids.get(session, ""),
                                     member])
        else:
            sid = self.sids.pop(session, "")
            await self._update(keys=[keys.directory(bare), owned],
                               args=[resource, "", sid, member])
        await self.redis.publish(keys.INVALIDATE, f"{membership.name} d {bare}")

    # -- the replica of the other nodes' entries ---------------------------------------------

    def invalidate(self, bare_str: str) -> None:
        """Another node changed this account's entries: read them again. One task reads the
        accounts asked for in batches (a pipeline of HGETALLs each, one batch at a time, so one
        account's reads apply in order): a burst of logins on the other nodes costs a round
        trip per batch, not a Redis connection per login (seen with 6 workers: the reloads
        emptied redis-py's pool and starved the heartbeats, and the nodes were fenced)."""
        self._stale[JID.parse(bare_str)] = None
        self._wake()

    def _wake(self) -> None:
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.ensure_future(self._reload())

    async def recheck(self, bare: JID) -> None:
        """The router found no session for a stanza to this account (Router.miss): our
        replica may lag a session bound on another node a moment ago (its invalidation is on
        its way), so the account's entries are read from Redis once more (by a read that
        starts after this call) before the stanza goes to offline storage or is refused. Only
        on a miss: a hit in the replica costs no round trip."""
        done = self._waiting.get(bare)
        if done is None:
            done = self._waiting[bare] = asyncio.get_running_loop().create_future()
        self._stale[bare] = None
        self.rechecks += 1
        self._wake()
        # Bounded: with Redis unreachable the stanza goes on as a miss (the read goes on).
        await asyncio.wait([done], timeout=_RECHECK)

    async def _reload(self) -> None:
        while self._stale:
            batch = list(itertools.islice(self._stale, _BATCH))
            for bare in batch:
                del self._stale[bare]
            # A recheck asked before this read started is answered by it; one that asks
            # while it is in flight waits for the next.
            waiting = [f for bare in batch if (f := self._waiting.pop(bare, None)) is not None]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for bare in batch:
                        pipe.hgetall(keys.directory(str(bare)))
                    answers = await pipe.execute()
                for bare, raw in zip(batch, answers, strict=True):
                    self._set_remote(bare, raw)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the periodic resync reads them again
                log.warning("event=cluster-directory-load-failed accounts=%d error=%s",
                            len(batch), type(exc).__name__)
            finally:
                for future in waiting:
                    if not future.done():
                        future.set_result(None)

    def _set_remote(self, bare: JID, raw: dict[bytes, bytes]) -> None:
        me = self.membership.name
        sessions: dict[str, RemoteSession] = {}
        for resource_b, entry_b in raw.items():
            entry = json.loads(entry_b)
            if entry["n"] == me:
                continue  # our own: SessionManager has them
            resource = resource_b.decode()
            sessions[resource] = RemoteSession(bare.with_resource(resource), entry, self.inbox)
        if sessions:
            self._remote[bare] = sessions
        else:
            self._remote.pop(bare, None)
        if self.on_remote_change is not None:
            self.on_remote_change(bare)

    async def resync(self) -> None:
        """Reload every account's entries (at start, and now and then against a lost
        invalidation)."""
        seen: set[JID] = set()
        found: list[bytes] = []
        async for key in self.redis.scan_iter(match=keys.DIRECTORY_PATTERN, count=500):
            found.append(key)
            if len(found) >= _BATCH:
                await self._read_keys(found, seen)
                found = []
        await self._read_keys(found, seen)
        for bare in [b for b in self._remote if b not in seen]:
            del self._remote[bare]

    async def _read_keys(self, found: list[bytes], seen: set[JID]) -> None:
        """One pipeline for a batch of the resync's directory keys."""
        if not found:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in found:
                pipe.hgetall(key)
            answers = await pipe.execute()
        prefix = len(keys.directory(""))
        for key, raw in zip(found, answers, strict=True):
            bare = JID.parse(key.decode()[prefix:])
            seen.add(bare)
            self._set_remote(bare, raw)

    def forget_remote(self) -> None:
        self._remote.clear()
