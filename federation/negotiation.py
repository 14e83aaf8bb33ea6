"""Server-to-server stream negotiation as pure state machines (RFC 6120 §4–§6, XEP-0178,
XEP-0220): parser events in, actions out. The I/O layer (inbound.py, outbound.py) carries the
actions out and reports back what it learnt (TLS up and whose certificate verified, the answer
of an authoritative server).

Roles as XEP-0220 names them: the *initiating* (originating) server opens an outbound stream;
the *receiving* server accepts it and, for dialback, asks the *authoritative* server of the
originating domain whether the key is genuine.
"""

from __future__ import annotations

import base64
import binascii
import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from lxml import etree

from server.jid import JID, InvalidJID, normalize_domain
from server.stream.negotiation import CloseStream, RestartStream, Send, StartTLS, version_ok
from server.xml import ns
from server.xml.parser import StreamClosed, StreamOpened
from server.xml.writer import stream_header

_Element: TypeAlias = etree._Element
Event: TypeAlias = StreamOpened | StreamClosed | _Element

STREAM = ns.q(ns.STREAMS, "stream")
FEATURES = ns.q(ns.STREAMS, "features")
STREAM_ERROR = ns.q(ns.STREAMS, "error")
STARTTLS = ns.q(ns.TLS, "starttls")
PROCEED = ns.q(ns.TLS, "proceed")
TLS_FAILURE = ns.q(ns.TLS, "failure")
MECHANISMS = ns.q(ns.SASL, "mechanisms")
AUTH = ns.q(ns.SASL, "auth")
SUCCESS = ns.q(ns.SASL, "success")
SASL_FAILURE = ns.q(ns.SASL, "failure")
DB_RESULT = ns.q(ns.DIALBACK, "result")
DB_VERIFY = ns.q(ns.DIALBACK, "verify")
DIALBACK_FEATURE = ns.q(ns.DIALBACK_FEATURE, "dialback")
BIDI = ns.q(ns.BIDI, "bidi")
BIDI_FEATURE = ns.q(ns.BIDI_FEATURE, "bidi")
STANZA_TAGS = frozenset(ns.q(ns.SERVER, name) for name in ("message", "presence", "iq"))
MAX_SASL_FAILURES = 3
MAX_PENDING_VERIFICATIONS = 8  # dialback requests one inbound stream may have under way
_DB_NSMAP: dict[str | None, str] = {"db": ns.DIALBACK}
_EXTRA_NS = {"db": ns.DIALBACK}


# -- actions (Send, StartTLS, RestartStream and CloseStream are the c2s machine's) --------------

@dataclass(frozen=True, slots=True)
class Authenticated:
    """Stanzas from `remote` to `local` may now flow on this stream."""
    local: str
    remote: str
    method: str  # "sasl-external", "dialback", "dialback-certificate"


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """Inbound: ask the authoritative server of `remote` whether `key` is genuine (XEP-0220
    §2.3); answer with InboundNegotiation.dialback_verified()."""
    local: str
    remote: str
    key: str


@dataclass(frozen=True, slots=True)
class Deliver:
    stanza: _Element


@dataclass(frozen=True, slots=True)
class Ready:
    """Outbound: authenticated; queued stanzas may go."""
    method: str


@dataclass(frozen=True, slots=True)
class CanVerify:
    """Outbound: the stream is far enough (TLS settled) to carry <db:verify/> requests."""


@dataclass(frozen=True, slots=True)
class VerifyAnswer:
    """Outbound: the authoritative server's answer to a <db:verify/> we sent."""
    local: str
    remote: str
    stream_id: str
    valid: bool


@dataclass(frozen=True, slots=True)
class Failed:
    """Outbound: the stream cannot be authenticated; bounce what waits for it."""
    condition: str
    text: str


Action = (Send | StartTLS | RestartStream | CloseStream | Authenticated | VerifyKey | Deliver
          | Ready | CanVerify | VerifyAnswer | Failed)


