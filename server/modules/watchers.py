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
<policy-violation/> instead of presence or 'unsubscribed'. The fetch log is in memory only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza
from server.presence.watchers import FetchLog, Watcher, timestamp, watchers_of
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

log = logging.getLogger("presenced.watchers")
module = Module("watchers")
module.feature(ns.WATCHERS)

WATCHERS = ns.q(ns.WATCHERS, "watchers")
WATCHER = ns.q(ns.WATCHERS, "watcher")


def _server() -> Any:
    assert module.server is not None
    return module.server


def _fetches() -> FetchLog:
    fetches: FetchLog = _server().fetches
    return fetches


@module.on_load
def load(server: Any) -> None:
    server.fetches = FetchLog(server.config.presence.max_fetches_per_minute)


# -- the fetch record and the rate limit ---------------------------------------------------------

@module.on("presence/fetched")
def fetched(presentity: JID, watcher: JID, allowed: bool) -> None:
    if watcher.bare != presentity.bare:  # an account's own resources are not watchers
        _fetches().record(presentity.bare, watcher, allowed, time.time())


def _rate_limit(stanza: Stanza, origin: Session | None, to: JID) -> None:
    # Inbound processing only (the contact's server, RFC 6121 §4.3.2): a local client's probe
    # passes here again once outbound processing has routed it on.
    if stanza.get("type") != "probe" or getattr(origin, "local_client", False):
        return None
    try:
        watcher = JID.parse(stanza.get("from", ""))
    except ValueError:
        return None
    presentity = to.bare
    if watcher.bare == presentity:
        return None
    fetches = _fetches()
    now = time.time()
    if fetches.over_limit(presentity, watcher, now):
        fetches.record(presentity, watcher, False, now, refused_for_rate=True)
        log.info("event=poller-refused presentity=%s watcher=%s", presentity, watcher.bare)
        raise StanzaError("policy-violation",
                          f"more than {fetches.max_per_minute} presence fetches a minute",
                          type="wait")
    return None


@module.on("presence/bare", priority=50)
def probe_bare(stanza: Stanza, origin: Session | None, to: JID) -> None:
    return _rate_limit(stanza, origin, to)


@module.on("presence/full", priority=50)
def probe_full(stanza: Stanza, origin: Session | None, to: JID) -> None:
    return _rate_limit(stanza, origin, to)


# -- watcher information -------------------------------------------------------------------------

@module.on("watchers/list")
def list_watchers(presentity: JID) -> Awaitable[list[Watcher]]:
    """For other modules (the ad-hoc command): the rows of `presentity`'s watcher information."""
    async def collect() -> list[Watcher]:
        server = _server()
        roster = await server.rosters.get(presentity)
        records = _fetches().records(presentity, time.time())
        access = server.access
        return watchers_of(roster.items.values(), records,
                           lambda watcher: bool(access.denied(presentity, watcher)))
    return collect()


@module.iq_get(ns.WATCHERS, to=("self", "bare"))
async def get_watchers(stanza: Stanza, origin: Session | None) -> Stanza:
    request = st.payload(stanza)
    if request is None or request.tag != WATCHERS:
        raise StanzaError("bad-request", "expected <watchers/>")
    presentity = JID.parse(stanza.get("to") or stanza.get("from", "")).bare
    admin = origin is not None and str(origin.jid.bare) in module.server.config.admins  # type: ignore[union-attr]
    if origin is None or (origin.jid.bare != presentity and not admin):
        # Only the presentity itself (and the server's admins) may learn who watches it.
        raise StanzaError("forbidden", "only the account itself may read its watchers")
    answer = st.element(WATCHERS)
    for row in await list_watchers(presentity):
        attrs = {"jid": row.jid, "kind": row.kind, "status": row.status, "count": str(row.count)}
        if row.first is not None and row.last is not None:
            attrs["first"] = timestamp(row.first)
            attrs["last"] = timestamp(row.last)
        st.child(answer, WATCHER, attrs)
    return st.result(stanza, answer)
