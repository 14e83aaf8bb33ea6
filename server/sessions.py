"""Client sessions and the session directory (RFC 6120 §7 resource binding).

A *session* is a bound resource of an account: its JID, presence, priority and module state.
It is not its connection: a *transport* (a TCP stream today; WebSocket, BOSH, a resumed stream
management session later) attaches to a session and may detach from it, and the session's
`send` goes to whichever transport is attached. The *directory* answers "where is bare JID X
online, with which resources" and delivers through the sessions it returns; callers never
assume more of a session than the `Session` attributes below, so that a later directory shared
by several processes can hand out proxies for sessions held elsewhere.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Protocol

from server.errors import StanzaError
from server.jid import JID, InvalidJID, normalize_resource

if TYPE_CHECKING:
    from lxml.etree import _Element

# The flags of a session that turned nothing on: one shared empty set (an empty frozenset is
# 216 bytes, and CPython makes a new one on every call).
NO_FLAGS: frozenset[str] = frozenset()


class Transport(Protocol):
    """What a session needs of the stream it is attached to."""

    peer: str

    def deliver(self, stanza: _Element) -> None:
        """Queue a stanza for the client (serialised for this transport)."""

    def close(self, condition: str | None = None, text: str | None = None) -> None:
        """End the stream, with a stream error when condition is given."""


class Outbox(Protocol):
    """Where a session's outgoing stanzas go when a module keeps them (XEP-0198 stream
    management counts, queues until acknowledged, and holds them while detached)."""

    handled: int  # stanzas received from the client (XEP-0198 §4 'h')

    def send(self, stanza: _Element) -> None: ...

    def close_detached(self, condition: str | None, text: str | None) -> None:
        """close() of a session that has no transport now."""


class Gate(Protocol):
    """Holds back a session's unimportant stanzas for a while (XEP-0352 client state)."""

    def hold(self, stanza: _Element) -> bool:
        """True when the stanza is kept for later (then deliver() it later, in order)."""


class Session:
    """One bound resource. `state` holds module-private state through SessionSlots."""

    local_client = True  # stanzas from it get outbound processing (the user's server)
    remote = False  # [cluster]: a proxy for a session on another node (no SessionSlot state)
    __slots__ = ("bare_str", "directed", "flags", "gate", "interested", "jid", "jid_str",
                 "outbox", "presence", "priority", "state", "transport")

    def __init__(self, jid: JID, transport: Transport | None) -> None:
        self.jid = jid                     # full JID
        self.jid_str = str(jid)
        self.bare_str = str(jid.bare)
        self.priority = 0
        self.presence: _Element | None = None  # last available presence broadcast, None: none
        self.interested = False  # RFC 6121 §2.1.6: requested the roster, so gets roster pushes
        self.directed: set[JID] | None = None  # RFC 6121 §4.6: directed presence recipients
        # What the session turned on that other nodes of a cluster must know of (the
        # directory publishes it; e.g. "urn:xmpp:carbons:2"). Module state is in `state`.
        self.flags: frozenset[str] = NO_FLAGS
        self.state: dict[int, Any] | None = None  # SessionSlot values (server/module.py)
        self.transport = transport
        self.outbox: Outbox | None = None
        self.gate: Gate | None = None

    @property
    def connected(self) -> bool:
        """A stream carries it now (False: detached, kept for XEP-0198 resumption)."""
        return self.transport is not None

    def send(self, stanza: _Element) -> None:
        gate = self.gate
        if gate is not None:
            if gate.hold(stanza):
                return
        elif self.outbox is None:  # the usual case: deliver() inline, one call less
            transport = self.transport
            if transport is not None:
                transport.deliver(stanza)
            return
        self.deliver(stanza)

    def deliver(self, stanza: _Element) -> None:
        """Past the gate: to the outbox (stream management) or straight to the transport."""
        outbox = self.outbox
        if outbox is not None:
            outbox.send(stanza)
            return
        transport = self.transport
        if transport is not None:
            transport.deliver(stanza)

    def close(self, condition: str | None = None, text: str | None = None) -> None:
        transport = self.transport
        if transport is not None:
            transport.close(condition, text)
        elif self.outbox is not None:
            self.outbox.close_detached(condition, text)

    def __repr__(self) -> str:
        return f"<Session {self.jid_str}>"


class SessionDirectory(Protocol):
    """Who is online. The in-memory `SessionManager` is the one implementation today."""

    def bind(self, session: Session, requested: str | None) -> JID: ...

    def unbind(self, session: Session) -> bool: ...

    def get(self, full: JID) -> Session | None: ...

    def resources(self, bare: JID) -> list[Session]: ...

    def is_online(self, bare: JID) -> bool: ...

    def all(self) -> list[Session]: ...

    def changed(self, session: Session) -> None:
        """The session's presence, priority or roster interest changed (a directory shared by
        several nodes publishes it)."""

    def __len__(self) -> int: ...


class SessionManager:
    """The in-process SessionDirectory: bare JID -> resource -> session."""

    def __init__(self, max_per_user: int = 16) -> None:
        self._by_bare: dict[JID, dict[str, Session]] = {}
        self.max_per_user = max_per_user

    def bind(self, session: Session, requested: str | None) -> JID:
        """Choose the resource, set the session's full JID and register it. RFC 6120 §7.7.2:
        on conflict the new session wins and the old one is closed with a <conflict/> stream
        error (Prosody and ejabberd do the same). Raises StanzaError(bad-request |
        resource-constraint). `session.jid` is the bare JID on entry."""
        # The parse cache's own object: the router's parsed addresses then find the account
        # here (and in the modules' per-account dicts) by identity, without JID.__eq__.
        bare = JID.parse(str(session.jid.bare))
        resources = self._by_bare.get(bare)
        if requested:
            try:
                resource = normalize_resource(requested)
            except InvalidJID as exc:
                raise StanzaError("bad-request", f"invalid resource: {exc}") from exc
        else:
            resource = _generate_resource()
        if resources is not None:
            old = resources.get(resource)
            if old is not None:
                del resources[resource]
                old.close("conflict", "replaced by a new session with the same resource")
            elif len(resources) >= self.max_per_user:
                # RFC 6120 §7.6.2.1: too many resources bound for this account.
                raise StanzaError("resource-constraint", "too many sessions for this account")
        else:
            resources = self._by_bare[bare] = {}
        full = bare.with_resource(resource)
        session.jid = full
        session.jid_str = str(full)
        resources[resource] = session
        return full

    def unbind(self, session: Session) -> bool:
        """Forget a session; False when it was not (or no longer) registered."""
        jid = session.jid
        resources = self._by_bare.get(jid.bare)
        if resources is None or jid.resource is None or resources.get(jid.resource) is not session:
            return False
        del resources[jid.resource]
        if not resources:
            del self._by_bare[jid.bare]
        return True

    def get(self, full: JID) -> Session | None:
        resources = self._by_bare.get(full.bare)
        if resources is None or full.resource is None:
            return None
        return resources.get(full.resource)

    def resources(self, bare: JID) -> list[Session]:
        resources = self._by_bare.get(bare)
        return list(resources.values()) if resources else []

    def is_online(self, bare: JID) -> bool:
        return bare in self._by_bare

    def all(self) -> list[Session]:
        return [s for resources in self._by_bare.values() for s in resources.values()]

    def changed(self, session: Session) -> None:
        """Nothing to publish in one process (the cluster's directory overrides it)."""

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_bare.values())


def _generate_resource() -> str:
    return "presenced-" + secrets.token_hex(6)
