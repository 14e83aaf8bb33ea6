"""XMPP addresses (RFC 7622): parsed once, normalised, cached.

A JID holds the enforced (normalised) form of each part, so two JIDs are equal exactly when
RFC 7622 §3 says the addresses are the same; its canonical string is computed once.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, final

import idna
import precis_i18n

# RFC 7622 §3.3: localpart = UsernameCaseMapped (RFC 8265 §3.3), §3.4: resourcepart = OpaqueString.
_USERNAME = precis_i18n.get_profile("UsernameCaseMapped")
_OPAQUE = precis_i18n.get_profile("OpaqueString")
# RFC 7622 §3.3.1: characters the localpart may not contain beyond the PRECIS rules.
_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
# RFC 7622 §3.2-§3.4: each part is at most 1023 octets once normalised.
_MAX_PART = 1023
# Longest input worth normalising: NFC composes at most a few code points into one, so a part
# longer than this cannot come out under _MAX_PART. Stops PRECIS/IDNA from chewing on megabytes.
_MAX_INPUT = 8 * _MAX_PART
_CACHE = 1 << 16


class InvalidJID(ValueError):
    pass


def _too_long(s: str) -> bool:
    # A code point is 1 to 4 octets in UTF-8: encode only when the count cannot decide.
    n = len(s)
    return n > _MAX_PART or (n * 4 > _MAX_PART and len(s.encode()) > _MAX_PART)


def normalize_localpart(s: str) -> str:
    if not isinstance(s, str):
        raise InvalidJID("localpart must be a str")
    return _localpart(s)


@functools.lru_cache(maxsize=_CACHE)
def _localpart(s: str) -> str:
    if not s:
        raise InvalidJID("empty localpart")
    if len(s) > _MAX_INPUT:
        raise InvalidJID("localpart too long")
    try:
        out: str = _USERNAME.enforce(s)
    except UnicodeError as exc:
        raise InvalidJID(f"invalid localpart: {exc}") from None
    # Checked after enforcement so that width-mapped look-alikes (U+FF20 -> "@") are caught too.
    if not _LOCAL_FORBIDDEN.isdisjoint(out):
        raise InvalidJID("localpart contains a character forbidden by RFC 7622 §3.3.1")
    if _too_long(out):
        raise InvalidJID("localpart longer than 1023 octets")
    return out


def normalize_resource(s: str) -> str:
    if not isinstance(s, str):
        raise InvalidJID("resourcepart must be a str")
    return _resource(s)


@functools.lru_cache(maxsize=_CACHE)
def _resource(s: str) -> str:
    if not s:
        raise InvalidJID("empty resourcepart")
    if len(s) > _MAX_INPUT:
        raise InvalidJID("resourcepart too long")
    try:
        out: str = _OPAQUE.enforce(s)
    except UnicodeError as exc:
        raise InvalidJID(f"invalid resourcepart: {exc}") from None
    if _too_long(out):
        raise InvalidJID("resourcepart longer than 1023 octets")
    return out


def normalize_domain(s: str) -> str:
    if not isinstance(s, str):
        raise InvalidJID("domainpart must be a str")
    return _domain(s)


@functools.lru_cache(maxsize=_CACHE)
def _domain(s: str) -> str:
    if not s:
        raise InvalidJID("empty domainpart")
    if len(s) > _MAX_INPUT:
        raise InvalidJID("domainpart too long")
    # RFC 7622 §3.2: one final label separator is stripped before anything else.
    literal = s[:-1] if s.endswith(".") else s
    if literal.startswith("["):
        return _ipv6_literal(literal)
    try:
        return str(ipaddress.IPv4Address(literal))
    except ValueError:
        pass
    try:
        # RFC 7622 §3.2: IDNA2008 (RFC 5890-5892) with the UTS #46 mapping (case, width, dots).
        ascii_form = idna.encode(s, uts46=True).decode("ascii")
    except UnicodeError as exc:
        raise InvalidJID(f"invalid domainpart: {exc}") from None
    if ascii_form.endswith("."):  # the separator may have been U+3002 etc. before mapping
        ascii_form = ascii_form[:-1]
    last = ascii_form.rpartition(".")[2]
    if last.isdigit():
        # RFC 3696 §2: no all-numeric top-level label. A digits-only name is an IPv4 address in
        # another spelling (fullwidth digits) or nothing; never let it alias an address.
        try:
            return str(ipaddress.IPv4Address(ascii_form))
        except ValueError:
            raise InvalidJID("invalid domainpart: numeric top-level label") from None
    if "xn--" not in ascii_form:
        out = ascii_form  # already lower-case LDH: its own U-label form
    else:
        try:
            out = idna.decode(ascii_form)
        except UnicodeError as exc:
            raise InvalidJID(f"invalid domainpart: {exc}") from None
    if _too_long(out):
        raise InvalidJID("domainpart longer than 1023 octets")
    return out


def _ipv6_literal(s: str) -> str:
    # RFC 7622 §3.2 / RFC 3986 §3.2.2: IP-literal = "[" IPv6address "]"; no zone identifier.
    inner = s[1:-1]
    if not s.endswith("]") or "%" in inner:
        raise InvalidJID("invalid IPv6 literal")
    try:
        return f"[{ipaddress.IPv6Address(inner)}]"
    except ValueError:
        raise InvalidJID("invalid IPv6 literal") from None


@final
class JID:
    """An XMPP address. Build with JID.parse or JID.from_parts; immutable and hashable."""

    __slots__ = ("_bare", "_hash", "_str", "domain", "local", "resource")

    local: str | None
    domain: str
    resource: str | None
    _bare: JID | None  # None when this JID is itself bare (no self-reference cycle)
    _str: str
    _hash: int

    def __init__(self, local: str | None, domain: str, resource: str | None = None) -> None:
        _init(self, *_normalise_parts(local, domain, resource), None)

    @classmethod
    def parse(cls, text: str) -> JID:
        if not isinstance(text, str):
            raise InvalidJID("a JID is a str")
        return _parse(text)

    @classmethod
    def from_parts(cls, local: str | None, domain: str, resource: str | None = None) -> JID:
        return cls(local, domain, resource)

    @property
    def bare(self) -> JID:
        bare = self._bare
        return self if bare is None else bare

    @property
    def is_bare(self) -> bool:
        return self.resource is None

    @property
    def is_domain(self) -> bool:
        return self.local is None and self.resource is None

    def with_resource(self, resource: str) -> JID:
        bare = self.bare
        return _make(bare.local, bare.domain, normalize_resource(resource), bare)

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return f"JID({self._str!r})"

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if type(other) is not JID:
            return NotImplemented
        return self._hash == other._hash and self._str == other._str

    def __hash__(self) -> int:
        return self._hash

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("JID is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("JID is immutable")

    # Immutable: copies are the object itself; pickling goes through the canonical string.
    def __copy__(self) -> JID:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> JID:
        return self

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_parse, (self._str,))


def _normalise_parts(
    local: str | None, domain: str, resource: str | None
) -> tuple[str | None, str, str | None]:
    return (
        None if local is None else normalize_localpart(local),
        normalize_domain(domain),
        None if resource is None else normalize_resource(resource),
    )


def _init(jid: JID, local: str | None, domain: str, resource: str | None,
          bare: JID | None) -> None:
    """Fill a JID from parts that are already normalised (no PRECIS or IDNA here)."""
    text = domain if local is None else f"{local}@{domain}"
    if resource is not None:
        text = f"{text}/{resource}"
        if bare is None:
            bare = _make(local, domain, None, None)
    setattr_ = object.__setattr__
    setattr_(jid, "local", local)
    setattr_(jid, "domain", domain)
    setattr_(jid, "resource", resource)
    setattr_(jid, "_bare", bare)
    setattr_(jid, "_str", text)
    setattr_(jid, "_hash", hash(text))


def _make(local: str | None, domain: str, resource: str | None, bare: JID | None) -> JID:
    jid = object.__new__(JID)
    _init(jid, local, domain, resource, bare)
    return jid


@functools.lru_cache(maxsize=_CACHE)
def _parse(text: str) -> JID:
    # RFC 7622 §3.1: the first "/" starts the resourcepart (which may hold "/" and "@");
    # the first "@" before it ends the localpart.
    head, slash, resource = text.partition("/")
    if slash:
        if not resource:
            raise InvalidJID("empty resourcepart")
        # The bare JID comes from (and stays in) the cache: full JIDs of one account share it
        # and only the resource goes through PRECIS here.
        bare = _parse(head)
        return _make(bare.local, bare.domain, normalize_resource(resource), bare)
    local, at, domain = head.partition("@")
    if not at:
        return _make(None, normalize_domain(head), None, None)
    if not local:
        raise InvalidJID("empty localpart")
    if not domain:
        raise InvalidJID("empty domainpart")
    return _make(normalize_localpart(local), normalize_domain(domain), None, None)
