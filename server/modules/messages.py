"""Message delivery to local accounts by the rules of RFC 6121 §8.5.

A resource is *available* when it has sent available presence (session.presence is set) and
*connected* once bound. Messages for an account without a suitable resource go to the
`message/offline` hook (offline storage); when nothing stores them, the sender gets an error.
"""

from __future__ import annotations

from server.errors import StanzaError
from server.jid import JID
from server.module import Module, Stanza
from server.sessions import Session

module = Module("messages")

_KNOWN_TYPES = frozenset({"normal", "chat", "groupchat", "headline", "error"})


def _type(stanza: Stanza) -> str:
    # RFC 6121 §5.2.2: absent or unknown types are handled as 'normal'.
    kind = stanza.get("type")
    return kind if kind in _KNOWN_TYPES else "normal"


@module.on("message/full")
def to_full_jid(stanza: Stanza, origin: Session | None, to: JID) -> object:
    assert module.server is not None
    session = module.server.sessions.get(to)
    if session is not None:
        # RFC 6121 §8.5.3.1: an available or connected resource gets it, whatever the type.
        session.send(stanza)
        return True
    kind = _type(stanza)
    if kind == "error":
        return True  # §8.5.3.2.1: silently ignored
    if kind == "groupchat":
        raise StanzaError("service-unavailable")
    return to_bare_jid(stanza, origin, to.bare)  # §8.5.3.2.1: as if sent to the bare JID


@module.on("message/bare")
def to_bare_jid(stanza: Stanza, origin: Session | None, to: JID) -> object:
    assert module.server is not None
    kind = _type(stanza)
    if kind == "error":
        return True
    sessions = module.server.sessions.resources(to)
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
            return True
        return _no_available_resource(stanza, origin, to, kind)
    return _unavailable_account(stanza, origin, to, kind)


async def _unavailable_account(stanza: Stanza, origin: Session | None, to: JID,
                               kind: str) -> object:
    assert module.server is not None and to.local is not None
    if not await module.server.storage.accounts.exists(to.local, to.domain):
        # §8.5.1: no such account.
        if kind == "headline":
            return True
        raise StanzaError("service-unavailable")
    pending = _no_available_resource(stanza, origin, to, kind)
    if pending is not True and pending is not None:
        return await pending  # type: ignore[misc]
    return pending


def _no_available_resource(stanza: Stanza, origin: Session | None, to: JID, kind: str) -> object:
    # §8.5.2.2.1: headline is dropped, groupchat bounced, normal/chat stored or bounced.
    if kind == "headline":
        return True
    if kind == "groupchat":
        raise StanzaError("service-unavailable")
    assert module.server is not None
    stored = module.server.hooks.fire("message/offline", stanza, origin, to)
    if stored is None:
        raise StanzaError("service-unavailable", "the recipient is offline")
    return stored
