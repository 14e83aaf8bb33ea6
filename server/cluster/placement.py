"""Placement: things that live on exactly one node of the cluster (MUC rooms), found and
claimed through Redis, moved to a survivor when their node dies.

Each placed thing has a name (a room's bare JID) and one *owner*, "<node>:<incarnation>",
held in presenced:<kind>:<name>. The owner is chosen by rendezvous hashing (highest random
weight) over the live nodes, and *claimed* by one compare-and-set script that writes the
claim only while no live incarnation holds it: two nodes never both own a thing (fencing: a
claim is bound to an incarnation, and a node that lost its incarnation drops what it held).
A node that dies leaves its claims behind; they are taken over by the node the hashing picks
among the survivors, at once (the survivors read the dead incarnation's set of claims) or at
the latest by the next stanza for the thing.

Every stanza for a thing that reaches a node that does not own it is forwarded to the
owner's inbox stream (inbox.py, entry kind "v"), in order behind what the node sent there
before; the owner handles it as if it had arrived there (without the router's filter/user
chain, which ran on the first node). Node → owner is cached while the owner lives; a stanza
that reaches a node that no longer owns the thing is forwarded on (at most _HOPS times).

The host (the module that places things: server/modules/muc/cluster.py) does the rest:
handle(stanza, to, origin) as owner, adopt(name) when it becomes the owner, died(owners)
when other incarnations die, drop_all() when this node loses its incarnation, exists(name).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from lxml import etree

from server.cluster import keys
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int

if TYPE_CHECKING:
    from lxml.etree import _Element

    from server.cluster import Cluster
    from server.sessions import Session

log = logging.getLogger("presenced.cluster")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_HOPS = 3       # forwards of one stanza between nodes whose views of the owner disagree
_ATTEMPTS = 3   # claims tried (the membership view refreshed between them)

# KEYS[1] the claim. ARGV[1] the owner wanted ("<node>:<incarnation>"), ARGV[2] the prefix of
# node keys (presenced:node:), ARGV[3] the prefix of the claim sets (presenced:placed:<kind>:),
# ARGV[4] the name. Returns the owner: the live one already there, or ARGV[1] now; nil when
# the wanted incarnation is not live itself (the caller's view of the membership is stale).
CLAIM_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local node, inc = string.match(cur, '^([^:]*):(.*)$')
  if node and redis.call('GET', ARGV[2] .. node) == inc then return cur end
end
local node, inc = string.match(ARGV[1], '^([^:]*):(.*)$')
if redis.call('GET', ARGV[2] .. node) ~= inc then return false end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', ARGV[3] .. ARGV[1], ARGV[4])
if cur then redis.call('SREM', ARGV[3] .. cur, ARGV[4]) end
return ARGV[1]
"""
# KEYS[1] the claim, KEYS[2] the owner's claim set; ARGV[1] the owner, ARGV[2] the name.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""


def weight(node: str, name: str) -> bytes:
    return hashlib.blake2b(f"{node}\0{name}".encode(), digest_size=8).digest()


def rendezvous(name: str, nodes: Any) -> str | None:
    """The node (by name: a restarted node gets its things back as they free up) with the
    highest weight for `name` (HRW hashing: when a node goes, only its things move)."""
    return max(nodes, key=lambda node: weight(node, name), default=None)


class Host(Protocol):
    def handle(self, stanza: _Element, to: JID, origin: str) -> Any:
        """As the owner: the stanza, from a session of incarnation `origin` (or a server
        stream there); returns like a route function."""

    async def adopt(self, name: str) -> None:
        """This node has just become the owner: its state from the database and the mirror."""

    def exists(self, name: str) -> bool:
        """As the owner: whether the thing is there (a room that nobody made yet is not)."""

    def died(self, owners: set[str]) -> None:
        """These incarnations ("<node>:<incarnation>") died."""

    def drop_all(self) -> None:
        """This node lost its incarnation: whatever it owned is no longer its own."""

    async def handing_over(self, names: list[str]) -> None:
        """Graceful stop: these things go to other nodes; what the next owner needs is
        written (the mirror) and this node's copy dropped, without a word to anyone."""


