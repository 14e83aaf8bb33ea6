"""Message Archive Management (XEP-0313, urn:xmpp:mam:2 and :1) for accounts, with the
stanza ids of XEP-0359 and the archiving hints of XEP-0334.

Archiving hangs at the end of the router's `filter/user` chain (after blocking), so it sees
every message addressed to a user once, before delivery: a local client's outgoing message goes
into the sender's archive, a message to a local account into the recipient's. The recipient's
copy gets ``<stanza-id by='user@domain' id='…'/>`` before it is delivered or stored offline, so
the live message, the offline copy and the archive carry the same id (a client syncing from
MAM de-duplicates by it), and an offline message is archived once, when it arrives. A
``<stanza-id>`` a sender put in claiming the archive's JID is stripped; ``<origin-id>`` stays.

Archived: chat and normal messages with a body or an encrypted payload (OMEMO, OpenPGP, EME),
a subject, a MUC invitation, a Jingle Message Initiation (calls), or a ``<store/>`` hint (as
Prosody's mod_mam); never errors, groupchat (room archives are the MUC's), headlines, bodyless
chat states and receipts, or messages with ``<no-store/>``/``<no-permanent-store/>``.

Writes are group-committed behind the message: its archive ids are reserved beforehand, so
it goes on with its stanza-id at once, and the copies wait in memory with those of other
messages (up to 0.1 s, or 2000 entries) to be written in one statement. An archived message is
durable before stream management acknowledges it (XEP-0198 §4, the "durability-barrier"
hook), before an archive query or purge of its owner's node is answered, and at shutdown; a
kill -9 loses at most the unacknowledged copies of the last 0.1 s.

Besides XEP-0313: ``<purge xmlns='urn:presenced:mam:purge:0' [with='jid']/>`` in an iq set
to one's own account deletes one's archive (or the conversation with one JID).

    [mam]
    default = "always"     # archiving for accounts without preferences: always|roster|never
    expire_after = "1y"    # retention ("1y", "30d", "12h"); absent: kept forever
    max_page = 250         # the largest <max/> a query may ask for, of a user's or a room's archive
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from server import events
from server.config import Invalid, choice_option, int_option, option
from server.errors import StanzaError
from server.events import stanza_kinds
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, Stanza, hook, iq_get, iq_set
from server.modules.archive_query import DEFAULT_MAX_PAGE, parse_query, stamp
from server.modules.archive_query import fin as _fin
from server.modules.archive_query import form as _form
from server.modules.archive_query import parse_stamp as parse_stamp  # for its callers
from server.modules.archive_query import result_message as _result_message
from server.sessions import Session
from server.storage import archive
from server.storage.archive import (
    ArchiveEntry,
    ArchivePrefs,
    ArchiveStore,
    UnknownArchiveId,
)
from server.storage.base import NoSuchAccount
from server.storage.db import log_failure
from server.xml import ns
from server.xml import stanza as st
from server.xml.stanza import child, element, result

log = logging.getLogger("presenced.mam")

MAM2 = "urn:xmpp:mam:2"
MAM1 = "urn:xmpp:mam:1"
MAM2_EXTENDED = "urn:xmpp:mam:2#extended"
SID = "urn:xmpp:sid:0"
FORWARD = "urn:xmpp:forward:0"
RSM = "http://jabber.org/protocol/rsm"
HINTS = "urn:xmpp:hints"
PURGE = "urn:presenced:mam:purge:0"
XDATA_VALIDATE = "http://jabber.org/protocol/xdata-validate"

_STANZA_ID = ns.q(SID, "stanza-id")
_SID_NSMAP = {None: SID}
_new_tuple = tuple.__new__
_ID_BLOCK, _ID_LOW = 8192, 4096  # archive ids reserved at once; refilled below this many
# (on PostgreSQL a refill is a round trip: with 1024 at a time the pool ran dry under load,
# and messages waited for it: 1:1 server CPU per message with archiving 160 -> 86 us)
# The message path's group commit: a batch is written after at most _LINGER seconds, or at
# once when _BATCH_FULL entries wait (or someone waits for the commit: a stream management
# <a/>, an archive query, a stop). Measured with bench/mam_instructions (SQLite, two indexes
# per row): ~26 us a row in batches of 20, ~9 in batches of 300, ~6 in batches of 2000.
_LINGER = 0.1
_BATCH_FULL = 2000
_NO_STORE = frozenset({ns.q(HINTS, "no-store"), ns.q(HINTS, "no-permanent-store")})
_KEEP = frozenset({
    st.BODY,
    ns.q(HINTS, "store"),                          # XEP-0334
    "{eu.siacs.conversations.axolotl}encrypted",   # OMEMO (XEP-0384 before 0.4)
    "{urn:xmpp:omemo:2}encrypted",                 # OMEMO 2
    "{urn:xmpp:openpgp:0}openpgp",                 # XEP-0373
    "{jabber:x:encrypted}x",                       # XEP-0027
    "{urn:xmpp:eme:0}encryption",                  # XEP-0380: some encryption, unknown
    "{jabber:x:conference}x",                      # XEP-0249 direct MUC invitations
    ns.q(ns.CLIENT, "subject"),
})
_MUC_INVITE = "{http://jabber.org/protocol/muc#user}invite"
# XEP-0353 Jingle Message Initiation: calls show in the history.
_JMI = ("{urn:xmpp:jingle-message:0}", "{urn:xmpp:jingle-message:1}")
# Copies that are already someone's archive or carbons (XEP-0280) are not archived again.
_NOT_ARCHIVED = frozenset({ns.q(MAM2, "result"), ns.q(MAM1, "result"),
                           "{urn:xmpp:carbons:2}received", "{urn:xmpp:carbons:2}sent"})
_DELAY = ns.q(ns.DELAY, "delay")
_X = ns.q(ns.DATA_FORMS, "x")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
_DEFAULT_PAGE = 50
_EXPIRE_BATCH = 500
_PREFS_CACHE = 10000
_DURATION = re.compile(r"^([1-9][0-9]{0,8})([ywdhms])$")
_UNITS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PREF_DEFAULTS = ("always", "roster", "never")


def _duration(value: Any, _ctx: Any) -> int:
    """Seconds, from "1y", "30d", "12h", "15m", "10s" (a year is 365 days)."""
    if not isinstance(value, str):
        raise Invalid
    match = _DURATION.match(value)
    if match is None:
        raise Invalid
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True, slots=True, kw_only=True)
class MamSettings:
    # Archiving for accounts that set no preferences (XEP-0313 §6).
    default: str = field(metadata=choice_option("always", *_PREF_DEFAULTS))
    # Seconds messages are kept; None: forever.
    expire_after: int | None = field(metadata=option(
        'a duration: a number and y, w, d, h, m or s, such as "1y" or "30d"', _duration))
    # The largest page of any archive query: a user's and a room's (archive_query.max_page).
    max_page: int = field(metadata=int_option(1, 10000, DEFAULT_MAX_PAGE))


_UNARCHIVED_TYPES = ("error", "groupchat", "headline")


def archivable(stanza: Stanza) -> bool:
    """XEP-0313 §5.1.1 with the hints of XEP-0334."""
    if stanza.get("type") in _UNARCHIVED_TYPES:
        return False
    keep = False
    for part in stanza:
        tag = part.tag
        if tag in _NO_STORE or tag in _NOT_ARCHIVED:
            return False
        if (tag in _KEEP or (isinstance(tag, str) and tag.startswith(_JMI))
                or (tag == "{http://jabber.org/protocol/muc#user}x"
                    and part.find(_MUC_INVITE) is not None)):
            keep = True
    return keep


class _Writer:
    """Group commit: the entries added while a batch is being written, and for up to
    _LINGER seconds after, go to the store together, in one statement (an index insert costs
    less per row in a big batch: the pages it touches are written to the log once per
    commit). Each add() gets a future that is done once its entries are committed, and its
    on_ids callback their ids just before; an add() (a caller who waits for the commit),
    barrier() and flush() end the wait at once. put() waits for nothing: what it queues is
    durable after the next barrier()."""

    def __init__(self, store: ArchiveStore, linger: float = 0.0) -> None:
        self.store = store
        self.linger = linger
        self._entries: list[ArchiveEntry] = []
        self._waiters: list[tuple[int, Callable[[list[str | None]], None] | None,
                                  asyncio.Future[None] | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # set while the writer lingers
        self._urgent = False  # someone waits for the commit: no lingering
        self.batches = 0  # for tests and metrics

    def add(self, entries: list[ArchiveEntry],
            on_ids: Callable[[list[str | None]], None] | None = None) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._entries += entries
        self._waiters.append((len(entries), on_ids, future))
        self._hurry()
        if self._task is None:
            self._task = loop.create_task(self._run())
        return future

    def put(self, entries: list[ArchiveEntry]) -> None:
        """add() for a caller that waits for nothing (the message path: durability comes
        from barrier()), without a future per message."""
        self._entries += entries
        self._waiters.append((len(entries), None, None))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif len(self._entries) >= _BATCH_FULL:
            self._hurry()

    def _hurry(self) -> None:
        self._urgent = True
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _linger(self) -> None:
        """Wait up to `linger` seconds for more entries (or until someone waits)."""
        loop = asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        timer = loop.call_later(self.linger, _wake_up, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    async def _run(self) -> None:
        try:
            while self._waiters:
                if self.linger and not self._urgent and len(self._entries) < _BATCH_FULL:
                    await self._linger()
                entries, waiters = self._entries, self._waiters
                self._entries, self._waiters = [], []
                self._urgent = False
                self.batches += 1
                try:
                    ids = await self.store.append(entries)
                except Exception:
                    # Delivered all the same (without stanza-id): losing a message to an
                    # archive failure would be worse than an archive gap.
                    log_failure(log, "event=archive-write-failed count=%d", len(entries))
                    ids = [None] * len(entries)
                at = 0
                for count, on_ids, future in waiters:
                    if on_ids is not None:
                        try:
                            on_ids(ids[at:at + count])
                        except Exception:
                            log.exception("event=archive-callback-failed")
                    at += count
                    if future is not None and not future.done():
                        future.set_result(None)
        finally:
            self._task = None
            self._urgent = False

    @property
    def busy(self) -> bool:
        return self._task is not None

    async def barrier(self) -> None:
        """Wait until what was queued before this call is committed (not for what comes
        after: under a steady stream of messages the writer never idles)."""
        if self._task is not None:
            await self.add([])

    async def flush(self) -> None:
        """Wait until the writer is idle (at shutdown, when no new messages come)."""
        while self._task is not None:
            self._hurry()
            await asyncio.shield(self._task)


def _wake_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


def _archives_nothing(prefs: ArchivePrefs) -> bool:
    """XEP-0313 §6: default 'never' and no JID always archived: nothing is (the usual state
    with archiving off, decided without looking at either address)."""
    return prefs.default == "never" and not prefs.always


def _strip_claimed(stanza: Stanza, recipient: str | None, sender: str | None) -> None:
    """Remove the <stanza-id/>s whose 'by' claims the recipient's or the sender's archive."""
    for claimed in stanza.findall(_STANZA_ID):
        by = claimed.get("by")
        if by is not None and by in (recipient, sender):
            stanza.remove(claimed)


class Mam(Module):
    name = "mam"
    settings = MamSettings
    stores = (archive.SPEC,)
    features = (MAM2, MAM2_EXTENDED, MAM1, SID)

    def __init__(self, server: ModuleContext, config: MamSettings) -> None:
        super().__init__(server, config)
        self.store: ArchiveStore = self.store_of(archive.SPEC)
        self._prefs: dict[str, ArchivePrefs] = {}
        # [cluster]: tells the other nodes that an account's preferences changed
        self.changed: Callable[[JID], Awaitable[None]] | None = None
        self._last_ts = 0
        self._writer: _Writer | None = None
        self._expiry: asyncio.Task[None] | None = None
        self._ids: deque[int] = deque()  # archive ids reserved for messages yet to come
        self._refill: asyncio.Future[None] | None = None
        self._waiting = 0  # messages waiting for ids

    @property
    def writer(self) -> _Writer:
        if self._writer is None:
            # [cluster]: no lingering. An archive query waits for this node's writes only, and
            # a query on another node (the user's other device) must find what was archived
            # here a moment ago. (Rows that come while a write is under way still go together.)
            linger = 0.0 if self.server.config.cluster.enabled else _LINGER
            self._writer = _Writer(self.store, linger)
        return self._writer

    async def start(self) -> None:
        # The first ids before the first message (modules start before the listeners):
        # without them every message would wait for them, through a coroutine each.
        try:
            self._ids.extend(await self.store.reserve_ids(_ID_BLOCK))
        except Exception:
            log_failure(log, "event=archive-reserve-failed")
            self._reserve_more()
        if self.config.expire_after is not None:
            self._expiry = asyncio.ensure_future(self._expire_periodically())

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._refill is not None:
            await asyncio.gather(self._refill, return_exceptions=True)
        if self._writer is not None:
            await self._writer.flush()

    def _now(self) -> int:
        """Microseconds, never going back (archive order is arrival order)."""
        now = time.time_ns() // 1000
        if now <= self._last_ts:
            now = self._last_ts + 1
        self._last_ts = now
        return now

    # -- archiving ---------------------------------------------------------------------------

    @hook(events.FILTER_USER, priority=-100)
    @stanza_kinds(st.MESSAGE)
    def archive_message(self, stanza: Stanza, origin: Session | None,
                        to: JID) -> Awaitable[None] | None:
        if stanza.tag != st.MESSAGE:
            return None
        to_local = to.domain in self.server.hosts
        sender_str: str | None = None  # a local client's account (its JID: only when needed)
        if origin is not None and origin.local_client:
            sender_str = origin.bare_str
        elif not to_local:
            return None
        # XEP-0359 §3: no one else may claim the ids we give ("MUST delete that element even
        # if they are not adding their own stanza ID"). This looks at every message: a lone
        # child directly, more with lxml's tag matcher (no proxy made for the others); a loop
        # over the children costs more from two on, find() more than either.
        count = len(stanza)
        if count == 1:
            claimed = stanza[0].tag == _STANZA_ID
        else:
            claimed = count > 1 and next(stanza.iterchildren(_STANZA_ID), None) is not None
        if claimed:
            _strip_claimed(stanza, str(to.bare) if to_local else None, sender_str)
        to_bare = to.bare
        to_str = str(to_bare)
        # Decided here when the preferences are cached (cheaper than looking at the payload
        # first): a message no one archives is routed on at once. The first test of each side
        # is _archives_nothing() inline (this is the path of every message with archiving off).
        cached = self._prefs
        outgoing: bool | None = False
        if origin is not None and sender_str is not None:
            prefs = cached.get(sender_str)
            if prefs is None or prefs.default != "never" or prefs.always:
                outgoing = self._wants_now(origin.jid.bare, to_bare)
        source: JID | None = None
        source_resource = ""
        incoming: bool | None = False
        if to_local and to_str != sender_str:
            prefs = cached.get(to_str)
            # A recipient who archives nothing needs no sender address parsed.
            if prefs is None or prefs.default != "never" or prefs.always:
                if stanza.get("type") in _UNARCHIVED_TYPES:
                    return None  # archivable() says no (a room's copies: §5.1.1, in the room's)
                try:
                    full = JID.parse(stanza.get("from") or "")
                except InvalidJID:
                    full = None
                if full is not None:
                    source = full.bare
                    source_resource = full.resource or ""
                    incoming = self._wants_now(to_bare, source)
        if outgoing is False and incoming is False:
            return None
        sender = origin.jid.bare if origin is not None and sender_str is not None else None
        if not archivable(stanza):
            return None
        if outgoing is None or incoming is None:
            return self._archive_later(stanza, sender, to, source, source_resource, outgoing,
                                       incoming)
        return self._write(stanza, sender, to, source, source_resource, outgoing, incoming)

    def _write(self, stanza: Stanza, sender: JID | None, to: JID, source: JID | None,
               source_resource: str, outgoing: bool,
               incoming: bool) -> Awaitable[None] | None:
        """Queue the sender's copy (sender: a local client's account) and the recipient's
        (source: the sender's bare JID, when the recipient is a local account and not the
        sender); the future is done once they are committed, the recipient's stanza-id
        added."""
        to_bare = to.bare
        # (owner, with, with's resource, outgoing) of each copy; ArchiveEntry is made once,
        # with its reserved id (a frozen dataclass costs a setattr per field, replace() more).
        copies: list[tuple[str, str, str, bool]] = []
        if outgoing and sender is not None:
            copies.append((str(sender), str(to_bare), to.resource or "", True))
        stamped: int | None = None  # the copy whose id the delivered message carries
        if source is not None:
            if incoming:
                copies.append((str(to_bare), str(source), source_resource, False))
                stamped = len(copies) - 1
        elif copies and sender == to_bare:
            stamped = 0  # a message to one's own account: one archive entry
        if not copies:
            return None
        data = etree.tostring(stanza)
        ts = self._now()
        ids = self._take_ids(len(copies))
        if ids is None:
            return self._write_later(stanza, copies, ts, data, stamped, to_bare)
        self._queue(stanza, copies, ts, data, ids, stamped, to_bare)
        return None

    def _queue(self, stanza: Stanza, copies: list[tuple[str, str, str, bool]], ts: int,
               data: bytes, ids: list[int], stamped: int | None, to_bare: JID) -> None:
        """Archive ids are reserved beforehand, so the stanza-id goes out with the message
        and its stream goes on at once; the write is group-committed behind it. Durable where
        that is promised: before a stream management <a/> (the "durability-barrier" hook),
        before an archive query, and at shutdown."""
        if stamped is not None:
            # stanza.child() without its look at the parent's namespaces (a <message/> is
            # never in urn:xmpp:sid:0): the element declares its own.
            etree.SubElement(stanza, _STANZA_ID, {"by": str(to_bare), "id": str(ids[stamped])},
                             nsmap=_SID_NSMAP)
        first = copies[0]
        if first[3] and stamped != 0 and self.server.hooks.has(events.ARCHIVE_SENT_ID):
            # The sender's own id for its copies (carbons' <sent/>, XEP-0280 §5 with
            # XEP-0359 §3: 'by' is the sender's bare JID); the stanza carries the recipient's.
            self.server.hooks.notify_nowait(events.ARCHIVE_SENT_ID, stanza, first[0], str(ids[0]))
        # Each entry made in one C call (ArchiveEntry's own __new__ is a Python function).
        self.writer.put([_new_tuple(ArchiveEntry, (*copy, ts, data, True, n))
                         for copy, n in zip(copies, ids, strict=True)])

    async def _write_later(self, stanza: Stanza, copies: list[tuple[str, str, str, bool]],
                           ts: int, data: bytes, stamped: int | None, to_bare: JID) -> None:
        """No ids reserved yet (at start, or when the pool ran dry): wait for them, in turn
        (ids follow arrival order)."""
        self._waiting += 1
        try:
            while len(self._ids) < len(copies):
                self._reserve_more()
                assert self._refill is not None
                await asyncio.shield(self._refill)
            ids = [self._ids.popleft() for _ in copies]
        finally:
            self._waiting -= 1
        self._queue(stanza, copies, ts, data, ids, stamped, to_bare)

    def _take_ids(self, count: int) -> list[int] | None:
        """Reserved ids at once, or None: then the message waits for them (also when others
        wait already, so that ids keep arrival order)."""
        pool = self._ids
        if self._waiting or len(pool) < count:
            return None
        ids = [pool.popleft()] if count == 1 else [pool.popleft() for _ in range(count)]
        if len(pool) < _ID_LOW:
            self._reserve_more()
        return ids

    def _reserve_more(self) -> None:
        if self._refill is None:
            self._refill = asyncio.ensure_future(self._reserve())

    async def _reserve(self) -> None:
        try:
            self._ids.extend(await self.store.reserve_ids(_ID_BLOCK))
        except Exception:
            log_failure(log, "event=archive-reserve-failed")
            await asyncio.sleep(1)  # storage down: do not spin
        finally:
            self._refill = None

    @hook(events.DURABILITY_BARRIER)
    def durable(self, _session: Session) -> Awaitable[None] | None:
        """What was archived so far is committed once this is done (stream management waits
        for it before it acknowledges stanzas)."""
        if self._writer is None or not self._writer.busy:
            return None
        return self._writer.barrier()

    async def _archive_later(self, stanza: Stanza, sender: JID | None, to: JID,
                             source: JID | None, source_resource: str,
                             outgoing: bool | None, incoming: bool | None) -> None:
        """The preferences of one side are not cached: read them first."""
        if outgoing is None:
            assert sender is not None
            outgoing = await self._wants(sender, to.bare)
        if incoming is None:
            assert source is not None
            incoming = await self._wants(to.bare, source)
        pending = self._write(stanza, sender, to, source, source_resource, outgoing, incoming)
        if pending is not None:
            await pending

    def _wants_now(self, owner: JID, other: JID) -> bool | None:
        """_wants() without waiting, or None when it needs the store or the roster."""
        prefs = self._prefs.get(str(owner))
        if prefs is None:
            return None
        if _archives_nothing(prefs):
            return False
        if prefs.default == "always" and not prefs.never:
            return True
        if prefs.default == "roster":
            other_str = str(other)
            if other_str in prefs.never:
                return False
            return True if other_str in prefs.always else None
        other_str = str(other)
        if other_str in prefs.never:
            return False
        return prefs.default == "always" or other_str in prefs.always

    def forget(self, bare: JID) -> None:
        """Another node changed this account's preferences (XEP-0313 §6): read them again."""
        self._prefs.pop(str(bare), None)

    async def prefs_of(self, owner: JID) -> ArchivePrefs:
        key = str(owner)
        prefs = self._prefs.get(key)
        if prefs is None:
            prefs = await self.store.get_prefs(key) or ArchivePrefs(self.config.default)
            if len(self._prefs) >= _PREFS_CACHE:
                self._prefs.clear()
            self._prefs[key] = prefs
        return prefs

    async def _wants(self, owner: JID, other: JID) -> bool:
        """XEP-0313 §6: whether owner's preferences archive messages with other (bare)."""
        prefs = self._prefs.get(str(owner)) or await self.prefs_of(owner)
        other_str = str(other)
        if other_str in prefs.never:
            return False
        if other_str in prefs.always or prefs.default == "always":
            return True
        if prefs.default == "never":
            return False
        roster = await self.server.rosters.get(owner)
        item = roster.items.get(other_str)
        return item is not None and item.listed

    @hook(events.SESSION_BOUND)
    def session_bound(self, session: Session) -> None:
        # A login reads the preferences afresh (the account may have been deleted and made
        # again meanwhile, by the CLI in another process).
        if not self.server.sessions.resources(session.jid.bare)[1:]:
            self._prefs.pop(session.bare_str, None)
            self.store.forget(session.bare_str)

    @hook(events.DISCO_ACCOUNT_INFO)
    def account_features(self, query: Stanza, stanza: Stanza, origin: Session | None) -> None:
        """XEP-0313 §7: clients look for MAM on their own account's bare JID."""
        if origin is None or stanza.get("to") not in (None, origin.bare_str):
            return
        for feature in self.features:
            child(query, ns.q(ns.DISCO_INFO, "feature"), {"var": feature})

    # -- queries -----------------------------------------------------------------------------

    @iq_get(MAM2, "query", to=("self",))
    def form2(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        return result(stanza, _form(MAM2))

    @iq_get(MAM1, "query", to=("self",))
    def form1(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        return result(stanza, _form(MAM1))

    @iq_set(MAM2, "query", to=("self",))
    def query2(self, stanza: Stanza, origin: Session | None) -> Awaitable[Stanza]:
        return self._query(stanza, origin, MAM2)

    @iq_set(MAM1, "query", to=("self",))
    def query1(self, stanza: Stanza, origin: Session | None) -> Awaitable[Stanza]:
        return self._query(stanza, origin, MAM1)

    async def _query(self, stanza: Stanza, origin: Session | None, xmlns: str) -> Stanza:
        assert origin is not None
        query_el = stanza[0]
        q, flip = parse_query(query_el, xmlns, self.config.max_page)
        owner = str(origin.jid.bare)
        await self.writer.barrier()  # what was routed before the query is in the archive
        try:
            page = await self.store.query(owner, q)
        except UnknownArchiveId as exc:
            raise StanzaError("item-not-found", f"no message {exc.args[0]!r} in the archive") \
                from None
        queryid = query_el.get("queryid")
        items = list(reversed(page.items)) if flip else page.items
        archive_from = stanza.get("to")
        for item in items:
            origin.send(_result_message(item.id, item.ts, item.stanza, xmlns, queryid,
                                        origin.jid_str, archive_from))
        return result(stanza, _fin(page, xmlns, queryid))

    @iq_set(MAM2, "query", to=("bare",))
    @iq_get(MAM2, "query", to=("bare",))
    @iq_set(MAM1, "query", to=("bare",))
    @iq_get(MAM1, "query", to=("bare",))
    @iq_get(MAM2, "metadata", to=("bare",))
    @iq_get(MAM2, "prefs", to=("bare",))
    @iq_set(MAM2, "prefs", to=("bare",))
    @iq_get(MAM1, "prefs", to=("bare",))
    @iq_set(MAM1, "prefs", to=("bare",))
    @iq_set(PURGE, "purge", to=("bare",))
    def others_archive(self, _stanza: Stanza, _origin: Session | None) -> Stanza:
        raise StanzaError("forbidden", "this is not your archive")

    @iq_get(MAM2, "metadata", to=("self",))
    async def metadata(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        await self.writer.barrier()
        meta = await self.store.metadata(origin.bare_str)
        answer = element(ns.q(MAM2, "metadata"))
        if meta is not None:
            child(answer, ns.q(MAM2, "start"), {"id": meta.first[0],
                                                 "timestamp": stamp(meta.first[1])})
            child(answer, ns.q(MAM2, "end"), {"id": meta.last[0],
                                               "timestamp": stamp(meta.last[1])})
        return result(stanza, answer)

    # -- preferences -------------------------------------------------------------------------

    @iq_get(MAM2, "prefs", to=("self",))
    async def get_prefs2(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        return result(stanza, _prefs_element(await self.prefs_of(origin.jid.bare), MAM2))

    @iq_get(MAM1, "prefs", to=("self",))
    async def get_prefs1(self, stanza: Stanza, origin: Session | None) -> Stanza:
        assert origin is not None
        return result(stanza, _prefs_element(await self.prefs_of(origin.jid.bare), MAM1))

    @iq_set(MAM2, "prefs", to=("self",))
    def set_prefs2(self, stanza: Stanza, origin: Session | None) -> Awaitable[Stanza]:
        return self._set_prefs(stanza, origin, MAM2)

    @iq_set(MAM1, "prefs", to=("self",))
    def set_prefs1(self, stanza: Stanza, origin: Session | None) -> Awaitable[Stanza]:
        return self._set_prefs(stanza, origin, MAM1)

    async def _set_prefs(self, stanza: Stanza, origin: Session | None, xmlns: str) -> Stanza:
        assert origin is not None
        el = stanza[0]
        default = el.get("default", "")
        if default not in _PREF_DEFAULTS:
            raise StanzaError("bad-request", "default must be always, roster or never")

        def jids(name: str) -> tuple[str, ...]:
            found: list[str] = []
            for list_el in el.iterfind(ns.q(xmlns, name)):
                for jid_el in list_el.iterfind(ns.q(xmlns, "jid")):
                    try:
                        jid = str(JID.parse((jid_el.text or "").strip()))  # XEP-0313 §6: JIDprep
                    except InvalidJID as exc:
                        raise StanzaError("jid-malformed", str(exc)) from None
                    if jid not in found:
                        found.append(jid)
            return tuple(found)

        prefs = ArchivePrefs(default, jids("always"), jids("never"))
        try:
            await self.store.set_prefs(origin.bare_str, prefs)
        except NoSuchAccount:
            raise StanzaError("item-not-found", "no such account") from None
        self._prefs[origin.bare_str] = prefs
        if self.changed is not None:  # told before the answer: then every node knows
            await self.changed(origin.jid.bare)
        return result(stanza, _prefs_element(prefs, xmlns))

    # -- deleting ----------------------------------------------------------------------------

    @iq_set(PURGE, "purge", to=("self",))
    async def purge(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """Our own extension (XEP-0313 defines none): delete one's archive, or the messages
        with one JID (with='jid', any resource)."""
        assert origin is not None
        with_bare = None
        if (text := stanza[0].get("with")) is not None:
            try:
                with_bare = str(JID.parse(text).bare)
            except InvalidJID as exc:
                raise StanzaError("jid-malformed", str(exc)) from None
        await self.writer.barrier()
        count = await self.store.purge(origin.bare_str, with_bare)
        log.info("event=archive-purged jid=%s count=%d", origin.bare_str, count)
        return result(stanza)

    async def expire(self, now: int | None = None) -> int:
        """The retention job: delete messages older than expire_after, in batches of
        _EXPIRE_BATCH (the loop and the database get a turn between them). How many."""
        if self.config.expire_after is None:
            return 0
        now = time.time_ns() // 1000 if now is None else now
        cutoff = now - self.config.expire_after * 1_000_000
        total = 0
        for owner in await self.store.owners():
            while True:
                deleted = await self.store.expire(owner, cutoff, _EXPIRE_BATCH)
                total += deleted
                if deleted < _EXPIRE_BATCH:
                    break
                await asyncio.sleep(0)
        if total:
            log.info("event=archive-expired count=%d", total)
        return total

    async def _expire_periodically(self) -> None:
        assert self.config.expire_after is not None
        interval = min(3600.0, max(1.0, self.config.expire_after / 10))
        while True:
            try:
                await self.expire()
            except Exception:
                log_failure(log, "event=archive-expiry-failed")
            await asyncio.sleep(interval)


# -- building answers -----------------------------------------------------------------------------


def _prefs_element(prefs: ArchivePrefs, xmlns: str) -> Stanza:
    el = element(ns.q(xmlns, "prefs"), {"default": prefs.default})
    for name, jids in (("always", prefs.always), ("never", prefs.never)):
        list_el = child(el, ns.q(xmlns, name))
        for jid in jids:
            child(list_el, ns.q(xmlns, "jid"), text=jid)
    return el
