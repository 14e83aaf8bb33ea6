"""The wire side of SASL2 (XEP-0388), Bind 2 (XEP-0386) and FAST (XEP-0484), pure.

Parsing of <authenticate/> into a Request, building of the <authentication/> feature and of
<challenge/>, <success/> and <failure/>; the HT-SHA-256-* proofs of FAST tokens
(draft-schmaus-kitten-sasl-ht: HMAC(token, "Initiator" || cb-data) from the client,
HMAC(token, "Responder" || cb-data) back); the stable Bind 2 resource. The negotiation machine
(server/stream/negotiation.py) decides what happens when.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from lxml import etree

from server.jid import InvalidJID, normalize_resource
from server.xml.numbers import NumberError, parse_optional_int

_Element: TypeAlias = etree._Element

SASL2 = "urn:xmpp:sasl:2"
BIND2 = "urn:xmpp:bind:0"
FAST = "urn:xmpp:fast:0"
SM = "urn:xmpp:sm:3"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"  # RFC 6120 §6.5: the failure conditions' namespace
AUTHENTICATE = f"{{{SASL2}}}authenticate"
RESPONSE = f"{{{SASL2}}}response"
ABORT = f"{{{SASL2}}}abort"
_INITIAL = f"{{{SASL2}}}initial-response"
_USER_AGENT = f"{{{SASL2}}}user-agent"
_BIND = f"{{{BIND2}}}bind"
_TAG = f"{{{BIND2}}}tag"
_RESUME = f"{{{SM}}}resume"
_REQUEST_TOKEN = f"{{{FAST}}}request-token"
_FAST = f"{{{FAST}}}fast"

# FAST mechanisms (HT-SHA-256-*), best first, and the channel binding each one signs; NONE
# signs nothing. -UNIQ (tls-unique) does not exist for TLS 1.3 and is not offered.
HT_MECHANISMS: dict[str, str | None] = {
    "HT-SHA-256-EXPR": "tls-exporter",
    "HT-SHA-256-ENDP": "tls-server-end-point",
    "HT-SHA-256-NONE": None,
}
MAX_TAG = 64  # characters of a Bind 2 <tag/> kept in the resource
FAST_COUNT_MAX = 2**63 - 1  # XEP-0484 <fast count/>: an unsigned counter, stored as int64


class Malformed(Exception):
    """An <authenticate/> we cannot use: condition is the RFC 6120 §6.5 failure to answer."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


@dataclass(frozen=True, slots=True)
class BindRequest:
    """XEP-0386 §3.2: <bind xmlns='urn:xmpp:bind:0'>: the tag and the features to enable."""

    tag: str | None
    features: tuple[_Element, ...] = ()


@dataclass(frozen=True, slots=True)
class FastUse:
    """XEP-0484 §3.4: <fast/> says the mechanism is used with a token."""

    count: int | None = None
    invalidate: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    mechanism: str
    initial_response: bytes | None   # None: absent (XEP-0388 §2.3)
    user_agent: str | None = None    # <user-agent id>: the client installation
    software: str | None = None
    device: str | None = None
    bind: BindRequest | None = None
    resume: _Element | None = None   # XEP-0198 <resume/>, inline
    request_token: str | None = None  # XEP-0484 <request-token mechanism>
    fast: FastUse | None = None
    extra: tuple[_Element, ...] = field(default=())  # children we do not know (ignored)


@dataclass(frozen=True, slots=True)
class Inline:
    """What the <authentication/> feature offers inline: Bind 2 with the features a session
    may enable in it (their disco names), XEP-0198 resumption, FAST."""

    bind2: tuple[str, ...] = ()
    sm: bool = False
    fast: bool = False


