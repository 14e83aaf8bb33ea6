"""Rosters (RFC 6121 §2): cached in memory while an account is online, written through to
storage, and pushed to the account's interested resources on every change."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from server.jid import JID
from server.presence.subscription import Subscription, SubState
from server.shared_reads import SharedReads
from server.storage.base import RosterItem
from server.xml import ns
from server.xml.stanza import Element, child, element, iq

if TYPE_CHECKING:
    from server.app import Server
    from server.sessions import Session

Answer = tuple["Session", Element]  # the session to answer and its IQ result


@dataclass
class Roster:
    version: int
    items: dict[str, RosterItem]


def state_of(item: RosterItem | None) -> SubState | None:
    if item is None:
        return None
    return SubState(Subscription(item.subscription), item.pending_out, item.pending_in,
                    item.approved)


def with_state(item: RosterItem, state: SubState) -> RosterItem:
    return replace(item, subscription=str(state.subscription), pending_out=state.pending_out,
                   pending_in=state.pending_in, approved=state.approved)


def item_element(item: RosterItem, removed: bool = False) -> Element:
    """<item/> as RFC 6121 §2.1.2 shows it (ask and approved only when set)."""
    attrs = {"jid": item.contact,
             "subscription": "remove" if removed else item.subscription}
    if item.name and not removed:
        attrs["name"] = item.name
    if item.pending_out and not removed:
        attrs["ask"] = "subscribe"
    if item.approved and not removed:
        attrs["approved"] = "true"
    el = element(ns.q(ns.ROSTER, "item"), attrs)
    if not removed:
        for group in item.groups:
            child(el, ns.q(ns.ROSTER, "group"), text=group)
    return el


class RosterManager:
    def __init__(self, server: Server) -> None:
        self._server = server
        self._cache: dict[JID, Roster] = {}
        self._locks: dict[JID, asyncio.Lock] = {}
        # Loads under way, shared by every caller (a bind's prefetch, the initial presence,
        # the roster get): one read each, and two never cache different copies.
        self._loads: SharedReads[JID, Roster] = SharedReads()
        self._push_ids = itertools.count(1)
        # server/cluster: told of every stored change, so other nodes drop their cached copy.
        self.changed: Callable[[JID], None] | None = None

    def lock(self, bare: JID) -> asyncio.Lock:
        """Serialises read-modify-write of one account's roster."""
        lock = self._locks.get(bare)
        if lock is None:
            lock = self._locks[bare] = asyncio.Lock()
        return lock

    def cached(self, bare: JID) -> Roster | None:
        return self._cache.get(bare)

    async def get(self, bare: JID) -> Roster:
        roster = self._cache.get(bare)
        if roster is not None:
            return roster
        return await self._loads.read(bare, lambda: self._load(bare),
                                      lambda roster: self._keep(bare, roster))

    async def _load(self, bare: JID) -> Roster:
        assert bare.local is not None
        version, items = await self._server.storage.rosters.load(bare.local, bare.domain)
        return Roster(version, {item.contact: item for item in items})

    def _keep(self, bare: JID, roster: Roster) -> None:
        # [cluster]: a change on another node announced while we read ("r": forget) may be
        # missing from what we read; that copy is returned, not kept (SharedReads).
        if self._server.sessions.is_online(bare):
            self._cache[bare] = roster

    def forget(self, bare: JID) -> None:
        """The account's last session ended, or ([cluster]) another node changed its roster."""
        self._cache.pop(bare, None)
        self._loads.forget(bare)
        lock = self._locks.get(bare)
        if lock is not None and not lock.locked():
            del self._locks[bare]

    async def put(self, bare: JID, item: RosterItem, push: bool = True,
                  answer: Answer | None = None) -> None:
        """Store an item and push it. answer: (session, IQ result) of the roster set that made
        the change, sent once the change is stored and before the pushes (RFC 6121 §2.3.2)."""
        assert bare.local is not None
        roster = await self.get(bare)
        was_listed = (old := roster.items.get(item.contact)) is not None and old.listed
        roster.version = await self._server.storage.rosters.put(bare.local, bare.domain, item)
        roster.items[item.contact] = item
        if self.changed is not None:
            self.changed(bare)
        _send(answer)
        if push and (item.listed or was_listed):
            self.push(bare, item, roster.version, removed=not item.listed)

    async def remove(self, bare: JID, contact: str, answer: Answer | None = None) -> None:
        """Delete an item and push its removal (answer: as for put, RFC 6121 §2.5.2)."""
        assert bare.local is not None
        roster = await self.get(bare)
        old = roster.items.pop(contact, None)
        roster.version = await self._server.storage.rosters.delete(bare.local, bare.domain,
                                                                   contact)
        if self.changed is not None:
            self.changed(bare)
        _send(answer)
        if old is not None and old.listed:
            self.push(bare, old, roster.version, removed=True)

    def push(self, bare: JID, item: RosterItem, version: int, removed: bool = False) -> None:
        """RFC 6121 §2.1.6: a roster push to every interested resource."""
        for session in self._server.sessions.resources(bare):
            if not session.interested:
                continue
            push = iq("set", to=str(session.jid), id_=f"push{next(self._push_ids)}")
            query = child(push, ns.q(ns.ROSTER, "query"), {"ver": str(version)})
            query.append(item_element(item, removed))
            session.send(push)


def _send(answer: Answer | None) -> None:
    if answer is not None:
        session, reply = answer
        session.send(reply)
