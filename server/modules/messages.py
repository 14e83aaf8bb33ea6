"""Message delivery to local accounts by the rules of RFC 6121 §8.5.

A resource is *available* when it has sent available presence (session.presence is set) and
*connected* once bound. Messages for an account without a suitable resource go to the
`message/offline` hook (offline storage); when nothing stores them, the sender gets an error.

Each delivery is announced with `message/delivered` (stanza, account bare JID, sessions): the
sessions of the account it was handed to, or none when it was stored offline (XEP-0280
carbons and XEP-0357 push listen to it).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from server import events
from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza, hook
from server.sessions import Session

_KNOWN_TYPES = frozenset({"normal", "chat", "groupchat", "headline", "error"})


def _type(stanza: Stanza) -> str:
    # RFC 6121 §5.2.2: absent or unknown types are handled as 'normal'.
    kind = stanza.get("type")
    return kind if kind in _KNOWN_TYPES else "normal"


class Messages(Module):
    name = "messages"

    @hook(events.MESSAGE_FULL)
    def to_full_jid(self, stanza: Stanza, origin: Session | None, to: JID) -> object:
        session = self.server.sessions.get(to)
        if session is not None:
            # RFC 6121 §8.5.3.1: an available or connected resource gets it, whatever the type.
            session.send(stanza)
            self._delivered(stanza, to.bare, (session,))
            return True
        kind = _type(stanza)
        if kind == "error":
            return True  # §8.5.3.2.1: silently ignored
        if kind == "groupchat":
            raise StanzaError("service-unavailable")
        return self.to_bare_jid(stanza, origin, to.bare)  # §8.5.3.2.1: as if to the bare JID

    @hook(events.MESSAGE_BARE)
    def to_bare_jid(self, stanza: Stanza, origin: Session | None, to: JID) -> object:
        kind = _type(stanza)
        if kind == "error":
            return True
        sessions = self.server.sessions.resources(to)
        if sessions:
            # §8.5.2.1.1: only available resources with non-negative priority receive it.
            targets = [s for s in sessions if s.presence is not None and s.priority >= 0]
            if targets:
                if kind == "groupchat":
                    raise StanzaError("service-unavailable")
                if kind != "headline":
                    # normal and chat: the highest-priority resource(s).
                    top = max(s.priority for s in targets)
                    targets = [s for s in targets if s.priority == top]
                for session in targets:
                    session.send(stanza)
                self._delivered(stanza, to, targets)
                return True
            return self._no_available_resource(stanza, origin, to, kind)
        return self._unavailable_account(stanza, origin, to, kind)

    async def _unavailable_account(self, stanza: Stanza, origin: Session | None, to: JID,
                                   kind: str) -> object:
        assert to.local is not None
        if not await self.server.storage.accounts.exists(to.local, to.domain):
            # §8.5.1: no such account.
            if kind == "headline":
                return True
            raise StanzaError("service-unavailable")
        pending = self._no_available_resource(stanza, origin, to, kind)
        if inspect.isawaitable(pending):
            return await pending
        return pending

    def _no_available_resource(self, stanza: Stanza, origin: Session | None, to: JID,
                               kind: str) -> object:
        # §8.5.2.2.1: headline is dropped, groupchat bounced, normal/chat stored or bounced.
        if kind == "headline":
            return True
        if kind == "groupchat":
            raise StanzaError("service-unavailable")
        stored = self.server.hooks.fire(events.MESSAGE_OFFLINE, stanza, origin, to)
        if stored is None:
            raise StanzaError("service-unavailable", "the recipient is offline")
        if self.server.hooks.has(events.MESSAGE_DELIVERED):
            return self._stored(stored, stanza, to)
        return stored

    def _delivered(self, stanza: Stanza, account: JID, sessions: Sequence[Session]) -> None:
        # Notification (carbons, push): delivered to these sessions of the account, or stored
        # offline (no sessions). Handlers neither block nor change the delivery (what they
        # return is not looked at: no collect() list on the path of every message).
        for handler in self.server.hooks.chain(events.MESSAGE_DELIVERED):
            handler(stanza, account, sessions)

    async def _stored(self, stored: object, stanza: Stanza, to: JID) -> object:
        result = await stored if inspect.isawaitable(stored) else stored
        self._delivered(stanza, to, ())
        return result