@dataclass(frozen=True)
class Policy:
    domains: frozenset[str]                   # hosted domains
    require_tls: bool = True
    require_valid_certificates: bool = False
    bidi: bool = True                         # offer and use XEP-0288
    allowed: Callable[[str], bool] = field(default=lambda _domain: True)
    # XEP-0185 key for (receiving server, originating server, stream id)
    dialback_key: Callable[[str, str, str], str] = field(default=lambda r, o, i: "")
    keys_equal: Callable[[str, str], bool] = field(default=secrets.compare_digest)


# -- helpers -----------------------------------------------------------------------------------

def _domain(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return normalize_domain(value)
    except InvalidJID:
        return None


def _element(tag: str, attrs: dict[str, str], text: str | None = None,
             nsmap: dict[str | None, str] | None = None) -> _Element:
    el = etree.Element(tag, attrs, nsmap=nsmap)
    if text is not None:
        el.text = text
    return el


def dialback_element(kind: str, attrs: dict[str, str], key: str | None = None,
                     error: str | None = None) -> bytes:
    """<db:result/> or <db:verify/>; an error carries a stanza error (XEP-0220 §2.4) whose
    <error/> is in the stream's content namespace, jabber:server, like a stanza's."""
    el = _element(ns.q(ns.DIALBACK, kind), attrs, key, _DB_NSMAP)
    if error is not None:
        err = etree.SubElement(el, ns.q(ns.SERVER, "error"), type="cancel",
                               nsmap={None: ns.SERVER})
        etree.SubElement(err, ns.q(ns.STANZA_ERRORS, error), nsmap={None: ns.STANZA_ERRORS})
    data: bytes = etree.tostring(el)
    return data


def _check_header(event: StreamOpened) -> tuple[str, str] | None:
    """The stream error for a bad s2s header (RFC 6120 §4.9.3), or None."""
    if event.tag != STREAM:
        if etree.QName(event.tag).localname == "stream":
            return "invalid-namespace", "stream namespace is wrong"
        return "invalid-xml", "root element must be <stream:stream>"
    if event.default_ns != ns.SERVER:
        return "invalid-namespace", "content namespace must be jabber:server"
    version = event.attrs.get("version")
    # RFC 6120 §4.7.5: no version means 0.9, which we do not speak.
    if version is None or not version_ok(version):
        return "unsupported-version", "XMPP 1.0 is required"
    return None


def _sasl_failure(condition: str) -> bytes:
    return (f'<failure xmlns="{ns.SASL}"><{condition}/></failure>').encode()


def verify_request(local: str, remote: str, stream_id: str, key: str) -> bytes:
    """<db:verify/> asking the peer (authoritative for `remote`) about a key it sent us on its
    stream `stream_id` (XEP-0220 §2.1.2)."""
    return dialback_element("verify", {"from": local, "to": remote, "id": stream_id}, key)


def answer_verify(policy: Policy, el: _Element) -> list[Action] | None:
    """We are the authoritative server (XEP-0220 §2.3.2): is the key one we made?
    None when the request is malformed."""
    receiving, originating = _domain(el.get("from")), _domain(el.get("to"))
    stream_id = el.get("id")
    key = (el.text or "").strip()
    if receiving is None or originating is None or not stream_id:
        return None
    attrs = {"from": originating, "to": receiving, "id": stream_id}
    if originating not in policy.domains:
        return [Send(dialback_element("verify", {**attrs, "type": "error"},
                                      error="item-not-found"))]
    expected = policy.dialback_key(receiving, originating, stream_id)
    valid = bool(key) and policy.keys_equal(key, expected)
    return [Send(dialback_element("verify", {**attrs, "type": "valid" if valid else "invalid"}))]


def check_stanza(el: _Element, hosts: frozenset[str], remotes: set[str],
                 pairs: set[tuple[str, str]]) -> tuple[str, str] | None:
    """The stream error for a stanza a peer may not send on this stream, or None.
    pairs: the (local, remote) domain pairs the stream authenticated."""
    sender, to = el.get("from"), el.get("to")
    # RFC 6120 §8.1.1.2, §8.1.2.2: both are required on server-to-server streams.
    if not sender or not to:
        return "improper-addressing", "a stanza needs 'from' and 'to'"
    try:
        sender_jid, to_jid = JID.parse(sender), JID.parse(to)
    except InvalidJID:
        return "improper-addressing", "'from' or 'to' is not a valid JID"
    # RFC 6120 §4.9.3.9: only domains this stream authenticated may send.
    if sender_jid.domain not in remotes:
        return "invalid-from", f"{sender_jid.domain} is not authenticated here"
    if to_jid.domain not in hosts:
        return "host-unknown", f"{to_jid.domain} is not served here"
    if (to_jid.domain, sender_jid.domain) not in pairs:
        return "not-authorized", f"{sender_jid.domain} is not authenticated for {to_jid.domain}"
    return None


class Stage(enum.Enum):
    AWAIT_HEADER = "await-header"
    OPEN = "open"              # features sent (inbound) / received (outbound)
    STARTING_TLS = "starting-tls"
    SASL = "sasl"              # outbound: <auth/> sent
    DIALBACK = "dialback"      # outbound: <db:result/> sent
    READY = "ready"
    CLOSED = "closed"


# -- the receiving server ------------------------------------------------------------------------

class InboundNegotiation:
    """A stream another server opened to us. Authentication is per (local, remote) domain pair:
    one by SASL EXTERNAL, any number by dialback (XEP-0220 §2.6 multiplexing)."""

    def __init__(self, policy: Policy, *, direct_tls: bool = False,
                 certificate_valid: Callable[[str], bool] = lambda _domain: False) -> None:
        self.policy = policy
        self.tls = direct_tls
        self.stage = Stage.AWAIT_HEADER
        self.stream_id = ""
        self.local: str | None = None      # the header's 'to'
        self.remote: str | None = None     # the header's 'from', when given
        self.header_sent = False
        self.sasl_done = False
        self.bidi = False                  # XEP-0288: the peer asked for it
        self.authenticated: set[tuple[str, str]] = set()  # (local, remote)
        self._remotes: set[str] = set()
        self._pending: set[tuple[str, str]] = set()
        self._certificate_valid = certificate_valid
        self._sasl_failures = 0

    # -- inputs ------------------------------------------------------------------------------

    def tls_established(self) -> None:
        self.tls = True
        self.stage = Stage.AWAIT_HEADER

    def receive(self, event: Event) -> list[Action]:
        if self.stage is Stage.CLOSED:
            return []
        if isinstance(event, StreamOpened):
            return self._stream_opened(event)
        if isinstance(event, StreamClosed):
            self.stage = Stage.CLOSED
            return [CloseStream()]
        if self.stage is not Stage.OPEN:
            return self._fail("bad-format", "element before stream header")
        tag = event.tag
        if tag in STANZA_TAGS:
            return self._stanza(event)
        if tag == DB_RESULT:
            return self._db_result(event)
        if tag == DB_VERIFY:
            return self._db_verify(event)
        if tag == STARTTLS:
            return self._starttls()
        if tag == AUTH:
            return self._auth(event)
        if tag == BIDI:
            return self._bidi()
        if tag == STREAM_ERROR:
            self.stage = Stage.CLOSED
            return [CloseStream()]
        return self._fail("unsupported-stanza-type", f"unexpected element {tag}")

    def _bidi(self) -> list[Action]:
        # XEP-0288 §2.2: after TLS, before authentication.
        if not self.policy.bidi or self.authenticated or self.sasl_done or (
                self.policy.require_tls and not self.tls):
            return self._fail("policy-violation", "bidirectionality is not available now")
        self.bidi = True
        return []

    def dialback_verified(self, local: str, remote: str, valid: bool | None) -> list[Action]:
        """The authoritative server's answer (None: it could not be reached)."""
        self._pending.discard((local, remote))
        if self.stage is Stage.CLOSED:
            return []
        attrs = {"from": local, "to": remote}
        if valid is None:
            return [Send(dialback_element("result", {**attrs, "type": "error"},
                                          error="remote-connection-failed"))]
        if not valid:
            # XEP-0220 §2.2.1: a spoofing attempt; we say so and close the stream.
            self.stage = Stage.CLOSED
            return [Send(dialback_element("result", {**attrs, "type": "invalid"})),
                    CloseStream()]
        return self._authorize(local, remote, "dialback")

    # -- stream header -----------------------------------------------------------------------

    def _stream_opened(self, event: StreamOpened) -> list[Action]:
        if self.stage is not Stage.AWAIT_HEADER:
            return self._fail("bad-format", "unexpected stream header")
        self.stream_id = secrets.token_urlsafe(16)
        to = _domain(event.attrs.get("to"))
        sender = _domain(event.attrs.get("from"))
        from_ = to if to in self.policy.domains else min(self.policy.domains)
        out: list[Action] = [Send(stream_header(
            content_ns=ns.SERVER, from_=from_, to=sender, id_=self.stream_id,
            extra_ns=_EXTRA_NS))]
        self.header_sent = True
        problem = _check_header(event)
        if problem is not None:
            return out + self._fail(*problem)
        if to is None or to not in self.policy.domains:
            return out + self._fail("host-unknown", f"{event.attrs.get('to')} is not served here")
        if self.local is not None and to != self.local:
            return out + self._fail("host-unknown", "the domain changed on stream restart")
        if sender is not None and not self.policy.allowed(sender):
            return out + self._fail("policy-violation", f"no federation with {sender}")
        self.local = to
        if sender is not None and self.remote is None:
            self.remote = sender
        self.stage = Stage.OPEN
        return [*out, Send(self._features())]

    def _features(self) -> bytes:
        parts: list[str] = []
        if not self.tls:
            required = "<required/>" if self.policy.require_tls else ""
            parts.append(f'<starttls xmlns="{ns.TLS}">{required}</starttls>')
        usable = self.tls or not self.policy.require_tls
        if usable and not self.sasl_done:
            # XEP-0178: EXTERNAL only when the certificate is valid for the claimed domain.
            if self.tls and self.remote is not None and self._certificate_valid(self.remote):
                parts.append(f'<mechanisms xmlns="{ns.SASL}"><mechanism>EXTERNAL</mechanism>'
                             "</mechanisms>")
            parts.append(f'<dialback xmlns="{ns.DIALBACK_FEATURE}"><errors/></dialback>')
            if self.policy.bidi:
                parts.append(f'<bidi xmlns="{ns.BIDI_FEATURE}"/>')
        return ("<stream:features>" + "".join(parts) + "</stream:features>").encode()

    # -- negotiation elements ----------------------------------------------------------------

    def _starttls(self) -> list[Action]:
        if self.tls:
            self.stage = Stage.CLOSED
            return [Send(f'<failure xmlns="{ns.TLS}"/>'.encode()), CloseStream()]
        self.stage = Stage.STARTING_TLS
        return [Send(f'<proceed xmlns="{ns.TLS}"/>'.encode()), StartTLS()]

    def _auth(self, el: _Element) -> list[Action]:
        if not self.tls or self.sasl_done:
            return self._fail("policy-violation", "SASL is offered over TLS, once")
        if el.get("mechanism") != "EXTERNAL":
            return self._sasl_refused("invalid-mechanism")
        text = (el.text or "").strip()
        identity = self.remote
        if text and text != "=":
            try:
                identity = _domain(base64.b64decode(text, validate=True).decode("utf-8"))
            except (binascii.Error, UnicodeDecodeError):
                return self._sasl_refused("incorrect-encoding")
        # RFC 6120 §6.4.6 / XEP-0178 §3: the identity is the authzid, else the stream's 'from';
        # the certificate must be valid for it.
        if (identity is None or identity in self.policy.domains
                or not self.policy.allowed(identity)):
            return self._sasl_refused("not-authorized")
        if self.remote is not None and identity != self.remote:
            return self._sasl_refused("invalid-authzid")
        if not self._certificate_valid(identity):
            return self._sasl_refused("not-authorized")
        assert self.local is not None
        self.remote = identity
        self.sasl_done = True
        self.stage = Stage.AWAIT_HEADER
        self.authenticated.add((self.local, identity))
        self._remotes.add(identity)
        return [Send(f'<success xmlns="{ns.SASL}"/>'.encode()), RestartStream(),
                Authenticated(self.local, identity, "sasl-external")]

    def _sasl_refused(self, condition: str) -> list[Action]:
        self._sasl_failures += 1
        out: list[Action] = [Send(_sasl_failure(condition))]
        if self._sasl_failures >= MAX_SASL_FAILURES:
            return out + self._fail("policy-violation", "too many authentication failures")
        return out

    def _db_result(self, el: _Element) -> list[Action]:
        if el.get("type") is not None:
            return self._fail("unsupported-stanza-type", "a dialback answer on an inbound stream")
        local, remote = _domain(el.get("to")), _domain(el.get("from"))
        key = (el.text or "").strip()
        if local is None or remote is None or not key:
            return self._fail("improper-addressing", "<db:result/> needs 'from', 'to' and a key")
        if self.policy.require_tls and not self.tls:
            return self._fail("policy-violation", "negotiate TLS first")
        reply = {"from": local, "to": remote, "type": "error"}
        if local not in self.policy.domains:
            return [Send(dialback_element("result", reply, error="item-not-found"))]
        # A peer never speaks for one of our own domains (nor for a domain policy excludes).
        if remote in self.policy.domains or not self.policy.allowed(remote):
            return [Send(dialback_element("result", reply, error="forbidden"))]
        if (local, remote) in self.authenticated:
            return [Send(dialback_element("result", {**reply, "type": "valid"}))]
        certified = self.tls and self._certificate_valid(remote)
        if self.policy.require_valid_certificates and not certified:
            return [Send(dialback_element("result", reply, error="not-authorized"))]
        if certified:
            # XEP-0344 §2.4: a certificate valid for the domain already proves the identity.
            return self._authorize(local, remote, "dialback-certificate")
        if (local, remote) in self._pending:
            return []
        if len(self._pending) >= MAX_PENDING_VERIFICATIONS:
            # Each one costs us a connection to another server: no amplification.
            return [Send(dialback_element("result", reply, error="resource-constraint"))]
        self._pending.add((local, remote))
        return [VerifyKey(local, remote, key)]

    def _authorize(self, local: str, remote: str, method: str) -> list[Action]:
        self.authenticated.add((local, remote))
        self._remotes.add(remote)
        return [Send(dialback_element("result", {"from": local, "to": remote, "type": "valid"})),
                Authenticated(local, remote, method)]

    def _db_verify(self, el: _Element) -> list[Action]:
        if el.get("type") is not None:
            return self._fail("unsupported-stanza-type", "a verify answer on an inbound stream")
        answer = answer_verify(self.policy, el)
        return answer if answer is not None else self._fail(
            "improper-addressing", "<db:verify/> needs 'from', 'to' and 'id'")

    def _stanza(self, el: _Element) -> list[Action]:
        if not self.authenticated:
            return self._fail("not-authorized", "authenticate before sending stanzas")
        problem = check_stanza(el, self.policy.domains, self._remotes, self.authenticated)
        return [Deliver(el)] if problem is None else self._fail(*problem)

    def _fail(self, condition: str, text: str) -> list[Action]:
        self.stage = Stage.CLOSED
        return [CloseStream(condition, text)]


# -- the initiating server -----------------------------------------------------------------------

class OutboundNegotiation:
    """Our stream to a peer for one (local, remote) domain pair."""

    def __init__(self, policy: Policy, local: str, remote: str, *,
                 direct_tls: bool = False) -> None:
        self.policy = policy
        self.local = local
        self.remote = remote
        self.tls = direct_tls
        self.certificate_valid = False
        self.stage = Stage.AWAIT_HEADER
        self.stream_id: str | None = None
        self.method = ""
        self._sasl_done = False
        self._dialback_offered = False
        self._can_verify = False
        self.bidi = False  # XEP-0288: the peer may send us stanzas on this stream

    def start(self) -> list[Action]:
        return [Send(self._header())]

    def _header(self) -> bytes:
        return stream_header(content_ns=ns.SERVER, from_=self.local, to=self.remote, id_=None,
                             extra_ns=_EXTRA_NS)

    def tls_established(self, certificate_valid: bool) -> list[Action]:
        self.tls = True
        self.certificate_valid = certificate_valid
        self.stage = Stage.AWAIT_HEADER
        if not certificate_valid and self.policy.require_valid_certificates:
            return self._failed("remote-server-not-found",
                                f"the certificate of {self.remote} does not verify")
        return [RestartStream(), Send(self._header())]

    def verify_request(self, stream_id: str, key: str) -> bytes:
        return verify_request(self.local, self.remote, stream_id, key)

    def receive(self, event: Event) -> list[Action]:
        if self.stage is Stage.CLOSED:
            return []
        if isinstance(event, StreamOpened):
            return self._stream_opened(event)
        if isinstance(event, StreamClosed):
            if self.stage is Stage.READY:  # e.g. the peer closed an idle stream
                self.stage = Stage.CLOSED
                return [CloseStream()]
            return self._failed("remote-server-not-found", "the peer closed the stream")
        tag = event.tag
        if tag == FEATURES and self.stage is Stage.OPEN:
            return self._features(event)
        if tag == PROCEED and self.stage is Stage.STARTING_TLS:
            return [StartTLS()]
        if tag == SUCCESS and self.stage is Stage.SASL:
            self._sasl_done = True
            self.stage = Stage.AWAIT_HEADER
            return [RestartStream(), Send(self._header())]
        if tag == SASL_FAILURE and self.stage is Stage.SASL:
            if self._dialback_offered:
                return self._dialback()
            return self._failed("remote-server-not-found", "SASL EXTERNAL was refused")
        if tag == DB_RESULT and self.stage is Stage.DIALBACK:
            return self._db_result(event)
        if tag == DB_VERIFY and event.get("type") is not None:
            local, remote = _domain(event.get("to")), _domain(event.get("from"))
            if local != self.local or remote != self.remote or not event.get("id"):
                return self._fail("improper-addressing", "a verify answer for someone else")
            return [VerifyAnswer(self.local, self.remote, event.get("id", ""),
                                 event.get("type") == "valid")]
        if tag == STREAM_ERROR:
            condition = next((etree.QName(c).localname for c in event
                              if etree.QName(c).namespace == ns.STREAM_ERRORS
                              and etree.QName(c).localname != "text"), "undefined-condition")
            self.stage = Stage.CLOSED
            return [Failed("remote-server-not-found", f"the peer sent <{condition}/>"),
                    CloseStream()]
        if tag == TLS_FAILURE:
            return self._failed("remote-server-not-found", "the peer refused TLS")
        if tag in STANZA_TAGS:
            # Without XEP-0288 a stream carries stanzas one way only; with it, the peer sends
            # from its domain to ours once we are authenticated (XEP-0288 §2.2).
            if not self.bidi or self.stage is not Stage.READY:
                return self._fail("unsupported-stanza-type", "stanzas go on your own stream")
            problem = check_stanza(event, self.policy.domains, {self.remote},
                                   {(self.local, self.remote)})
            return [Deliver(event)] if problem is None else self._fail(*problem)
        if tag == DB_VERIFY and self.bidi:
            answer = answer_verify(self.policy, event)
            return answer if answer is not None else self._fail(
                "improper-addressing", "<db:verify/> needs 'from', 'to' and 'id'")
        if tag == DB_RESULT and self.bidi and event.get("type") is None:
            # XEP-0288 lets the peer piggyback more domains here; we do not take them.
            attrs = {"from": event.get("to", ""), "to": event.get("from", ""), "type": "error"}
            return [Send(dialback_element("result", attrs, error="feature-not-implemented"))]
        return self._fail("unsupported-stanza-type", f"unexpected element {tag}")

    def _stream_opened(self, event: StreamOpened) -> list[Action]:
        if self.stage is not Stage.AWAIT_HEADER:
            return self._fail("bad-format", "unexpected stream header")
        problem = _check_header(event)
        if problem is not None:
            return self._fail(*problem)
        stream_id = event.attrs.get("id")
        if not stream_id:
            return self._fail("invalid-xml", "the stream header needs an 'id'")
        sender = _domain(event.attrs.get("from"))
        if sender is not None and sender != self.remote:
            return self._fail("host-unknown", f"we opened a stream to {self.remote}")
        self.stream_id = stream_id
        self.stage = Stage.OPEN
        return []

    def _features(self, features: _Element) -> list[Action]:
        if self._sasl_done:
            return self._ready("sasl-external")
        offered = {child.tag for child in features}
        self._dialback_offered = DIALBACK_FEATURE in offered
        out: list[Action] = []
        if not self.tls:
            if STARTTLS in offered:
                self.stage = Stage.STARTING_TLS
                return [Send(f'<starttls xmlns="{ns.TLS}"/>'.encode())]
            if self.policy.require_tls:
                return self._failed("remote-server-not-found", f"{self.remote} offers no TLS")
        if not self._can_verify:
            self._can_verify = True
            out.append(CanVerify())
        if BIDI_FEATURE in offered and self.policy.bidi and not self.bidi:
            # XEP-0288 §2.2: asked for before SASL or dialback.
            self.bidi = True
            out.append(Send(f'<bidi xmlns="{ns.BIDI}"/>'.encode()))
        mechanisms = features.find(MECHANISMS)
        external = mechanisms is not None and any(
            (m.text or "").strip() == "EXTERNAL" for m in mechanisms)
        if self.certificate_valid and external:
            self.stage = Stage.SASL
            authzid = base64.b64encode(self.local.encode()).decode()
            return [*out, Send(f'<auth xmlns="{ns.SASL}" mechanism="EXTERNAL">{authzid}</auth>'
                               .encode())]
        if self._dialback_offered:
            return out + self._dialback()
        return out + self._failed("remote-server-not-found",
                                  f"no authentication method in common with {self.remote}")

    def _dialback(self) -> list[Action]:
        assert self.stream_id is not None
        self.stage = Stage.DIALBACK
        key = self.policy.dialback_key(self.remote, self.local, self.stream_id)
        out: list[Action] = []
        if not self._can_verify:
            self._can_verify = True
            out.append(CanVerify())
        return [*out, Send(dialback_element("result", {"from": self.local, "to": self.remote},
                                            key))]

    def _db_result(self, el: _Element) -> list[Action]:
        if _domain(el.get("from")) != self.remote or _domain(el.get("to")) != self.local:
            return self._fail("improper-addressing", "a dialback result for someone else")
        type_ = el.get("type")
        if type_ == "valid":
            return self._ready("dialback")
        if type_ == "invalid":  # XEP-0220 §2.1.1: bounced as internal-server-error
            return self._failed("internal-server-error", f"{self.remote} refused our key")
        # type='error' is no verdict on the key: bounced as remote-server-timeout.
        condition = next((etree.QName(c).localname for err in el for c in err
                          if etree.QName(c).namespace == ns.STANZA_ERRORS), "undefined")
        return self._failed("remote-server-timeout",
                            f"{self.remote} could not check our key ({condition})")

    def _ready(self, method: str) -> list[Action]:
        self.stage = Stage.READY
        self.method = method
        return [Ready(method)]

    def _failed(self, condition: str, text: str) -> list[Action]:
        self.stage = Stage.CLOSED
        return [Failed(condition, text), CloseStream()]

    def _fail(self, condition: str, text: str) -> list[Action]:
        self.stage = Stage.CLOSED
        return [Failed("remote-server-not-found", text), CloseStream(condition, text)]
