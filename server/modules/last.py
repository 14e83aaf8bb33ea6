"""Last Activity (XEP-0012): the server's uptime, and when an account was last available.

The time and the status text are recorded when the account's last *available* resource
becomes unavailable, by an unavailable presence (its <status/>) or by disconnecting (no
status), as Prosody does; a resource that stays connected without presence does not count
as available. While a resource is available the answer is seconds='0' without status
(XEP-0012 §3). Who may ask is decided by the ``access/may-see-presence`` hook (presentity
bare JID, requester JID) -> True/False (or an awaitable of it), answered by the presence
module from the roster; with no answer only the account itself may ask.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

from server import events
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, ModuleContext, Stanza, hook, iq_get
from server.sessions import Session
from server.storage.base import NoSuchAccount
from server.xml import ns
from server.xml.stanza import element, result

log = logging.getLogger("presenced.last")

QUERY = ns.q(ns.LAST, "query")
_STATUS = ns.q(ns.CLIENT, "status")


class LastActivity(Module):
    name = "last"
    features = (ns.LAST,)

    def __init__(self, server: ModuleContext, config: Any) -> None:
        super().__init__(server, config)
        self.started = time.monotonic()  # for the uptime (XEP-0012 §5)

    async def start(self) -> None:
        self.started = time.monotonic()

    @iq_get(ns.LAST, "query")
    def uptime(self, stanza: Stanza, _origin: Session | None) -> Stanza:
        """XEP-0012 §5: to a server, how long it has been up."""
        seconds = int(time.monotonic() - self.started)
        return result(stanza, element(QUERY, {"seconds": str(seconds)}))

    @iq_get(ns.LAST, "query", to=("self", "bare"))
    async def last_activity(self, stanza: Stanza, origin: Session | None) -> Stanza:
        """XEP-0012 §3: seconds since the account was last available, with the status text
        of its last unavailable presence."""
        server = self.server
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
        if requester.bare != presentity and not await self._may_see_presence(presentity,
                                                                             requester):
            # XEP-0012 §3 and §8: only those allowed to see the account's presence.
            raise StanzaError("forbidden", "you are not allowed to see this account's presence")
        # XEP-0012 §3: with an available resource, seconds='0' and no status.
        if _available(server, presentity):
            return result(stanza, element(QUERY, {"seconds": "0"}))
        recorded = await server.storage.last_activity.get(user, presentity.domain)
        if recorded is None:
            raise StanzaError("item-not-found", "this account has not been available yet")
        logout, status = recorded
        seconds = max(0, int(time.time()) - logout)
        return result(stanza, element(QUERY, {"seconds": str(seconds)}, status or None))

    async def _may_see_presence(self, presentity: JID, requester: JID) -> bool:
        answer = self.server.hooks.fire(events.ACCESS_MAY_SEE_PRESENCE, presentity, requester)
        if inspect.isawaitable(answer):
            answer = await answer
        return answer is True

    @hook(events.PRESENCE_UNAVAILABLE)
    def _went_unavailable(self, session: Session, stanza: Stanza | None) -> object:
        """An available resource became unavailable (stanza None: it disconnected): the last
        activity when no other resource of the account is available."""
        bare = session.jid.bare
        if _available(self.server, bare):
            return None
        status = (stanza.findtext(_STATUS) or "") if stanza is not None else ""
        return self._record(bare, int(time.time()), status)

    async def _record(self, bare: JID, when: int, status: str) -> None:
        assert bare.local is not None
        try:
            await self.server.storage.last_activity.set(bare.local, bare.domain, when, status)
        except NoSuchAccount:
            log.info("event=last-activity-skipped jid=%s reason=no-such-account", bare)


def _available(server: ModuleContext, bare: JID) -> bool:
    return any(s.presence is not None for s in server.sessions.resources(bare))
