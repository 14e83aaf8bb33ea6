"""c2s stream negotiation as a pure state machine (RFC 6120 §4–§7): events in, actions out.

The connection feeds parser events (StreamOpened, elements, StreamClosed) and results of the
async work it was asked to do (credentials looked up, resource bound, TLS up); it carries out
the actions. Once the resource is bound the connection handles stanzas itself (hot path).
"""

from __future__ import annotations

import base64
import binascii
import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from lxml import etree

from server.errors import StanzaError
from server.jid import InvalidJID, normalize_domain, normalize_localpart
from server.storage.base import Credentials
from server.stream import sasl
from server.xml import ns
from server.xml.parser import StreamClosed, StreamOpened
from server.xml.stanza import IQ, error_reply
from server.xml.stanza import STANZA_TAGS as STANZAS
from server.xml.writer import stream_header

_Element: TypeAlias = etree._Element

STARTTLS = ns.q(ns.TLS, "starttls")
AUTH = ns.q(ns.SASL, "auth")
RESPONSE = ns.q(ns.SASL, "response")
ABORT = ns.q(ns.SASL, "abort")
CHANNEL_BINDINGS = ("tls-exporter", "tls-server-end-point")
MAX_SASL_FAILURES = 3  # RFC 6120 §6.4.5: allow at least 2 and at most 5 retries


# -- actions -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Switch the transport to TLS now (after <proceed/>); then a new stream is expected."""


@dataclass(frozen=True, slots=True)
class RestartStream:
    """Discard the parser; the next bytes open a new stream (RFC 6120 §4.3.3)."""


@dataclass(frozen=True, slots=True)
class LookupCredentials:
    user: str
    domain: str


@dataclass(frozen=True, slots=True)
class Authenticated:
    user: str
    domain: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class BindResource:
    iq: _Element
    resource: str | None


@dataclass(frozen=True, slots=True)
class CloseStream:
    condition: str | None = None  # None: a clean </stream:stream>
    text: str | None = None


Action = (Send | StartTLS | RestartStream | LookupCredentials | Authenticated | BindResource
          | CloseStream)


class Stage(enum.Enum):
    PRE_TLS = "pre-tls"            # plaintext; STARTTLS available
    STARTING_TLS = "starting-tls"  # <proceed/> sent; waiting for the TLS handshake
    PRE_AUTH = "pre-auth"          # SASL available
    SASL = "sasl"                  # an exchange is under way
    AWAIT_CREDENTIALS = "await-credentials"
    AUTHENTICATED = "authenticated"  # waiting for the restarted stream
    BIND = "bind"                  # restarted after SASL; resource binding expected
    BINDING = "binding"
    BOUND = "bound"
    CLOSED = "closed"


@dataclass(frozen=True)
class Policy:
    domains: frozenset[str]
    require_starttls: bool = True
    allow_plain: bool = True
    tls_available: bool = True
    scram_iterations: int = 4096  # shown to unknown users too, so they look like real ones


