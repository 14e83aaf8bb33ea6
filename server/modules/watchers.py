"""Watcher information (RFC 2778 §2.2; RFC 3857 is the SIP prior art) and poller limits.

Protocol, namespace urn:presenced:watchers:0 (schema: schemas/watchers.xsd). A user asks its
own account (no 'to', or its bare JID):

    <iq type='get' id='w1'><watchers xmlns='urn:presenced:watchers:0'/></iq>

and gets one <watcher/> per watcher bare JID:

    <iq type='result' id='w1'><watchers xmlns='urn:presenced:watchers:0'>
      <watcher jid='bob@a.test' kind='subscriber' status='active' count='2'
               first='2026-11-25T06:27:48Z' last='2026-11-25T06:30:02Z'/>
      <watcher jid='eve@b.test' kind='poller' status='refused' count='9' .../>
    </watchers></iq>

kind: subscriber (subscription from/both), pending (an inbound request awaits an answer),
fetcher (probed without being a subscriber), poller (probed more often than
[presence] max_fetches_per_minute; takes precedence). status: active (gets presence), pending,
refused (access rules or the rate limit deny it presence). count/first/last describe the
fetches (probes) of the last hour; a subscriber that never probed has count='0' and neither
time. Anyone but the account itself and the admins of [admins] gets <forbidden/>.

Rate limit: a probe from a watcher over the limit is answered with a presence error
<policy-violation/> instead of presence or 'unsubscribed' (checked in the `filter/user` chain,
after blocking and before per-contact visibility). The fetch log is in memory only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from server import events
from server.errors import StanzaError
from server.events import stanza_kinds
from server.jid import JID, InvalidJID
from server.module import Module, ModuleContext, Stanza, hook, iq_get
from server.modules.presence import Presence
from server.presence.watchers import FetchLog, Watcher, timestamp, watchers_of
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.watchers")

WATCHERS = ns.q(ns.WATCHERS, "watchers")
WATCHER = ns.q(ns.WATCHERS, "watcher")


class Watchers(Module):
    name = "watchers"
    features = (ns.WATCHERS,)
    needs = (Presence,)  # it fires presence/fetched, and its [presence] settings say the limit

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        limit = self.needed(Presence).config.max_fetches_per_minute
        self.fetches = FetchLog(limit)

    # -- the fetch record and the rate limit -----------------------------------------------

    @hook(events.PRESENCE_FETCHED)
    def fetched(self, presentity: JID, watcher: JID, allowed: bool) -> None:
        if watcher.bare != presentity.bare:  # an account's own resources are not watchers
            self.fetches.record(presentity.bare, watcher, allowed, time.time())

    @hook(events.FILTER_USER, priority=95)
    @stanza_kinds(st.PRESENCE)
    def rate_limit(self, stanza: Stanza, origin: Session | None, to: JID) -> None:
        # Inbound processing only (the contact's server, RFC 6121 §4.3.2): a local client's
        # probe passes here again once outbound processing has routed it on.
        if (stanza.tag != st.PRESENCE or stanza.get("type") != "probe"
                or (origin is not None and origin.local_client)
                or to.domain not in self.server.hosts):
            return None
        try:
            watcher = JID.parse(stanza.get("from", ""))
        except InvalidJID:
            return None
        presentity = to.bare
        if watcher.bare == presentity:
            return None
        fetches = self.fetches
        now = time.time()
        if fetches.over_limit(presentity, watcher, now):
            fetches.record(presentity, watcher, False, now, refused_for_rate=True)
            log.info("event=poller-refused presentity=%s watcher=%s", presentity, watcher.bare)
            raise StanzaError("policy-violation",
                              f"more than {fetches.max_per_minute} presence fetches a minute",
                              type="wait")
        return None

    # -- watcher information -----------------------------------------------------------------

    @hook(events.WATCHERS_LIST)
    def list_watchers(self, presentity: JID) -> Awaitable[list[Watcher]]:
        """For other modules (the ad-hoc command): the rows of `presentity`'s watcher
        information."""
        return self._collect(presentity)

    async def _collect(self, presentity: JID) -> list[Watcher]:
        roster = await self.server.rosters.get(presentity)
        records = self.fetches.records(presentity, time.time())
        access = self.server.access
        return watchers_of(roster.items.values(), records,
                           lambda watcher: bool(access.denied(presentity, watcher)))

    @iq_get(ns.WATCHERS, "watchers", to=("self", "bare"))
    async def get_watchers(self, stanza: Stanza, origin: Session | None) -> Stanza:
        presentity = JID.parse(stanza.get("to") or stanza.get("from") or "").bare
        admin = origin is not None and str(origin.jid.bare) in self.server.config.admins
        if origin is None or (origin.jid.bare != presentity and not admin):
            # Only the presentity itself (and the server's admins) may learn who watches it.
            raise StanzaError("forbidden", "only the account itself may read its watchers")
        answer = st.element(WATCHERS)
        for row in await self._collect(presentity):
            attrs = {"jid": row.jid, "kind": row.kind, "status": row.status,
                     "count": str(row.count)}
            if row.first is not None and row.last is not None:
                attrs["first"] = timestamp(row.first)
                attrs["last"] = timestamp(row.last)
            st.child(answer, WATCHER, attrs)
        return st.result(stanza, answer)
