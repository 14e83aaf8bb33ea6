"""XMPP addresses (RFC 7622): parsed once, normalised, cached."""

from __future__ import annotations

import functools
import ipaddress
from typing import final

import idna
import precis_i18n

_USERNAME = precis_i18n.get_profile("UsernameCaseMapped:ToLower")  # RFC 8265 §3.3 with RFC 7622 lower-casing
_OPAQUE = precis_i18n.get_profile("OpaqueString")
# RFC 7622 §3.3.1: characters the localpart may not contain beyond the PRECIS rules.
_LOCAL_FORBIDDEN = frozenset('"&\'/:<>@')
_MAX_PART = 1023


class InvalidJID(ValueError):
    pass


def normalize_localpart(s: str) -> str:
    if not isinstance(s, str) or not s:
        raise InvalidJID("empty localpart")
    try:
        out = _USERNAME.enforce(s)
    except UnicodeError as exc:
        raise InvalidJID(f"invalid localpart: {exc}") from exc
    if _LOCAL_FORBIDDEN.intersection(out):
        raise InvalidJID("localpart contains a forbidden character")
    if len(out.encode()) > _MAX_PART:
        raise InvalidJID("localpart too long")
    return out


def normalize_resource(s: str) -> str:
    if not isinstance(s, str) or not s:
        raise InvalidJID("empty resourcepart")
    try:
        out = _OPAQUE.enforce(s)
    except UnicodeError as exc:
        raise InvalidJID(f"invalid resourcepart: {exc}") from exc
    if len(out.encode()) > _MAX_PART:
        raise InvalidJID("resourcepart too long")
    return out


@functools.lru_cache(maxsize=4096)
def normalize_domain(s: str) -> str:
    if not isinstance(s, str) or not s:
        raise InvalidJID("empty domainpart")
    if s.endswith("."):
        s = s[:-1]
    if s.startswith("[") and s.endswith("]"):
        try:
            return "[" + str(ipaddress.IPv6Address(s[1:-1])) + "]"
        except ValueError as exc:
            raise InvalidJID("invalid IPv6 literal") from exc
    try:
        return str(ipaddress.IPv4Address(s))
    except ValueError:
        pass
    try:
        ascii_form = idna.encode(s, uts46=True).decode("ascii")
        out = idna.decode(ascii_form)
    except idna.IDNAError as exc:
        raise InvalidJID(f"invalid domainpart: {exc}") from exc
    if not out or len(out.encode()) > _MAX_PART:
        raise InvalidJID("invalid domainpart length")
    return out


@final
class JID:
    __slots__ = ("_bare", "_hash", "_str", "domain", "local", "resource")

    local: str | None
    domain: str
    resource: str | None

    def __init__(self, local: str | None, domain: str, resource: str | None,
                 _normalised: bool = False) -> None:
        if not _normalised:
            local = normalize_localpart(local) if local is not None else None
            domain = normalize_domain(domain)
            resource = normalize_resource(resource) if resource is not None else None
        object.__setattr__(self, "local", local)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "resource", resource)
        text = domain if local is None else f"{local}@{domain}"
        if resource is not None:
            text = f"{text}/{resource}"
        object.__setattr__(self, "_str", text)
        object.__setattr__(self, "_hash", hash(text))
        object.__setattr__(self, "_bare", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("JID is immutable")

    @classmethod
    def parse(cls, text: str) -> JID:
        return _parse(text)

    @classmethod
    def from_parts(cls, local: str | None, domain: str, resource: str | None = None) -> JID:
        return cls(local, domain, resource)

    @property
    def bare(self) -> JID:
        if self.resource is None:
            return self
        bare = self._bare
        if bare is None:
            bare = JID(self.local, self.domain, None, _normalised=True)
            object.__setattr__(self, "_bare", bare)
        return bare

    @property
    def is_bare(self) -> bool:
        return self.resource is None

    @property
    def is_domain(self) -> bool:
        return self.local is None and self.resource is None

    def with_resource(self, resource: str) -> JID:
        return JID(self.local, self.domain, normalize_resource(resource), _normalised=True)

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return f"JID({self._str!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JID) and other._str == self._str

    def __hash__(self) -> int:
        return self._hash


@functools.lru_cache(maxsize=65536)
def _parse(text: str) -> JID:
    if not isinstance(text, str):
        raise InvalidJID("a JID is a string")
    slash = text.find("/")
    if slash >= 0:
        head, resource = text[:slash], text[slash + 1:]
        if not resource:
            raise InvalidJID("empty resourcepart")
    else:
        head, resource = text, None
    at = head.find("@")
    if at >= 0:
        local, domain = head[:at], head[at + 1:]
        if not local:
            raise InvalidJID("empty localpart")
    else:
        local, domain = None, head
    return JID(local, domain, resource)