class C2SNegotiation:
    def __init__(self, policy: Policy, *, direct_tls: bool = False,
                 channel_binding: Callable[[str], bytes | None] = lambda _kind: None,
                 post_bind_features: Callable[[], list[_Element]] = list) -> None:
        self.policy = policy
        self.tls = direct_tls
        self.stage = Stage.PRE_AUTH if direct_tls else Stage.PRE_TLS
        self.domain: str | None = None
        self.user: str | None = None
        self.mechanism = ""
        self.stream_id = ""
        self.lang = "en"
        self.header_sent = False
        self._awaiting_header = True
        self._channel_binding = channel_binding
        self._post_bind_features = post_bind_features
        self._sasl: sasl.SaslServer | None = None
        self._failures = 0

    # -- inputs ------------------------------------------------------------------------------

    def tls_established(self) -> None:
        self.tls = True
        self.stage = Stage.PRE_AUTH
        self._awaiting_header = True

    def receive(self, event: StreamOpened | StreamClosed | _Element) -> list[Action]:
        if self.stage is Stage.CLOSED:
            return []
        if isinstance(event, StreamOpened):
            return self._stream_opened(event)
        if isinstance(event, StreamClosed):
            self.stage = Stage.CLOSED
            return [CloseStream()]
        if self._awaiting_header:  # the parser yields no element before the header
            return self._fail("bad-format", "element before stream header")
        return self._element(event)

    def credentials(self, found: Credentials | None) -> list[Action]:
        """Result of LookupCredentials."""
        if self.stage is not Stage.AWAIT_CREDENTIALS or self._sasl is None:
            return []
        self.stage = Stage.SASL
        return self._sasl_step(self._sasl.provide_credentials(found))

    def credentials_failed(self) -> list[Action]:
        """The lookup itself failed (storage down): RFC 6120 §6.5.10 temporary-auth-failure."""
        if self.stage is not Stage.AWAIT_CREDENTIALS or self._sasl is None:
            return []
        self.stage = Stage.SASL
        return self._sasl_step(self._sasl.fail("temporary-auth-failure"))

    def bound(self, iq: _Element, full_jid: str) -> list[Action]:
        self.stage = Stage.BOUND
        reply = _iq_result(iq)
        bind = etree.SubElement(reply, ns.q(ns.BIND, "bind"), nsmap={None: ns.BIND})
        etree.SubElement(bind, ns.q(ns.BIND, "jid")).text = full_jid
        return [Send(etree.tostring(reply))]

    def bind_failed(self, iq: _Element, error: StanzaError) -> list[Action]:
        self.stage = Stage.BIND
        return [Send(etree.tostring(error_reply(iq, error)))]

    # -- stream headers ----------------------------------------------------------------------

    def _stream_opened(self, event: StreamOpened) -> list[Action]:
        if not self._awaiting_header:
            return self._fail("bad-format", "unexpected stream header")
        self._awaiting_header = False
        self.stream_id = secrets.token_urlsafe(12)
        attrs = event.attrs
        lang = attrs.get(ns.q(ns.XML, "lang"))
        if lang:
            self.lang = lang
        to = attrs.get("to")
        domain: str | None = None
        if to:
            try:
                domain = normalize_domain(to)
            except InvalidJID:
                domain = None
        header_from = domain if domain in self.policy.domains else min(self.policy.domains)
        if self.domain is not None:  # restarted stream: keep the domain of the first one
            header_from = self.domain
        out: list[Action] = [Send(stream_header(content_ns=ns.CLIENT, from_=header_from,
                                                to=attrs.get("from"), id_=self.stream_id,
                                                lang=self.lang))]
        self.header_sent = True
        # RFC 6120 §4.8.1 / §4.9.3.10: the stream's own namespace and the content namespace.
        if event.tag != ns.q(ns.STREAMS, "stream"):
            if etree.QName(event.tag).localname == "stream":
                return out + self._fail("invalid-namespace", "stream namespace is wrong")
            return out + self._fail("invalid-xml", "root element must be <stream:stream>")
        if event.default_ns != ns.CLIENT:
            return out + self._fail("invalid-namespace", "content namespace must be jabber:client")
        prefix = next((p for p, uri in event.nsmap.items() if uri == ns.STREAMS), None)
        if prefix != "stream":
            return out + self._fail("bad-namespace-prefix", "use the prefix 'stream'")
        # RFC 6120 §4.7.5: no version means 0.9, which we do not speak; major must be 1.
        version = attrs.get("version")
        if version is None or not version_ok(version):
            return out + self._fail("unsupported-version", "XMPP 1.0 is required")
        if not to:
            return out + self._fail("host-unknown", "the stream header needs 'to'")
        if domain is None or domain not in self.policy.domains:
            return out + self._fail("host-unknown", f"{to} is not served here")
        if self.domain is not None and domain != self.domain:
            return out + self._fail("host-unknown", "the domain changed on stream restart")
        self.domain = domain
        return [*out, Send(self._features())]

    def _features(self) -> bytes:
        features = etree.Element(ns.q(ns.STREAMS, "features"), nsmap={"stream": ns.STREAMS})
        stage = self.stage
        if stage is Stage.PRE_TLS and self.policy.tls_available:
            starttls = etree.SubElement(features, STARTTLS, nsmap={None: ns.TLS})
            if self.policy.require_starttls:
                etree.SubElement(starttls, ns.q(ns.TLS, "required"))
        if stage is Stage.PRE_AUTH or (stage is Stage.PRE_TLS and not self._tls_required()):
            mechanisms = etree.SubElement(features, ns.q(ns.SASL, "mechanisms"),
                                          nsmap={None: ns.SASL})
            for name in self._mechanisms():
                etree.SubElement(mechanisms, ns.q(ns.SASL, "mechanism")).text = name
            if self._bindings:
                # XEP-0440: tell the client which channel bindings we support.
                cb_ns = "urn:xmpp:sasl-cb:0"
                cbs = etree.SubElement(features, f"{{{cb_ns}}}sasl-channel-binding",
                                       nsmap={None: cb_ns})
                for kind in self._bindings:
                    etree.SubElement(cbs, f"{{{cb_ns}}}channel-binding", type=kind)
        if stage is Stage.BIND:
            etree.SubElement(features, ns.q(ns.BIND, "bind"), nsmap={None: ns.BIND})
            session = etree.SubElement(features, ns.q(ns.SESSION, "session"),
                                       nsmap={None: ns.SESSION})
            etree.SubElement(session, ns.q(ns.SESSION, "optional"))
            for extra in self._post_bind_features():
                features.append(extra)
        data: bytes = etree.tostring(features)
        return data

    def _tls_required(self) -> bool:
        return self.policy.require_starttls and self.policy.tls_available

    @property
    def _bindings(self) -> list[str]:
        if not self.tls:
            return []
        return [kind for kind in CHANNEL_BINDINGS if self._channel_binding(kind) is not None]

    def _mechanisms(self) -> list[str]:
        return sasl.offered_mechanisms(tls=self.tls, channel_bindings=self._bindings,
                                       allow_plain=self.policy.allow_plain)

    # -- elements ----------------------------------------------------------------------------

    def _element(self, el: _Element) -> list[Action]:
        tag = el.tag
        stage = self.stage
        if stage is Stage.PRE_TLS and tag == STARTTLS and self.policy.tls_available:
            self.stage = Stage.STARTING_TLS  # nothing more is read in plaintext
            self._awaiting_header = True
            return [Send(b'<proceed xmlns="urn:ietf:params:xml:ns:xmpp-tls"/>'), StartTLS()]
        if tag == STARTTLS:
            if stage is Stage.PRE_TLS:  # TLS not configured
                return [Send(b'<failure xmlns="urn:ietf:params:xml:ns:xmpp-tls"/>'),
                        CloseStream()]
            return self._fail("policy-violation", "STARTTLS is not allowed now")
        if stage is Stage.PRE_TLS and self._tls_required():
            if tag in STANZAS:
                return self._fail("not-authorized", "authenticate first")
            if tag == AUTH:
                # RFC 6120 §5.3.1: STARTTLS is mandatory-to-negotiate here.
                return [Send(_sasl_failure("encryption-required", "use STARTTLS first"))]
            return self._fail("policy-violation", "STARTTLS is required")
        if stage in (Stage.PRE_TLS, Stage.PRE_AUTH):
            if tag == AUTH:
                return self._auth(el)
            if tag in STANZAS:
                return self._fail("not-authorized", "authenticate first")
            return self._unexpected(el)
        if stage is Stage.SASL:
            if tag == RESPONSE:
                data = _decode(el.text)
                if data is None:
                    return self._sasl_step(sasl.Failure("incorrect-encoding"))
                assert self._sasl is not None
                return self._sasl_step(self._sasl.respond(data))
            if tag == ABORT:
                assert self._sasl is not None
                return self._sasl_step(self._sasl.abort())
            if tag in STANZAS:
                return self._fail("not-authorized", "authenticate first")
            return self._unexpected(el)
        if stage is Stage.AWAIT_CREDENTIALS:
            return self._fail("policy-violation", "wait for the server's SASL answer")
        if stage is Stage.BIND:
            if tag == IQ and el.get("type") == "set":
                bind = el.find(ns.q(ns.BIND, "bind"))
                if bind is not None:
                    self.stage = Stage.BINDING
                    resource = bind.findtext(ns.q(ns.BIND, "resource"))
                    return [BindResource(el, resource.strip() if resource else None)]
            if tag in STANZAS:
                # RFC 6120 §7.1: no stanzas before a resource is bound.
                return self._fail("not-authorized", "bind a resource first")
            return self._unexpected(el)
        if stage is Stage.BINDING:
            return self._fail("policy-violation", "wait for the bind result")
        return self._unexpected(el)

    def _unexpected(self, el: _Element) -> list[Action]:
        # RFC 6120 §4.9.3.22: a first-level child we do not support.
        return self._fail("unsupported-stanza-type", f"unexpected element {el.tag}")

    def _auth(self, el: _Element) -> list[Action]:
        mechanism = el.get("mechanism")
        if not mechanism or mechanism not in self._mechanisms():
            return self._sasl_step(sasl.Failure("invalid-mechanism"))
        initial: bytes | None = None
        if el.text is not None and el.text.strip():
            initial = _decode(el.text)
            if initial is None:
                return self._sasl_step(sasl.Failure("incorrect-encoding"))
        self.mechanism = mechanism
        self._sasl = sasl.SaslServer(self._mechanisms(), self._channel_binding, tls=self.tls,
                                     domain=self.domain,
                                     iterations=self.policy.scram_iterations)
        self.stage = Stage.SASL
        return self._sasl_step(self._sasl.start(mechanism, initial))

    def _sasl_step(self, step: sasl.Step) -> list[Action]:
        if isinstance(step, sasl.Challenge):
            return [Send(_sasl_element("challenge", step.data))]
        if isinstance(step, sasl.NeedCredentials):
            assert self.domain is not None and self._sasl is not None
            try:
                user = normalize_localpart(step.username)
            except InvalidJID:
                return self._sasl_step(self._sasl.provide_credentials(None))
            self.user = user
            self.stage = Stage.AWAIT_CREDENTIALS
            return [LookupCredentials(user, self.domain)]
        if isinstance(step, sasl.Success):
            assert self.domain is not None
            try:
                user = normalize_localpart(step.username)
            except InvalidJID:
                return self._sasl_step(sasl.Failure("not-authorized"))
            self.user = user
            self.stage = Stage.BIND
            self._awaiting_header = True
            self._sasl = None
            return [Send(_sasl_element("success", step.data)), RestartStream(),
                    Authenticated(user, self.domain, self.mechanism)]
        # Failure
        self._sasl = None
        self.stage = Stage.PRE_AUTH if self.tls or not self._tls_required() else Stage.PRE_TLS
        self._failures += 1
        out: list[Action] = [Send(_sasl_failure(step.condition, step.text))]
        if self._failures >= MAX_SASL_FAILURES:
            out += self._fail("policy-violation", "too many authentication failures")
        return out

    def _fail(self, condition: str, text: str | None) -> list[Action]:
        self.stage = Stage.CLOSED
        return [CloseStream(condition, text)]


