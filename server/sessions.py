"""Who is online: bare JID -> resource -> session (RFC 6120 §7 resource binding)."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Protocol

from server.errors import StanzaError
from server.jid import JID, InvalidJID, normalize_resource

if TYPE_CHECKING:
    from lxml.etree import _Element


class Session(Protocol):
    """What the router needs of a bound client session."""

    jid: JID  # full JID once bound
    priority: int
    presence: _Element | None  # last available presence broadcast, None while unavailable
    interested: bool           # requested the roster (RFC 6121 §2.1.6): gets roster pushes
    directed: set[JID] | None  # who got directed presence (RFC 6121 §4.6), to undo at logout
    extra: dict[str, Any] | None  # per-session state of feature modules

    def send(self, stanza: _Element) -> None: ...

    def close(self, condition: str | None = None, text: str | None = None) -> None: ...


class SessionManager:
    def __init__(self, max_per_user: int = 16) -> None:
        self._by_bare: dict[JID, dict[str, Session]] = {}
        self.max_per_user = max_per_user

    def bind(self, session: Session, bare: JID, requested: str | None) -> JID:
        """Choose and register the full JID. RFC 6120 §7.7.2: on conflict the new session wins
        and the old one is closed with a <conflict/> stream error (Prosody and ejabberd do the
        same). Raises StanzaError(bad-request | resource-constraint)."""
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

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_bare.values())


def _generate_resource() -> str:
    return "presenced-" + secrets.token_hex(6)
