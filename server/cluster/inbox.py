"""Routing between nodes: one Redis Stream per node, presenced:inbox:<node>.

A stanza for a session on another node is serialised once and added (XADD) to that node's
stream; the node reads its stream through the consumer group "presenced" (XREADGROUP, one
consumer per incarnation), hands each stanza to the local session and acknowledges and
deletes it (XACK, XDEL) after the hand-over. Entries are written in order from one flusher
task on one connection (a pipeline per batch), so stanzas from one sender reach a node in the
order they were routed; a batch Redis refused is retried in front of the rest. Delivery is at
least once: entries left unacknowledged by an earlier incarnation are claimed (XAUTOCLAIM) at
start, or settled by the node that reaps it (reaper.py); each entry carries an id ("m") and
duplicates are dropped.

Entry fields:
    k  "s": a stanza for a session, "c": close that session with <conflict/>,
       "v": a stanza for something placed on that node (a MUC room, a component), with
       p  its kind ("room": placement.py; "component": routes.py) and j its name (the bare JID)
    j  the session's full JID          s  its session id (a newer session of the JID: not it)
    x  the stanza (XML, jabber:client) m  "<node>:<incarnation>:<counter>", unique
    f  "1": forwarded once already (the session had moved to another node), not again
Several entries for one node written in one flush travel as one stream entry whose only field
"*" holds them all (records(): RS between entries, US between names and values), in order.
A stanza whose session is gone (closed since, or on a node that is dead) is handled as if the
resource were offline: a message goes to offline storage (message/offline), an iq get/set is
answered with service-unavailable (RFC 6121 §8.5.3.2.1), presence and iq results are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from lxml import etree

from server.cluster import keys
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.xml import ns
from server.xml import stanza as st
from server.xml.writer import serialize

if TYPE_CHECKING:
    from lxml.etree import _Element

    from server.cluster.directory import ClusterDirectory, RemoteSession
    from server.cluster.membership import Membership
    from server.router import Router

log = logging.getLogger("presenced.cluster")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_SEEN = 10_000      # entry ids remembered against duplicates
_BATCH = 256        # entries read at once
_MAXLEN = 1_000_000  # an inbox nobody reads (a dead node's) is trimmed, approximately
_RETRY = 0.5        # seconds between attempts to add entries while Redis is unreachable
_GIVE_UP = 30.0     # seconds of attempts before entries are settled as undeliverable


class Inbox:
    def __init__(self, redis: Any, membership: Membership, directory: ClusterDirectory) -> None:
        self.redis = redis
        self.membership = membership
        self.directory = directory
        self.router: Router  # set by Cluster.attach
        self._pending: list[tuple[str, dict[str, str]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._counter = itertools.count(1)
        self._seen: OrderedDict[str, None] = OrderedDict()
        # Entry kinds other than stanzas and kicks -> their handler (handover.py: "h")
        self.commands: dict[str, Callable[[dict[str, str]], None]] = {}
        # kind -> the handler of "v" entries (placement.py registers one per kind it places);
        # what it returns, when not None, is done once the stanza was handled or forwarded
        self.placed: dict[str, Callable[[dict[str, str]], Awaitable[Any] | None]] = {}
        self.sent = 0      # entries added to other nodes' inboxes
        self.received = 0  # entries handed over from ours

    # -- out ---------------------------------------------------------------------------------

    def send(self, session: RemoteSession, stanza: _Element) -> None:
        if not self.membership.is_live(session.node, session.incarnation):
            self.undeliverable(stanza, session.jid, "node-gone")
            return
        # serialize(): a copy from addressed_copies (a room's groupchat message, a pubsub
        # notification) is its template's bytes with its 'to' put in, not serialised anew.
        self._add(session.node, {"k": "s", "j": session.jid_str, "s": session.sid,
                                 "x": serialize(stanza, ns.CLIENT).decode()})

    def kick(self, node: str, jid: str, sid: str) -> None:
        self._add(node, {"k": "c", "j": jid, "s": sid})

    def command(self, node: str, fields: dict[str, str]) -> None:
        """An entry for a handler in self.commands on that node (in order with stanzas)."""
        self._add(node, fields)

    def forward(self, node: str, kind: str, name: str, xml: str) -> None:
        """A stanza for something `node` owns (placement.py), in order after what this node
        sent there before."""
        self._add(node, {"k": "v", "p": kind, "j": name, "x": xml})

    def send_fields(self, node: str, fields: dict[str, str]) -> None:
        """An entry of another kind (placement.py adds "h", "o" to a "v" entry)."""
        self._add(node, fields)

    def _add(self, node: str, fields: dict[str, str]) -> None:
        membership = self.membership
        fields["m"] = f"{membership.name}:{membership.incarnation}:{next(self._counter)}"
        self._pending.append((keys.inbox(node), fields))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            # The directory's writes queued before these entries first: a session bound
            # here a moment ago is in Redis before its first stanzas reach another node.
            earlier = self.directory.written()
            if earlier is not None:
                await earlier
            pipe = self.redis.pipeline(transaction=False)
            for stream, entry in _entries(batch):
                pipe.xadd(stream, entry, maxlen=_MAXLEN, approximate=True)
            try:
                await pipe.execute()
                self.sent += len(batch)
                failing_since = None
            except Exception as exc:
                # Redis unreachable: the batch goes back in front (order per sender kept) and
                # is tried again; after _GIVE_UP seconds it is settled as if the other node
                # were gone (messages to offline storage), so nothing accepted is lost. An
                # entry that did reach Redis before the error is added twice: at least once,
                # the receiving node drops the duplicate by its id.
                now = loop.time()
                failing_since = now if failing_since is None else failing_since
                log.warning("event=cluster-send-failed count=%d error=%s", len(batch),
                            type(exc).__name__)
                if now - failing_since < _GIVE_UP:
                    self._pending[:0] = batch
                    await asyncio.sleep(_RETRY)
                    continue
                for _stream, fields in batch:
                    if fields["k"] == "s":
                        self.undeliverable(etree.fromstring(fields["x"], _PARSER),
                                           JID.parse(fields["j"]), "redis-unreachable")

    async def flush(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def abandon(self) -> None:
        """Stopping while Redis is unreachable: what could not be added to another node's
        inbox is settled here (a message to offline storage) instead of lost."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        batch, self._pending = self._pending, []
        for _stream, fields in batch:
            if fields["k"] != "s":
                continue
            done = self.undeliverable(etree.fromstring(fields["x"], _PARSER),
                                      JID.parse(fields["j"]), "stopping", spawn=False)
            if done is not None:
                with contextlib.suppress(StanzaError):
                    await done

    # -- in ----------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """The node's stream and consumer group (kept across restarts)."""
        try:
            await self.redis.xgroup_create(keys.inbox(self.membership.name), keys.GROUP,
                                           id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    async def stop(self) -> None:
        """Stop reading; the stanzas queued for other nodes go out (the caller bounds it)."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.flush()

    async def claim_orphans(self) -> None:
        """Entries an earlier incarnation read but did not acknowledge (it died or was
        fenced): ours now. Their sessions are gone, so they take the undeliverable path."""
        stream = keys.inbox(self.membership.name)
        start = "0-0"
        while True:
            answer = await self.redis.xautoclaim(stream, keys.GROUP, self.membership.incarnation,
                                                 0, start, count=_BATCH)
            start, entries = answer[0], answer[1]
            await self._handle(stream, [(i, f) for i, f in entries if f])
            if start in (b"0-0", "0-0") or not entries:
                return

    async def _read(self) -> None:
        stream = keys.inbox(self.membership.name)
        # "0": first the entries this incarnation read and did not acknowledge, then ">": new
        # ones. Again after a failure: a reply lost to a timeout (a busy event loop overran
        # the socket timeout while Redis had answered) or an acknowledgement that failed left
        # entries read and never handed over; read again from there (duplicates are dropped).
        since = "0"
        while True:
            try:
                answer = await self.redis.xreadgroup(
                    keys.GROUP, self.membership.incarnation, {stream: since}, count=_BATCH,
                    block=1000 if since == ">" else None)
                entries = [entry for _stream, found in answer or () for entry in found]
                if since != ">":
                    since = entries[-1][0] if entries else ">"
                    gone = [entry_id for entry_id, raw in entries if not raw]  # deleted since
                    if gone:
                        await self.redis.xack(stream, keys.GROUP, *gone)
                    entries = [(entry_id, raw) for entry_id, raw in entries if raw]
                await self._handle(stream, entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                since = "0"
                if "NOGROUP" in str(exc):
                    await self.prepare()
                    continue
                log.warning("event=cluster-read-failed error=%s", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _handle(self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        if not entries:
            return
        for _entry_id, raw in entries:
            for fields in records(raw):
                self.received += 1
                try:
                    stored = self._hand_over(fields)
                    if stored is not None:
                        # In order: offline storage keeps a sender's messages as they came.
                        with contextlib.suppress(StanzaError):
                            await stored
                except Exception:
                    log.exception("event=cluster-entry-failed")
        ids = [entry_id for entry_id, _ in entries]
        # Acknowledged and deleted at once: the stream holds only entries not yet handed
        # over (unread, or read by an incarnation that died before this), which is what a
        # survivor settles and what XLEN counts.
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(stream, keys.GROUP, *ids)
        pipe.xdel(stream, *ids)
        await pipe.execute()

    def _hand_over(self, fields: dict[str, str]) -> Awaitable[Any] | None:
        if not self._first(fields.get("m", "")):
            return None  # at least once: a duplicate
        kind = fields.get("k", "")
        if kind == "v":
            handler = self.placed.get(fields.get("p", ""))
            if handler is not None:
                handler(fields)
            return None
        command = self.commands.get(kind)
        if command is not None:
            command(fields)
            return None
        try:
            to = JID.parse(fields["j"])
        except (KeyError, InvalidJID):
            log.warning("event=cluster-entry-bad id=%s", fields.get("m", ""))
            return None
        session = self.directory.local(to)
        current = session is not None and self.directory.sids.get(session) == fields.get("s")
        if fields.get("k") == "c":
            if session is not None and current:
                # RFC 6120 §7.7.2.2: a newer session took the resource on another node.
                session.close("conflict", "replaced by a new session with the same resource")
            return None
        stanza = etree.fromstring(fields["x"], _PARSER)
        if session is not None and current:
            session.send(stanza)
            return None
        moved = self.directory.get(to) if not fields.get("f") else None
        if moved is not None and moved.remote:
            # The session moved to another node since (XEP-0198 resumption there,
            # handover.py): forwarded once, with the id it has there.
            self._add(moved.node, {"k": "s", "j": fields["j"], "s": moved.sid,  # type: ignore[attr-defined]
                                   "x": fields["x"], "f": "1"})
            return None
        return self.undeliverable(stanza, to, "session-gone", spawn=False)

    async def settle(self, raw: dict[bytes, bytes], reason: str) -> int:
        """An entry of a stream no session will read (its node or incarnation is gone):
        undeliverable, once (reaper.py). How many records it held."""
        try:
            unpacked = records(raw)
        except (KeyError, ValueError):
            log.warning("event=cluster-entry-bad reason=%s", reason)
            return 0
        for fields in unpacked:
            await self._settle(fields, reason)
        return len(unpacked)

    async def _settle(self, fields: dict[str, str], reason: str) -> None:
        kind = fields.get("k")
        if kind == "v":
            await self._replace(fields, reason)
            return
        try:
            if kind != "s" or not self._first(fields.get("m", "")):
                return
            stanza = etree.fromstring(fields["x"], _PARSER)
            to = JID.parse(fields["j"])
        except (KeyError, ValueError, InvalidJID, etree.XMLSyntaxError):
            log.warning("event=cluster-entry-bad reason=%s", reason)
            return
        done = self.undeliverable(stanza, to, reason, spawn=False)
        if done is not None:
            try:
                await done
            except StanzaError as err:  # offline storage full: the sender hears of it
                self.router.reply_error(stanza, err, None)

    async def _replace(self, fields: dict[str, str], reason: str) -> None:
        """A stanza forwarded to a room's owner that died (or stopped) before it read it:
        placement hands it to the room's new owner (claimed for the node the hashing picks
        among the live ones), in the order of the stream, instead of losing it."""
        if not self._first(fields.get("m", "")):
            return
        handler = self.placed.get(fields.get("p", ""))
        if handler is None:
            log.info("event=cluster-undeliverable stanza=placed kind=%s reason=%s",
                     fields.get("p", ""), reason)
            return
        done = handler(fields)
        if done is not None:
            with contextlib.suppress(Exception):
                await done

    def _first(self, ident: str) -> bool:
        """False for an entry id seen before (at least once: a duplicate)."""
        if ident in self._seen:
            return False
        self._seen[ident] = None
        if len(self._seen) > _SEEN:
            self._seen.popitem(last=False)
        return True

    def undeliverable(self, stanza: _Element, to: JID, reason: str,
                      spawn: bool = True) -> Awaitable[Any] | None:
        """The session a stanza was for is gone: as if its resource were offline. A message's
        storing is spawned (or returned, spawn=False)."""
        tag = stanza.tag
        kind = stanza.get("type")
        log.info("event=cluster-undeliverable to=%s stanza=%s type=%s reason=%s", to,
                 etree.QName(tag).localname, kind, reason)
        if tag == st.MESSAGE:
            if kind in ("error", "groupchat", "headline"):
                return None  # RFC 6121 §8.5.3.2.1: errors ignored, groupchat/headline dropped
            stored = self.router.hooks.fire("message/offline", stanza, None, to.bare)
            if inspect.isawaitable(stored):
                if not spawn:
                    return stored
                self.router.spawn(stored)
        elif tag == st.IQ and kind in ("get", "set"):
            self.router.reply_error(stanza, StanzaError("service-unavailable"), None)
        return None


# Several entries for one node in one flush travel as one stream entry (field "*"): one XADD
# to write and one reply to parse instead of one each, the largest part of a cross-node
# stanza's cost. Records are separated by RS and their fields by US, control characters that
# no XML 1.0 text, JID or JSON value holds (a value that did would go as an entry of its own).
_RS, _US = "\x1e", "\x1f"
_PACK_MAX = 128        # records in one packed entry
_PACK_BYTES = 1 << 17  # and about this many characters


def _entries(batch: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    """XADD arguments for a flush: per stream, runs of records packed in order."""
    by_stream: dict[str, list[dict[str, str]]] = {}
    for stream, fields in batch:
        by_stream.setdefault(stream, []).append(fields)
    out: list[tuple[str, dict[str, str]]] = []
    for stream, fields_list in by_stream.items():
        if len(fields_list) == 1:
            out.append((stream, fields_list[0]))
            continue
        run: list[str] = []
        size = 0
        for fields in fields_list:
            record = _US.join(itertools.chain.from_iterable(fields.items()))
            if record.count(_US) != 2 * len(fields) - 1 or _RS in record:
                if run:
                    out.append((stream, {"*": _RS.join(run)}))
                    run, size = [], 0
                out.append((stream, fields))  # a separator in a value: an entry of its own
                continue
            run.append(record)
            size += len(record)
            if len(run) >= _PACK_MAX or size >= _PACK_BYTES:
                out.append((stream, {"*": _RS.join(run)}))
                run, size = [], 0
        if run:
            out.append((stream, {"*": _RS.join(run)} if len(run) > 1 else _unpack(run[0])))
    return out


def _unpack(record: str) -> dict[str, str]:
    parts = record.split(_US)
    return dict(zip(parts[::2], parts[1::2], strict=True))


def records(raw: dict[bytes, bytes]) -> list[dict[str, str]]:
    """The records of a stream entry: a packed one's, or the entry's own fields."""
    packed = raw.get(b"*")
    if packed is not None:
        return [_unpack(record) for record in packed.decode().split(_RS)]
    return [{k.decode(): v.decode() for k, v in raw.items()}]
