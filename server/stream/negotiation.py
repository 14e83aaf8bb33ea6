"""c2s stream negotiation as a pure state machine (RFC 6120 §4–§7): events in, actions out.

The connection feeds parser events (StreamOpened, elements, StreamClosed) and results of the
async work it was asked to do (credentials looked up, resource bound, TLS up); it carries out
the actions. Once the resource is bound the connection handles stanzas itself (hot path).

Beside RFC 6120 SASL (with a stream restart) the machine speaks SASL2 (XEP-0388, after TLS):
<authenticate/> carries the mechanism's first message and what to set up inline; once the
mechanism (SCRAM, PLAIN, or a FAST token with HT-SHA-256-*, XEP-0484) succeeded, the machine
asks in turn for the XEP-0198 resumption (ResumeInline), the Bind 2 resource with the features
to enable in it (BindInline, XEP-0386) and a FAST token (IssueToken), then sends <success/>
with their answers and the new features, without a restart. SCRAM's server-first carries the
XEP-0474 downgrade protection hash in both profiles.
"""

from __future__ import annotations

import base64
import binascii
import enum
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID, normalize_domain, normalize_localpart
from server.storage.base import Credentials
from server.stream import sasl, sasl2
from server.xml import ns
from server.xml.numbers import NumberError, parse_int
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
class PreBindElement:
    """A non-stanza element where resource binding is expected (e.g. XEP-0198 <resume/>):
    a module may take it, else the stream ends (unsupported-stanza-type)."""

    element: _Element


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """XEP-0484: check a FAST token's HT proof (through storage); answer with
    token_verified()."""

    user: str
    domain: str
    mechanism: str
    client: str | None     # the <user-agent id>
    proof: bytes           # initiator-hashed-token
    cb_data: bytes         # the channel binding the mechanism signs (b"" for -NONE)
    invalidate: bool


@dataclass(frozen=True, slots=True)
class ResumeInline:
    """XEP-0388/XEP-0198: resume the session named by this <resume/> on this stream; answer
    with inline_resumed()."""

    element: _Element


@dataclass(frozen=True, slots=True)
class BindInline:
    """XEP-0386: bind this resource and enable these features (children of <bind/>); answer
    with inline_bound() or inline_bind_failed()."""

    resource: str
    features: tuple[_Element, ...]
    user_agent: str | None


@dataclass(frozen=True, slots=True)
class IssueToken:
    """XEP-0484 §3.3: make a FAST token for this client and mechanism; answer with
    token_issued()."""

    user: str
    domain: str
    client: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class Sasl2Complete:
    """The SASL2 <success/> and the new features went out: the stream is authenticated (and
    bound when jid has a resource). Deferred work (session-bound, redelivery) may run now."""

    jid: str
    resumed: bool


@dataclass(frozen=True, slots=True)
class PreAuthIq:
    """An iq a client may send before authenticating (XEP-0077 §3 in-band registration and
    XEP-0445 pre-authentication): a module answers it, else service-unavailable."""

    iq: _Element


# The payloads of PreAuthIq: XEP-0077's query and XEP-0445's <preauth/>.
PRE_AUTH_PAYLOADS = frozenset({"{jabber:iq:register}query", "{urn:xmpp:pars:0}preauth"})


@dataclass(frozen=True, slots=True)
class CloseStream:
    condition: str | None = None  # None: a clean </stream:stream>
    text: str | None = None


Action = (Send | StartTLS | RestartStream | LookupCredentials | Authenticated | BindResource
          | PreBindElement | CloseStream | VerifyToken | ResumeInline | BindInline | IssueToken
          | Sasl2Complete | PreAuthIq)


class Stage(enum.Enum):
    PRE_TLS = "pre-tls"            # plaintext; STARTTLS available
    STARTING_TLS = "starting-tls"  # <proceed/> sent; waiting for the TLS handshake
    PRE_AUTH = "pre-auth"          # SASL available
    SASL = "sasl"                  # an exchange is under way
    AWAIT_CREDENTIALS = "await-credentials"
    AWAIT_TOKEN = "await-token"    # FAST: the token check is under way
    INLINE = "inline"              # SASL2 authenticated; inline features being set up
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
    sasl2: bool = True            # XEP-0388 offered (over TLS only) beside RFC 6120 SASL
    ssdp: bool = True             # XEP-0474 'h=' in SCRAM server-first-message
    scram_sha256: bool = True     # SCRAM-SHA-256(-PLUS) offered (see Server.start)