class Placement:
    def __init__(self, cluster: Cluster, kind: str, host: Host) -> None:
        self.cluster = cluster
        self.kind = kind
        self.host = host
        self.redis = cluster.redis
        self.membership = cluster.membership
        self.owned: set[str] = set()
        self._owners: dict[str, tuple[str, str]] = {}  # name -> (node, incarnation), cached
        self._queues: dict[str, list[tuple[_Element, JID, str, Session | None, int,
                                           asyncio.Future[Any] | None]]] = {}
        self._claim = self.redis.register_script(CLAIM_SCRIPT)
        self._release = self.redis.register_script(RELEASE_SCRIPT)
        self._live: dict[str, str] = {}
        self._incarnation = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._releasing: dict[str, asyncio.Future[None]] = {}  # name -> its release, under way
        self.closing = False
        cluster.inbox.placed[kind] = self.received
        previous = self.membership.on_live_changed

        def changed() -> None:
            if previous is not None:
                previous()
            self._live_changed()
        self.membership.on_live_changed = changed

    @property
    def me(self) -> str:
        return f"{self.membership.name}:{self.membership.incarnation}"

    # -- stanzas ---------------------------------------------------------------------------

    def route(self, name: str, stanza: _Element, origin: Session | None, to: JID) -> Any:
        """A stanza for `name` that arrived at this node (the service's route function)."""
        if name in self.owned:
            if name not in self._queues:  # (queued: being adopted)
                return self.host.handle(stanza, to, self.me)
        elif (owner := self._owners.get(name)) is not None and self.membership.is_live(*owner):
            self.cluster.inbox.forward(owner[0], self.kind, name,
                                       etree.tostring(stanza, encoding="unicode"))
            return True
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(name, stanza, to, self.me, origin, 0, done)
        return done

    def received(self, fields: dict[str, str]) -> asyncio.Future[Any] | None:
        """A "v" entry of our inbox: a stanza another node forwarded for `name` (or one that
        was forwarded to a node that died before it read it: the reaper settles it here).
        Returns, when the stanza has to wait, what is done once it was handled or sent on."""
        name = fields.get("j", "")
        # "<node>:<incarnation>" of the node the stanza first arrived at
        origin = fields.get("o") or fields.get("m", "").rpartition(":")[0]
        if fields.get("a"):
            # A stopping node handed `name` over to us (hand_over): taken over now, so that
            # its occupants elsewhere go on without waiting for the next stanza.
            if name in self.owned:
                return None
            try:
                to = JID.parse(name)
            except InvalidJID:
                log.warning("event=placement-entry-bad kind=%s name=%s", self.kind, name)
                return None
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._enqueue(name, _NOTHING, to, origin, None, 0, done)
            return done
        try:
            stanza = etree.fromstring(fields["x"], _PARSER)
            to = JID.parse(stanza.get("to", ""))
        except (KeyError, etree.XMLSyntaxError, InvalidJID):
            log.warning("event=placement-entry-bad kind=%s name=%s", self.kind, name)
            return None
        try:
            hops = parse_int(fields.get("h", "0"), maximum=_HOPS, name="h")
        except NumberError:
            hops = _HOPS
        # (A sender on another node that our directory replica does not know yet — its bind
        # and its first stanzas travel apart — is found by what the room answers it: the
        # router reads the directory in Redis on a miss, Router.miss.)
        if name in self.owned and name not in self._queues:
            result = self._handle(stanza, to, origin, None)
            if inspect.isawaitable(result):
                # What comes next for it waits until this is done: the stanzas of one
                # stream reach the room in order (a groupchat message waits for its
                # archive id, and the next must not overtake it).
                self._queues[name] = []
                self._spawn(self._after(name, result, stanza))
            return None
        if name not in self.owned:
            self._owners.pop(name, None)  # we were thought the owner: our view may be stale
            hops += 1
        waited: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(name, stanza, to, origin, None, hops, waited)
        return waited

    def _enqueue(self, name: str, stanza: _Element, to: JID, origin: str,
                 session: Session | None, hops: int, done: asyncio.Future[Any] | None) -> None:
        """Stanzas for a thing whose owner is being looked up wait, in order, for the
        answer."""
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = []
            self._spawn(self._resolve(name))
        queue.append((stanza, to, origin, session, hops, done))

    async def _resolve(self, name: str) -> None:
        error: BaseException | None = None
        owner: tuple[str, str] | None = None
        try:
            owner = await self.owner(name)
            if owner == (self.membership.name, self.membership.incarnation) and (
                    name not in self.owned):
                self.owned.add(name)
                try:
                    await self.host.adopt(name)
                except BaseException:
                    self.owned.discard(name)
                    raise
                log.info("event=placement-adopted kind=%s name=%s", self.kind, name)
        except Exception as exc:
            error = exc
            if not isinstance(exc, StanzaError):
                log.warning("event=placement-failed kind=%s name=%s error=%s", self.kind, name,
                            type(exc).__name__)
        await self._dispatch(name, owner, error)

    async def _after(self, name: str, pending: Awaitable[Any], stanza: _Element) -> None:
        await self._finish(pending, stanza, None)
        await self._run(name)

    async def _run(self, name: str) -> None:
        """As the owner: what waits for `name`, handled one at a time, in order (each one's
        handling done before the next starts)."""
        queue = self._queues.get(name, [])
        while queue:
            if name not in self.owned:  # handed over or dropped meanwhile: the rest goes on
                self._spawn(self._resolve(name))
                return
            stanza, to, origin, session, _hops, done = queue.pop(0)
            if stanza is not _NOTHING:
                result = self._handle(stanza, to, origin, session)
                if inspect.isawaitable(result):
                    await self._finish(result, stanza, session)
            if done is not None and not done.done():
                done.set_result(True)
        if self._queues.get(name) is queue:
            del self._queues[name]

    def _handle(self, stanza: _Element, to: JID, origin: str, session: Session | None) -> Any:
        """Handled here as the owner; an awaitable when it goes on (its result then goes to
        _finish), else done (an error answered)."""
        try:
            result = self.host.handle(stanza, to, origin)
        except StanzaError as err:
            self.cluster.inbox.router.reply_error(stanza, err, session)
            return None
        except Exception:
            log.exception("event=placement-handler-failed kind=%s", self.kind)
            self.cluster.inbox.router.reply_error(stanza, StanzaError("internal-server-error"),
                                                  session)
            return None
        if inspect.isawaitable(result):
            return result
        self._complete(stanza, result, session)
        return None

    async def _dispatch(self, name: str, owner: tuple[str, str] | None,
                        error: BaseException | None) -> None:
        """What waited for `name`'s owner: handled here (in order), forwarded there, or
        refused."""
        if error is None and owner is not None and owner[0] == self.membership.name and (
                name in self.owned):
            await self._run(name)
            return
        queue = self._queues.pop(name, [])
        for stanza, to, origin, session, hops, done in queue:
            if stanza is _NOTHING:
                if done is not None and not done.done():
                    done.set_result(True)
                continue
            try:
                if error is not None or owner is None:
                    raise error if isinstance(error, StanzaError) else StanzaError(
                        "internal-server-error", "the room's node cannot be found",
                        type="wait")
                if owner[0] == self.membership.name:
                    self._complete(stanza, self.host.handle(stanza, to, origin), session)
                elif hops >= _HOPS:
                    log.warning("event=placement-loop kind=%s name=%s", self.kind, name)
                else:
                    self._forward(owner[0], name, stanza, origin, hops)
            except StanzaError as err:
                self.cluster.inbox.router.reply_error(stanza, err, session)
            except Exception:
                log.exception("event=placement-handler-failed kind=%s name=%s", self.kind, name)
            if done is not None and not done.done():
                done.set_result(True)

    def _forward(self, node: str, name: str, stanza: _Element, origin: str, hops: int) -> None:
        fields = {"k": "v", "p": self.kind, "j": name,
                  "x": etree.tostring(stanza, encoding="unicode")}
        if hops:
            fields["h"] = str(hops)
        if origin != self.me:
            # Forwarded on: the owner must see the first sender's incarnation, not ours.
            fields["o"] = origin
        self.cluster.inbox.send_fields(node, fields)

    def _complete(self, stanza: _Element, result: Any, session: Session | None) -> None:
        """The result of handling, as the router treats a route function's."""
        router = self.cluster.inbox.router
        if result is None:
            if not (stanza.get("type") in ("error", "headline", "groupchat") or (
                    stanza.tag == st.IQ and stanza.get("type") == "result")):
                router.reply_error(stanza, StanzaError("service-unavailable"), session)
        elif etree.iselement(result):
            router.reply(result, session)
        elif inspect.isawaitable(result):
            router.spawn(self._finish(result, stanza, session))

    async def _finish(self, pending: Awaitable[Any], stanza: _Element,
                      session: Session | None) -> None:
        router = self.cluster.inbox.router
        try:
            result = await pending
        except StanzaError as err:
            router.reply_error(stanza, err, session)
            return
        except Exception:
            log.error("event=placement-handler-failed kind=%s id=%s error=%s", self.kind,
                      stanza.get("id"), type(sys.exc_info()[1]).__name__)
            router.reply_error(stanza, StanzaError("internal-server-error"), session)
            return
        if etree.iselement(result):
            router.reply(result, session)

    # -- owners ----------------------------------------------------------------------------

    async def owner(self, name: str) -> tuple[str, str]:
        """The live owner of `name`, claimed for the node the hashing picks when none is."""
        releasing = self._releasing.get(name)
        if releasing is not None:
            await asyncio.shield(releasing)
        for _attempt in range(_ATTEMPTS):
            live = self.membership.live
            if self.closing:  # stopping: our things go to the others (hand_over)
                live = {n: i for n, i in live.items() if n != self.membership.name}
            node = rendezvous(name, live)
            if node is not None:
                got = await self._claim(
                    keys=[keys.placed(self.kind, name)],
                    args=[f"{node}:{live[node]}", keys.node(""),
                          keys.placed_by(self.kind, ""), name])
                if got is not None:
                    owner_node, _, incarnation = got.decode().partition(":")
                    self._owners[name] = (owner_node, incarnation)
                    return owner_node, incarnation
            await self.membership.refresh()
        raise StanzaError("internal-server-error", "no live node takes this room", type="wait")

    async def release(self, name: str) -> None:
        """`name` is gone here (an empty temporary room, a refused join's claim of nothing):
        its claim goes too. Dropped from `owned` at once; a claim of `name` meanwhile waits
        until the release is done (it would find its own claim and keep it, then lose it)."""
        self.owned.discard(name)
        self._owners.pop(name, None)
        me = self.me
        done = self._releasing[name] = asyncio.get_running_loop().create_future()
        try:
            await self._release(keys=[keys.placed(self.kind, name),
                                      keys.placed_by(self.kind, me)], args=[me, name])
        finally:
            done.set_result(None)
            if self._releasing.get(name) is done:
                del self._releasing[name]

    async def release_all(self) -> None:
        """Graceful stop: our claims go (what we held is re-claimed by the next stanza)."""
        for name in list(self.owned):
            await self.release(name)

    async def hand_over(self) -> int:
        """Graceful stop (after close()): each thing we own, and each stanza waiting here for
        an owner, goes to the node the hashing picks among the others — claimed for it, told
        to take it over at once (an "a" entry), then the waiting stanzas behind, in order.
        The host has written what the new owner needs (the mirror) and dropped its copy.
        How many things were handed over."""
        names = sorted(self.owned)
        for name in names:
            self._queues.setdefault(name, [])  # what arrives meanwhile waits, in order
        await self.host.handing_over(names)
        handed = 0
        for name in sorted(set(self._queues) | set(names)):
            owner: tuple[str, str] | None = None
            error: BaseException | None = None
            try:
                if name in self.owned:
                    await self.release(name)
                owner = await self.owner(name)
                if name in names:
                    self.cluster.inbox.send_fields(
                        owner[0], {"k": "v", "p": self.kind, "j": name, "a": "1"})
                    handed += 1
            except Exception as exc:
                error = exc
                log.warning("event=placement-hand-over-failed kind=%s name=%s error=%s",
                            self.kind, name, type(exc).__name__)
            await self._dispatch(name, owner, error)
        if names:
            log.info("event=placement-handed-over kind=%s count=%d", self.kind, handed)
        return handed

    # -- membership ------------------------------------------------------------------------

    def close(self) -> None:
        """The server is stopping: no more take-overs (they would read the database while it
        closes), the work under way cancelled."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()

    def _live_changed(self) -> None:
        if self.closing:
            return
        live = dict(self.membership.live)
        before, self._live = self._live, live
        if self._incarnation and self.membership.incarnation != self._incarnation:
            # Fenced: we were declared dead; what we owned has been (or may be) taken over.
            log.warning("event=placement-dropped kind=%s count=%d", self.kind, len(self.owned))
            self.owned.clear()
            self._owners.clear()
            self.host.drop_all()
        first = not self._incarnation
        self._incarnation = self.membership.incarnation
        me = self.membership.name
        # Our own incarnation gone from the view means we are being fenced (above, once the
        # membership rejoins): not a death for us to clean up after.
        dead = {f"{node}:{inc}" for node, inc in before.items()
                if live.get(node) != inc and node != me}
        if dead:
            for name in [n for n, (node, inc) in self._owners.items()
                         if f"{node}:{inc}" in dead]:
                del self._owners[name]
            self.host.died(dead)
        if dead or first:
            # Also at our start: an earlier incarnation of ours (kill -9, restarted within
            # dead_after) or a survivor that died before it re-homed left claims behind.
            self._spawn(self._sweep())

    async def _sweep(self) -> None:
        """Every dead incarnation's claims: those the hashing gives us, taken over."""
        prefix = keys.placed_by(self.kind, "")
        try:
            async for raw in self.redis.scan_iter(match=prefix + "*", count=500):
                owner = raw.decode()[len(prefix):]
                node, _, incarnation = owner.partition(":")
                if owner != self.me and not self.membership.is_live(node, incarnation):
                    await self._rehome(owner)
        except Exception as exc:
            log.warning("event=placement-sweep-failed kind=%s error=%s", self.kind,
                        type(exc).__name__)

    async def _rehome(self, owner: str) -> None:
        """A dead incarnation's claims: those the hashing gives us, taken over now (so that
        the occupants elsewhere hear at once who went with the node)."""
        try:
            names = await self.redis.smembers(keys.placed_by(self.kind, owner))
            for raw in names:
                name = raw.decode()
                if rendezvous(name, self.membership.live) != self.membership.name:
                    continue
                done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                if name not in self._queues:
                    self._queues[name] = []
                    self._spawn(self._resolve(name))
                self._queues[name].append((_NOTHING, JID.parse(name), self.me, None, 0, done))
                await done
                if name not in self.owned:  # claimed by another live node meanwhile
                    await self.redis.srem(keys.placed_by(self.kind, owner), name)
                elif not self.host.exists(name):
                    await self.release(name)  # a claim of nothing: not kept
        except Exception as exc:
            log.warning("event=placement-rehome-failed kind=%s owner=%s error=%s", self.kind,
                        owner, type(exc).__name__)

    def _spawn(self, pending: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(pending)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


_NOTHING = etree.Element("nothing")  # a re-homing without a stanza to hand over