def decode(text: str | None) -> bytes | None:
    """XEP-0388 §2.2: base64 without the RFC 6120 '=' special case; whitespace is tolerated."""
    text = "".join((text or "").split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _true(value: str | None) -> bool:
    return value in ("1", "true")


def parse_authenticate(el: _Element) -> Request:
    """Raises Malformed."""
    mechanism = el.get("mechanism")
    if not mechanism:
        raise Malformed("invalid-mechanism", "'mechanism' is required")
    initial: bytes | None = None
    user_agent = software = device = request_token = None
    bind: BindRequest | None = None
    resume: _Element | None = None
    fast: FastUse | None = None
    extra: list[_Element] = []
    for child in el:
        tag = child.tag
        if not isinstance(tag, str):
            continue
        if tag == _INITIAL:
            initial = decode(child.text)
            if initial is None:
                raise Malformed("incorrect-encoding", "bad base64 in <initial-response/>")
        elif tag == _USER_AGENT:
            user_agent = child.get("id") or None
            software = child.findtext(f"{{{SASL2}}}software")
            device = child.findtext(f"{{{SASL2}}}device")
        elif tag == _BIND:
            tag_text = child.findtext(_TAG)
            features = tuple(c for c in child if isinstance(c.tag, str) and c.tag != _TAG)
            bind = BindRequest(tag_text.strip() if tag_text and tag_text.strip() else None,
                               features)
        elif tag == _RESUME:
            resume = child
        elif tag == _REQUEST_TOKEN:
            request_token = child.get("mechanism") or None
        elif tag == _FAST:
            try:  # XEP-0484 §3.4: a counter; '²' or 5,000 digits is a malformed request
                count = parse_optional_int(child.get("count"), maximum=FAST_COUNT_MAX,
                                           name="count")
            except NumberError as err:
                raise Malformed("malformed-request", f"<fast/> {err}") from None
            fast = FastUse(count, _true(child.get("invalidate")))
        else:
            extra.append(child)
    return Request(mechanism, initial, user_agent, software, device, bind, resume,
                   request_token, fast, tuple(extra))


# -- what we send --------------------------------------------------------------------------------

def _sub(parent: _Element, namespace: str, name: str, text: str | None = None,
         **attrs: str) -> _Element:
    child = etree.SubElement(parent, f"{{{namespace}}}{name}", attrs,
                             nsmap=None if etree.QName(parent).namespace == namespace
                             else {None: namespace})
    if text is not None:
        child.text = text
    return child


def authentication_feature(mechanisms: Sequence[str], inline: Inline,
                           fast_mechanisms: Sequence[str]) -> _Element:
    """XEP-0388 §2.1 <authentication/> with <inline/>: XEP-0386 §3.1 <bind/> (its own
    <inline/> of features), XEP-0198 <sm/>, XEP-0484 §3.1 <fast/>."""
    feature = etree.Element(f"{{{SASL2}}}authentication", nsmap={None: SASL2})
    for name in mechanisms:
        _sub(feature, SASL2, "mechanism", name)
    offered = etree.SubElement(feature, f"{{{SASL2}}}inline")
    bind = _sub(offered, BIND2, "bind")
    if inline.bind2:
        features = _sub(bind, BIND2, "inline")
        for var in inline.bind2:
            _sub(features, BIND2, "feature", var=var)
    if inline.sm:
        _sub(offered, SM, "sm")
    if inline.fast and fast_mechanisms:
        fast = _sub(offered, FAST, "fast")
        for name in fast_mechanisms:
            _sub(fast, FAST, "mechanism", name)
    return feature


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def challenge(data: bytes) -> bytes:
    return b'<challenge xmlns="urn:xmpp:sasl:2">%s</challenge>' % _b64(data).encode()


def success(authorization_identifier: str, additional_data: bytes | None,
            results: Sequence[_Element]) -> bytes:
    """XEP-0388 §2.6.1; results: the inline features' answers (<resumed/>, <bound/>,
    <token/>...)."""
    el = etree.Element(f"{{{SASL2}}}success", nsmap={None: SASL2})
    if additional_data is not None:  # absent data is no element (§2.2); empty data is one
        _sub(el, SASL2, "additional-data", _b64(additional_data))
    _sub(el, SASL2, "authorization-identifier", authorization_identifier)
    for result in results:
        el.append(result)
    data: bytes = etree.tostring(el)
    return data


def failure(condition: str, text: str | None = None) -> bytes:
    """XEP-0388 §2.6.2: one of the RFC 6120 §6.5 conditions, in the SASL namespace."""
    el = etree.Element(f"{{{SASL2}}}failure", nsmap={None: SASL2})
    _sub(el, SASL, condition)
    if text:
        _sub(el, SASL2, "text", text)
    data: bytes = etree.tostring(el)
    return data


def token_element(token: str, expiry: str) -> _Element:
    """XEP-0484 §3.3."""
    return etree.Element(f"{{{FAST}}}token", {"expiry": expiry, "token": token},
                         nsmap={None: FAST})


def bound_element(children: Sequence[_Element]) -> _Element:
    """XEP-0386 §3.2 <bound/> with the answers of the features enabled in it."""
    el = etree.Element(f"{{{BIND2}}}bound", nsmap={None: BIND2})
    for child in children:
        el.append(child)
    return el


# -- HT-SHA-256-* (FAST) --------------------------------------------------------------------------

def ht_initiator(token: str, cb_data: bytes) -> bytes:
    return hmac.digest(token.encode(), b"Initiator" + cb_data, "sha256")


def ht_responder(token: str, cb_data: bytes) -> bytes:
    return hmac.digest(token.encode(), b"Responder" + cb_data, "sha256")


def parse_ht(data: bytes) -> tuple[str, bytes] | None:
    """HT initial response: authcid NUL initiator-hashed-token. None when malformed."""
    authcid, sep, proof = data.partition(b"\0")
    if not sep or not authcid or len(proof) != 32:
        return None
    try:
        return authcid.decode("utf-8"), proof
    except UnicodeDecodeError:
        return None


# -- Bind 2 ---------------------------------------------------------------------------------------

def bind2_resource(tag: str | None, user_agent: str | None, account: str) -> str:
    """XEP-0386 §3.2.1: '[tag]/[server part]'. The server part is stable per account and
    user-agent id (a keyed hash: the id itself is never shown), random without an id. A tag
    that makes no valid resource is dropped."""
    if user_agent:
        digest = hashlib.sha256(f"{account}\0{user_agent}".encode()).digest()
        part = base64.b32encode(digest[:10]).decode().lower()
    else:
        part = secrets.token_hex(8)
    if tag:
        candidate = f"{tag[:MAX_TAG]}/{part}"
        try:
            return normalize_resource(candidate)
        except InvalidJID:
            pass
    return part