class C2SNegotiation:
    def __init__(self, policy: Policy, *, direct_tls: bool = False,
                 channel_binding: Callable[[str], bytes | None] = lambda _kind: None,
                 post_bind_features: Callable[[], list[_Element]] = list,
                 pre_auth_features: Callable[[], list[_Element]] = list,
                 sasl2_inline: Callable[[], sasl2.Inline] = sasl2.Inline) -> None:
        self.policy = policy
        self.tls = direct_tls
        self.stage = Stage.PRE_AUTH if direct_tls else Stage.PRE_TLS
        self.domain: str | None = None
        self.user: str | None = None
        self.mechanism = ""
        self.stream_id = ""
        self.lang = "en"
        self.client_lang: str | None = None  # the xml:lang the client's header gave
        self.header_sent = False
        self._awaiting_header = True
        self._channel_binding = channel_binding
        self._post_bind_features = post_bind_features
        self._pre_auth_features = pre_auth_features
        self._sasl: sasl.SaslServer | None = None
        self._failures = 0
        self._binding_unusable = False  # a -PLUS try named a binding we lack (sasl.py)
        self._sasl2_inline = sasl2_inline
        # SASL2: the request under way, then what <success/> will say
        self._request: sasl2.Request | None = None
        self._steps: list[str] = []            # inline work still to do, in order
        self._results: list[_Element] = []     # answers of inline features for <success/>
        self._additional: bytes | None = None  # the mechanism's success data
        self._jid = ""                         # the authorization identifier
        self._resumed = False
        self._token_mechanism: str | None = None  # a FAST token to issue
        self._bound = False
        self._inline: sasl2.Inline | None = None

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
        self._negotiated()
        reply = _iq_result(iq)
        bind = etree.SubElement(reply, ns.q(ns.BIND, "bind"), nsmap={None: ns.BIND})
        etree.SubElement(bind, ns.q(ns.BIND, "jid")).text = full_jid
        return [Send(etree.tostring(reply))]

    def resumed(self) -> None:
        """A module attached this stream to an existing session instead of binding (XEP-0198
        §5): from now on stanzas flow. (Inline in SASL2 the stage moves on once <success/> is
        out.)"""
        if self.stage is not Stage.INLINE:
            self.stage = Stage.BOUND
            self._negotiated()

    # -- inputs of SASL2 (XEP-0388) and its inline features ----------------------------------

    def token_verified(self, responder: bytes | None, *, rotate: bool = False) -> list[Action]:
        """Result of VerifyToken: the HT responder data (HMAC(token, "Responder" || cb)), or
        None for a token that is unknown, expired, for another mechanism or a wrong proof.
        rotate: the token is due for replacement (XEP-0484 §3.5)."""
        request = self._request
        if self.stage is not Stage.AWAIT_TOKEN or request is None or self.user is None:
            return []
        self.stage = Stage.SASL
        if responder is None:
            return self._sasl_step(sasl.Failure("not-authorized", "invalid or expired token"))
        if rotate and not (request.fast is not None and request.fast.invalidate):
            self._token_mechanism = self._token_mechanism or request.mechanism
        return self._sasl_step(sasl.Success(self.user, responder))

    def token_check_failed(self) -> list[Action]:
        """The token check itself failed (storage down): temporary-auth-failure."""
        if self.stage is not Stage.AWAIT_TOKEN or self._request is None:
            return []
        self.stage = Stage.SASL
        return self._sasl_step(sasl.Failure("temporary-auth-failure"))

    def inline_resumed(self, result: _Element, jid: str | None) -> list[Action]:
        """Result of ResumeInline: XEP-0198 <resumed/> with the session's full JID (the stream
        now carries it), or <failed/> and None (then Bind 2 goes on, XEP-0386 §3.2)."""
        if self.stage is not Stage.INLINE:
            return []
        self._results.append(result)
        if jid is not None:
            self._jid = jid
            self._resumed = True
        return self._inline_next()

    def inline_bound(self, jid: str, answers: Sequence[_Element]) -> list[Action]:
        """Result of BindInline: the full JID, and the answers of the enabled features for
        <bound/> (e.g. XEP-0198 <enabled/>)."""
        if self.stage is not Stage.INLINE:
            return []
        self._jid = jid
        self._bound = True
        self._results.append(sasl2.bound_element(answers))
        return self._inline_next()

    def inline_bind_failed(self, error: StanzaError) -> list[Action]:
        """No resource could be bound (too many sessions...): the authentication fails, and
        nothing else requested inline is kept (XEP-0388 §2.6.2)."""
        if self.stage is not Stage.INLINE:
            return []
        return self._sasl_step(sasl.Failure("aborted", error.text or error.condition))

    def token_issued(self, token: str | None, expiry: str | None) -> list[Action]:
        """Result of IssueToken: the token and its XEP-0082 expiry; None when none could be
        made (storage down): the login goes on without one."""
        if self.stage is not Stage.INLINE:
            return []
        if token is not None and expiry is not None:
            self._results.append(sasl2.token_element(token, expiry))
        return self._inline_next()

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
        self.client_lang = lang or None
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
            # An undeclared prefix ('stream:stream' with no xmlns:stream) reaches us as a tag
            # with a colon and no namespace, which etree.QName refuses: RFC 6120 §4.9.3.2.
            if ":" in event.tag and not event.tag.startswith("{"):
                return out + self._fail("bad-namespace-prefix", "undeclared namespace prefix")
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
            if self._sasl2_offered:
                features.append(sasl2.authentication_feature(
                    self._mechanisms(), self._inline_offer, self._fast_mechanisms()))
            if self._bindings:
                # XEP-0440: tell the client which channel bindings we support.
                cb_ns = "urn:xmpp:sasl-cb:0"
                cbs = etree.SubElement(features, f"{{{cb_ns}}}sasl-channel-binding",
                                       nsmap={None: cb_ns})
                for kind in self._bindings:
                    etree.SubElement(cbs, f"{{{cb_ns}}}channel-binding", type=kind)
            features.extend(self._pre_auth_features())  # XEP-0077 §4: <register/>
        if stage is Stage.BIND:
            etree.SubElement(features, ns.q(ns.BIND, "bind"), nsmap={None: ns.BIND})
            session = etree.SubElement(features, ns.q(ns.SESSION, "session"),
                                       nsmap={None: ns.SESSION})
            etree.SubElement(session, ns.q(ns.SESSION, "optional"))
            for extra in self._post_bind_features():
                features.append(extra)
        if stage is Stage.BOUND:  # after a SASL2 login that bound inline (XEP-0388 §2.6.1)
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
                                       allow_plain=self.policy.allow_plain,
                                       sha256=self.policy.scram_sha256)

    @property
    def _sasl2_offered(self) -> bool:
        return self.policy.sasl2 and self.tls  # XEP-0388 §4: only after TLS

    @property
    def _inline_offer(self) -> sasl2.Inline:
        if self._inline is None:  # the same for the whole stream (XEP-0388 §2.1: stable)
            self._inline = self._sasl2_inline()
        return self._inline

    def _fast_mechanisms(self) -> list[str]:
        """XEP-0484 §3.1: HT-SHA-256-* whose channel binding this connection has."""
        if not self._inline_offer.fast:
            return []
        return [name for name, kind in sasl2.HT_MECHANISMS.items()
                if kind is None or (self.tls and self._channel_binding(kind) is not None)]

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
            if tag == sasl2.AUTHENTICATE and self._sasl2_offered:
                return self._authenticate(el)
            if tag == IQ and el.get("type") in ("get", "set") and len(el) == 1 \
                    and el[0].tag in PRE_AUTH_PAYLOADS:
                return [PreAuthIq(el)]
            if tag in STANZAS:
                return self._fail("not-authorized", "authenticate first")
            return self._unexpected(el)
        if stage is Stage.SASL and self._request is not None:
            # XEP-0388 §2.5: only <response/> or <abort/> until the outcome.
            if tag == sasl2.RESPONSE:
                data = sasl2.decode(el.text)
                if data is None:
                    return self._sasl_step(sasl.Failure("incorrect-encoding"))
                assert self._sasl is not None
                return self._sasl_step(self._sasl.respond(data))
            if tag == sasl2.ABORT:
                assert self._sasl is not None
                return self._sasl_step(self._sasl.abort())
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
        if stage in (Stage.AWAIT_CREDENTIALS, Stage.AWAIT_TOKEN, Stage.INLINE):
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
            return [PreBindElement(el)]
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
        self._sasl = self._sasl_server()
        self.stage = Stage.SASL
        return self._sasl_step(self._sasl.start(mechanism, initial))

    def _sasl_server(self) -> sasl.SaslServer:
        bindings = self._bindings
        return sasl.SaslServer(self._mechanisms(), self._channel_binding, tls=self.tls,
                               domain=self.domain, iterations=self.policy.scram_iterations,
                               ssdp=self.policy.ssdp, listed_bindings=bindings or None,
                               binding_unusable=self._binding_unusable)

    # -- SASL2 (XEP-0388), Bind 2 (XEP-0386), FAST (XEP-0484) ----------------------------------

    def _authenticate(self, el: _Element) -> list[Action]:
        try:
            request = sasl2.parse_authenticate(el)
        except sasl2.Malformed as err:
            return self._failure(sasl.Failure(err.condition, err.text), sasl2_profile=True)
        self._request = request
        mechanism = request.mechanism
        self.mechanism = mechanism
        if mechanism in self._fast_mechanisms():
            return self._fast_auth(request)
        if mechanism not in self._mechanisms():
            return self._sasl_step(sasl.Failure("invalid-mechanism"))
        self._sasl = self._sasl_server()
        self.stage = Stage.SASL
        return self._sasl_step(self._sasl.start(mechanism, request.initial_response))

    def _fast_auth(self, request: sasl2.Request) -> list[Action]:
        assert self.domain is not None
        parsed = sasl2.parse_ht(request.initial_response or b"")
        if parsed is None:
            return self._sasl_step(sasl.Failure("malformed-request",
                                                "HT needs authcid NUL hashed token"))
        if not request.user_agent:  # XEP-0484 §4.1: tokens are per client
            return self._sasl_step(sasl.Failure("not-authorized",
                                                "FAST needs <user-agent id='...'/>"))
        authcid, proof = parsed
        try:
            if "@" in authcid:  # a bare JID is accepted too, when it is of this domain
                jid = JID.parse(authcid)
                if jid.domain != self.domain or jid.local is None or jid.resource is not None:
                    raise InvalidJID(authcid)
                user = jid.local
            else:
                user = normalize_localpart(authcid)
        except InvalidJID:
            return self._sasl_step(sasl.Failure("not-authorized", "invalid or expired token"))
        kind = sasl2.HT_MECHANISMS[request.mechanism]
        cb_data = b"" if kind is None else self._channel_binding(kind)
        if cb_data is None:
            return self._sasl_step(sasl.Failure("invalid-mechanism"))
        self.user = user
        self.stage = Stage.AWAIT_TOKEN
        invalidate = request.fast is not None and request.fast.invalidate
        return [VerifyToken(user, self.domain, request.mechanism, request.user_agent, proof,
                            cb_data, invalidate)]

    def _sasl2_authenticated(self, data: bytes | None) -> list[Action]:
        """The mechanism succeeded: now the inline features, in the XEPs' order (XEP-0386
        §3.2: resumption first; bind only when it failed), then the token."""
        request = self._request
        assert request is not None and self.user is not None and self.domain is not None
        self._additional = data
        self._jid = f"{self.user}@{self.domain}"
        self.stage = Stage.INLINE
        steps = []
        if request.resume is not None and self._inline_offer.sm:
            steps.append("resume")
        if request.bind is not None:
            steps.append("bind")
        wanted = request.request_token
        if wanted is not None and wanted in self._fast_mechanisms():
            self._token_mechanism = wanted
        steps.append("token")
        self._steps = steps
        return self._inline_next()

    def _inline_next(self) -> list[Action]:
        request = self._request
        assert request is not None and self.user is not None and self.domain is not None
        while self._steps:
            step = self._steps.pop(0)
            if step == "resume" and request.resume is not None:
                return [ResumeInline(request.resume)]
            if step == "bind" and request.bind is not None and not self._resumed:
                resource = sasl2.bind2_resource(request.bind.tag, request.user_agent,
                                                f"{self.user}@{self.domain}")
                return [BindInline(resource, request.bind.features, request.user_agent)]
            if step == "token" and self._token_mechanism and request.user_agent:
                return [IssueToken(self.user, self.domain, request.user_agent,
                                   self._token_mechanism)]
        bound = self._bound or self._resumed
        self.stage = Stage.BOUND if bound else Stage.BIND
        out: list[Action] = [
            Send(sasl2.success(self._jid, self._additional, self._results)),
            # XEP-0388 §2.6.1: the new features follow at once; no stream restart.
            Send(self._features()),
            Sasl2Complete(self._jid, self._resumed)]
        self._reset_sasl2()
        if bound:
            self._negotiated()
        return out

    def _negotiated(self) -> None:
        """Bound: no features are built and no SASL runs on this stream again (a header now
        is a bad-format error), so what only negotiation needed is let go; an idle session
        keeps less (the connection's bound methods, the SASL2 offer)."""
        self._channel_binding = _no_binding
        self._post_bind_features = self._pre_auth_features = list
        self._sasl2_inline = sasl2.Inline
        self._inline = None

    def _reset_sasl2(self) -> None:
        self._request = None
        self._steps = []
        self._results = []
        self._additional = None
        self._token_mechanism = None
        self._resumed = self._bound = False

    def _sasl_step(self, step: sasl.Step) -> list[Action]:
        if isinstance(step, sasl.Challenge):
            if self._request is not None:
                return [Send(sasl2.challenge(step.data))]
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
            self._sasl = None
            if self._request is not None:
                return [Authenticated(user, self.domain, self.mechanism),
                        *self._sasl2_authenticated(step.data)]
            self.stage = Stage.BIND
            self._awaiting_header = True
            return [Send(_sasl_element("success", step.data)), RestartStream(),
                    Authenticated(user, self.domain, self.mechanism)]
        return self._failure(step, sasl2_profile=self._request is not None)

    def _failure(self, step: sasl.Failure, *, sasl2_profile: bool) -> list[Action]:
        if self._sasl is not None and self._sasl.binding_unusable:
            self._binding_unusable = True
        self._sasl = None
        self._reset_sasl2()
        self.stage = Stage.PRE_AUTH if self.tls or not self._tls_required() else Stage.PRE_TLS
        self._failures += 1
        data = (sasl2.failure(step.condition, step.text) if sasl2_profile
                else _sasl_failure(step.condition, step.text))
        out: list[Action] = [Send(data)]
        if self._failures >= MAX_SASL_FAILURES:
            out += self._fail("policy-violation", "too many authentication failures")
        return out

    def _fail(self, condition: str, text: str | None) -> list[Action]:
        self.stage = Stage.CLOSED
        return [CloseStream(condition, text)]


def _no_binding(_kind: str) -> bytes | None:
    return None


VERSION_PART_MAX = 10**9  # a major or minor version number larger than this is not XMPP


def version_ok(version: str) -> bool:
    """RFC 6120 §4.7.5: we speak major version 1. MAJOR and MINOR are separate integers of
    ASCII digits (leading zeros ignored); anything else ('².0', 5,000 digits, '1.x') is a
    version we do not speak, answered with <unsupported-version/>, never an exception."""
    major, dot, minor = version.partition(".")
    try:
        if dot:
            parse_int(minor, maximum=VERSION_PART_MAX, name="minor version")
        return parse_int(major, maximum=VERSION_PART_MAX, name="major version") == 1
    except NumberError:
        return False


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