def version_ok(version: str) -> bool:
    """RFC 6120 §4.7.5: we speak major version 1."""
    major, _, _minor = version.partition(".")
    return major.isdigit() and int(major) == 1


def _decode(text: str | None) -> bytes | None:
    """RFC 6120 §6.4.2: '=' is an empty response; None on bad base64."""
    text = (text or "").strip()
    if text in ("", "="):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _sasl_element(name: str, data: bytes | None) -> bytes:
    body = b"" if data is None else (base64.b64encode(data) if data else b"=")
    return b'<%s xmlns="urn:ietf:params:xml:ns:xmpp-sasl">%s</%s>' % (name.encode(), body,
                                                                       name.encode())


def _sasl_failure(condition: str, text: str | None) -> bytes:
    failure = etree.Element(ns.q(ns.SASL, "failure"), nsmap={None: ns.SASL})
    etree.SubElement(failure, ns.q(ns.SASL, condition))
    if text:
        t = etree.SubElement(failure, ns.q(ns.SASL, "text"), {ns.q(ns.XML, "lang"): "en"})
        t.text = text
    data: bytes = etree.tostring(failure)
    return data


def _iq_result(iq: _Element) -> _Element:
    reply = etree.Element(IQ, {"type": "result"}, nsmap={None: ns.CLIENT})
    if iq.get("id") is not None:
        reply.set("id", iq.get("id", ""))
    return reply
