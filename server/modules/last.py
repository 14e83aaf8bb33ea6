"""Last Activity (XEP-0012): the server's uptime, and when an account last logged out.

The logout time and the status of the last unavailable presence are recorded when an account's
last session ends. Who may ask is decided by the ``access/may-see-presence`` hook
(presentity bare JID, requester JID) -> True/False (or an awaitable of it), answered by the
presence module from the roster; with no answer only the account itself may ask.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING

from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza
from server.sessions import Session
from server.storage.base import NoSuchAccount
from server.xml import ns
from server.xml.stanza import PRESENCE, element, result

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.last")

module = Module("last")
module.feature(ns.LAST)

QUERY = ns.q(ns.LAST, "query")
_STATUS = ns.q(ns.CLIENT, "status")
_EXTRA_KEY = "last.status"  # session.extra: status text of the session's unavailable presence
_started = time.monotonic()


@module.on_load
def _start(_server: Server) -> None:
    global _started
    _started = time.monotonic()


@module.iq_get(ns.LAST)
def uptime(stanza: Stanza, _origin: Session | None) -> Stanza:
    """XEP-0012 §5: to a server, how long it has been up."""
    return result(stanza, element(QUERY, {"seconds": str(int(time.monotonic() - _started))}))


@module.iq_get(ns.LAST, to=("self", "bare"))
async def last_activity(stanza: Stanza, origin: Session | None) -> Stanza:
    """XEP-0012 §3: seconds since the account's last logout, with its last status text."""
    assert module.server is not None
    server = module.server
    to = stanza.get("to")
    if to is None:
        assert origin is not None  # no 'to' only comes from a client
        presentity = origin.jid.bare
    else:
        presentity = JID.parse(to).bare
    user = presentity.local
    assert user is not None
    if not await server.storage.accounts.exists(user, presentity.domain):
        raise StanzaError("service-unavailable")  # RFC 6121 §8.5.1: no such account
    requester = origin.jid if origin is not None else JID.parse(stanza.get("from", ""))
    if requester.bare != presentity and not await _may_see_presence(presentity, requester):
        # XEP-0012 §3 and §8: only those allowed to see the account's presence.
        raise StanzaError("forbidden", "you are not allowed to see this account's presence")
    # XEP-0012 §3: with an available resource, seconds='0' and no status.
    if any(s.presence is not None for s in server.sessions.resources(presentity)):
        return result(stanza, element(QUERY, {"seconds": "0"}))
    recorded = await server.storage.last_activity.get(user, presentity.domain)
    if recorded is None:
        raise StanzaError("item-not-found", "this account has not logged out yet")
    logout, status = recorded
    seconds = max(0, int(time.time()) - logout)
    return result(stanza, element(QUERY, {"seconds": str(seconds)}, status or None))


async def _may_see_presence(presentity: JID, requester: JID) -> bool:
    assert module.server is not None
    answer = module.server.hooks.fire("access/may-see-presence", presentity, requester)
    if inspect.isawaitable(answer):
        answer = await answer
    return answer is True


@module.on("presence/broadcast", priority=1000)
def _remember_status(stanza: Stanza, origin: Session) -> None:
    """Keep the status of an unavailable presence for the logout record; never consumes it."""
    if stanza.tag != PRESENCE:
        return None
    type_ = stanza.get("type")
    if type_ == "unavailable":
        if origin.extra is None:
            origin.extra = {}
        origin.extra[_EXTRA_KEY] = stanza.findtext(_STATUS) or ""
    elif type_ is None and origin.extra:
        origin.extra.pop(_EXTRA_KEY, None)  # available again: that status is no longer the last
    return None


@module.on("session-closed")
def _session_closed(session: Session, _reason: str) -> object:
    assert module.server is not None
    bare = session.jid.bare
    if module.server.sessions.resources(bare):
        return None  # not the account's last session
    status = (session.extra or {}).get(_EXTRA_KEY, "")
    return _record(bare, int(time.time()), status)


async def _record(bare: JID, logout: int, status: str) -> None:
    assert module.server is not None and bare.local is not None
    try:
        await module.server.storage.last_activity.set(bare.local, bare.domain, logout, status)
    except NoSuchAccount:
        log.info("event=last-activity-skipped jid=%s reason=no-such-account", bare)
