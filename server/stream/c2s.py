"""One client connection: negotiation (the c2s machine), then stanzas to the router.

The byte moving (TLS, parser, batched writes, closing) is XMLStreamConnection's. After
resource binding this class handles stanzas itself (the hot path): check and stamp 'from',
route, and keep per-stream order when routing goes asynchronous.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from lxml import etree

from server import events
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.limits import PAUSE_AUTH, PAUSE_STANZAS, REFUSALS, Ticket, TokenBucket
from server.sessions import Session
from server.storage.db import log_failure
from server.stream import negotiation as neg
from server.stream import sasl2
from server.stream.connection import XMLStreamConnection
from server.xml import ns
from server.xml.parser import Event
from server.xml.stanza import STANZA_TAGS, error_reply
from server.xml.writer import serialize, stream_header

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.c2s")
_Element: TypeAlias = etree._Element


class C2SConnection(XMLStreamConnection):
    kind = "c2s"
    local_client = True  # stanzas from it get outbound processing (the user's server)
    __slots__ = ("_after_success", "_limit_key", "_refusing", "_server", "_ticket", "bound",
                 "jid", "negotiation", "pre_auth", "session")

    def __init__(self, server: Server, direct_tls: bool, *, secured_below: bool = False) -> None:
        """secured_below: the transport underneath is already secure (the HTTPS listener of a
        WebSocket, or a trusted proxy that terminated TLS): no TLS layer here and no STARTTLS
        offered, as with direct TLS."""
        super().__init__(server.loop, server.new_parser(),
                         server.tls_layer(direct=True) if direct_tls else None)
        self._server = server
        self.negotiation = neg.C2SNegotiation(
            server.c2s_policy, direct_tls=direct_tls or secured_below,
            channel_binding=self._channel_binding,
            post_bind_features=server.post_bind_features, sasl2_inline=self._sasl2_inline,
            pre_auth_features=self._pre_auth_features)
        # What modules keep about a stream before it authenticates (a XEP-0445 token).
        self.pre_auth: dict[str, Any] = {}
        self.bound = False
        self.jid: JID = server.placeholder_jid
        self.session: Session | None = None  # the bound resource this stream carries
        self._after_success: Callable[[], None] | None = None  # SASL2: once <success/> is out
        self._limit_key: str | None = None  # the address's key in server.limiter; None: trusted
        self._ticket: Ticket | None = None  # its place in the per-address counts
        self._refusing = False  # the next SASL <failure/> is our refusal (auth backoff)

    # -- the stream --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.connections.add(self)
        limiter = self._server.limiter
        peer = transport.get_extra_info("peername")
        key = self._limit_key = limiter.key(str(peer[0])) if peer else None
        if key is None:
            return
        ticket = limiter.open(key)
        if isinstance(ticket, str):
            condition, text = REFUSALS[ticket]
            self.close(condition, text, reason=ticket)  # its one log line: event=stream-error
            if self._tls is None:
                transport.close()  # nothing to wait for (with direct TLS: the handshake)
            return
        self._ticket = ticket
        self._shaper = limiter.shaper("c2s", key, self._loop.time())

    def _event(self, event: Event) -> None:
        if self.bound and type(event) is _ElementType:
            self._stanza(event)
        else:
            self._carry_out(self.negotiation.receive(event))

    def _lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._ticket is not None:
            self._ticket.release()
        self._end_session("disconnected" if exc is None else "connection-lost")

    def _ended(self, reason: str) -> None:
        if self._ticket is not None:
            self._ticket.release()
        self._end_session(reason)

    def _who(self) -> str:
        return self.session.jid_str if self.session is not None else "-"

    def _header_for_error(self) -> bytes:
        if self.negotiation.header_sent:
            return b""
        self.negotiation.header_sent = True
        return stream_header(content_ns=ns.CLIENT, from_=self._server.default_domain, to=None,
                             id_=None)

    # -- negotiation -------------------------------------------------------------------------

    def _channel_binding(self, kind: str) -> bytes | None:
        return self._tls.channel_binding(kind) if self._tls is not None else None

    def _carry_out(self, actions: list[neg.Action], *, held: bool = False) -> None:
        """held: the first action is a failure whose answer was held back (auth backoff)."""
        for i, action in enumerate(actions):
            if isinstance(action, neg.Send):
                if action.data.startswith(_SASL_FAILURES) and not (held and i == 0):
                    delay = self._auth_failed(action.data)
                    if delay > 0:
                        # Answer it later and hear nothing meanwhile: a guess costs time.
                        self._pause(PAUSE_AUTH, delay,
                                    functools.partial(self._answer_late, actions[i:]))
                        return
                self._write_now(action.data)
            elif isinstance(action, neg.CloseStream):
                self.close(action.condition, action.text)
                return
            elif isinstance(action, neg.LookupCredentials):
                if self._auth_refused(action.user, action.domain):
                    self._carry_out(self.negotiation.credentials_failed())
                else:
                    self._spawn(self._lookup(action.user, action.domain))
            elif isinstance(action, neg.StartTLS):
                self._tls = self._server.tls_layer(direct=False)
                self._parser = self._server.new_parser()
                self.negotiation.tls_established()
            elif isinstance(action, neg.RestartStream):
                self._parser = self._server.new_parser()
            elif isinstance(action, neg.Authenticated):
                log.info("event=authenticated peer=%s user=%s@%s mechanism=%s", self.peer,
                         action.user, action.domain, action.mechanism)
                if self._ticket is not None:
                    self._ticket.authenticated()
                    self._server.limiter.auth_succeeded(f"{action.user}@{action.domain}")
            elif isinstance(action, neg.BindResource):
                self._bind(action.iq, action.resource)
            elif isinstance(action, neg.VerifyToken):
                if self._auth_refused(action.user, action.domain):
                    self._carry_out(self.negotiation.token_check_failed())
                else:
                    self._spawn(self._verify_token(action))
            elif isinstance(action, neg.ResumeInline):
                self._resume_inline(action.element)
            elif isinstance(action, neg.BindInline):
                self._bind_inline(action)
            elif isinstance(action, neg.IssueToken):
                self._spawn(self._issue_token(action))
            elif isinstance(action, neg.Sasl2Complete):
                self._sasl2_complete(action)
            elif isinstance(action, neg.PreAuthIq):
                self._pre_auth_iq(action.iq)
            elif isinstance(action, neg.PreBindElement):
                handler = self._server.pre_bind_handlers.get(action.element.tag)
                if handler is None:
                    self.close("unsupported-stanza-type",
                               f"unexpected element {action.element.tag}")
                    return
                handler(self, action.element)

    # -- authentication backoff (server/limits.py; RFC 6120 §6.5.10) ---------------------------

    def _auth_refused(self, user: str, domain: str) -> bool:
        """True when this address is in its backoff: the attempt is answered with
        <temporary-auth-failure/> without looking at the password."""
        wait = self._server.limiter.auth_wait(self._limit_key, self._loop.time())
        if wait <= 0:
            return False
        self._server.limiter.auth_refused += 1
        log.info("event=auth-refused peer=%s user=%s@%s wait=%.1f", self.peer, user, domain,
                 wait)
        self._refusing = True
        return True

    def _auth_failed(self, data: bytes) -> float:
        """A SASL <failure/> is going out: log and count it; how long to hold it back."""
        if self._refusing:  # our own refusal: logged already, and no guess was heard
            self._refusing = False
            return 0.0
        user, domain = self.negotiation.user, self.negotiation.domain
        delay = 0.0
        if b"<temporary-auth-failure" not in data:  # not the client's doing (storage down)
            account = f"{user}@{domain}" if user and domain else None
            delay = self._server.limiter.auth_failed(self._limit_key, account, self._loop.time())
        log.info("event=auth-failed peer=%s user=%s@%s delay=%.1f", self.peer, user or "-",
                 domain or "-", delay)
        self._server.hooks.notify_nowait(events.AUTH_FAILED, self)  # for /metrics
        return delay

    def _answer_late(self, actions: list[neg.Action]) -> None:
        if self._closing:
            return
        self._carry_out(actions, held=True)
        self._unpause(PAUSE_AUTH)

    def _pre_auth_features(self) -> list[_Element]:
        return [f for found in self._server.hooks.collect(events.C2S_PRE_AUTH_FEATURES, self)
                for f in found]

    def _pre_auth_iq(self, iq: _Element) -> None:
        """An iq before authentication (XEP-0077, XEP-0445): the 'c2s/pre-auth-iq' hook
        (stream, iq) answers with a reply or an awaitable of one; nobody: service-unavailable.
        """
        answer = self._server.hooks.fire("c2s/pre-auth-iq", self, iq)
        if answer is None:
            self.deliver(error_reply(iq, StanzaError("service-unavailable")))
        elif isinstance(answer, _ElementType):
            self.deliver(answer)
        else:
            async def reply() -> None:
                try:
                    self.deliver(await answer)
                except StanzaError as exc:
                    self.deliver(error_reply(iq, exc))
                except Exception:
                    log.exception("event=pre-auth-iq-failed peer=%s", self.peer)
                    self.deliver(error_reply(iq, StanzaError("internal-server-error")))
            self._spawn(reply())

    async def _lookup(self, user: str, domain: str) -> None:
        try:
            found = await self._server.storage.accounts.get_credentials(user, domain)
        except Exception:
            log_failure(log, "event=credentials-lookup-failed user=%s@%s", user, domain)
            if not self._closing:
                self._carry_out(self.negotiation.credentials_failed())
            return
        if not self._closing:
            self._carry_out(self.negotiation.credentials(found))

    def _bind(self, iq: _Element, resource: str | None) -> None:
        server = self._server
        negotiation = self.negotiation
        assert negotiation.user is not None and negotiation.domain is not None
        session = Session(JID.from_parts(negotiation.user, negotiation.domain), self)
        try:
            server.sessions.bind(session, resource)
        except StanzaError as err:
            self._carry_out(negotiation.bind_failed(iq, err))
            return
        self.session = session
        self.jid = session.jid
        self.bound = True
        self._carry_out(negotiation.bound(iq, session.jid_str))
        self._session_bound(session)

    def _session_bound(self, session: Session) -> None:
        log.info("event=bound peer=%s jid=%s", self.peer, session.jid_str)
        for pending in self._server.hooks.notify_nowait(events.SESSION_BOUND, session):
            self._spawn(pending)

    # -- SASL2 (XEP-0388) inline features: hooks the modules answer ---------------------------
    #   bind2/features ()                    -> feature vars a session may enable in Bind 2
    #   bind2/enable (session, element)      -> an element for <bound/>, True (done, nothing
    #                                           to say) or None (not mine: ignored)
    #   sasl2/resume (stream, <resume/>)     -> (<resumed/> | <failed/>, callable to run once
    #                                           <success/> is out, or None) (XEP-0198), or
    #                                           an awaitable of it ([cluster]: a session
    #                                           taken over from another node)
    #   fast/verify (user, domain, client, mechanism, proof, cb_data, invalidate)
    #                                        -> awaitable (HT responder data | None, rotate)
    #   fast/issue (user, domain, client, mechanism) -> awaitable (token, expiry) | None

    def _sasl2_inline(self) -> sasl2.Inline:
        hooks = self._server.hooks
        bind2 = tuple(var for found in hooks.collect(events.BIND2_FEATURES) for var in found)
        return sasl2.Inline(bind2=bind2, sm=hooks.has("sasl2/resume"),
                            fast=hooks.has("fast/verify") and hooks.has("fast/issue"))

    async def _verify_token(self, action: neg.VerifyToken) -> None:
        responder, rotate = None, False
        pending = self._server.hooks.fire(
            "fast/verify", action.user, action.domain, action.client, action.mechanism,
            action.proof, action.cb_data, action.invalidate)
        try:
            if pending is not None:
                responder, rotate = await pending
        except Exception:
            log_failure(log, "event=fast-verify-failed user=%s@%s", action.user, action.domain)
            if not self._closing:
                self._carry_out(self.negotiation.token_check_failed())
            return
        if not self._closing:
            self._carry_out(self.negotiation.token_verified(responder, rotate=rotate))

    async def _issue_token(self, action: neg.IssueToken) -> None:
        issued = None
        pending = self._server.hooks.fire("fast/issue", action.user, action.domain,
                                          action.client, action.mechanism)
        try:
            if pending is not None:
                issued = await pending
        except Exception:
            log_failure(log, "event=fast-issue-failed user=%s@%s", action.user, action.domain)
        if not self._closing:
            token, expiry = issued if issued is not None else (None, None)
            self._carry_out(self.negotiation.token_issued(token, expiry))

    def _resume_inline(self, element: _Element) -> None:
        found = self._server.hooks.fire("sasl2/resume", self, element)
        if inspect.isawaitable(found):  # [cluster]: the session is taken from another node
            self._spawn(self._resume_inline_later(found))
            return
        self._resumed_inline(found)

    async def _resume_inline_later(self, pending: Awaitable[Any]) -> None:
        try:
            found = await pending
        except Exception:
            log.exception("event=sasl2-resume-failed peer=%s", self.peer)
            self.close("internal-server-error", "the session could not be resumed")
            return
        self._resumed_inline(found)

    def _resumed_inline(self, found: Any) -> None:
        if self._closing or found is None:
            return
        answer, after = found
        self._after_success = after
        jid = self.session.jid_str if after is not None and self.session is not None else None
        self._carry_out(self.negotiation.inline_resumed(answer, jid))

    def _bind_inline(self, action: neg.BindInline) -> None:
        negotiation = self.negotiation
        assert negotiation.user is not None and negotiation.domain is not None
        session = Session(JID.from_parts(negotiation.user, negotiation.domain), self)
        try:
            # XEP-0386 §3.2: the resource is stable per user agent, so binding it ends an
            # earlier session of the same client (RFC 6120 §7.7.2.2: the new one wins).
            self._server.sessions.bind(session, action.resource)
        except StanzaError as err:
            self._carry_out(negotiation.inline_bind_failed(err))
            return
        self.session = session
        self.jid = session.jid
        self.bound = True
        self._after_success = lambda: self._session_bound(session)
        answers = []
        for feature in action.features:
            answer = self._server.hooks.fire("bind2/enable", session, feature)
            if isinstance(answer, _ElementType):
                answers.append(answer)
        self._carry_out(negotiation.inline_bound(session.jid_str, answers))

    def _sasl2_complete(self, action: neg.Sasl2Complete) -> None:
        log.info("event=sasl2-success peer=%s jid=%s resumed=%d", self.peer, action.jid,
                 int(action.resumed))
        after, self._after_success = self._after_success, None
        if after is not None:
            after()

    # -- stanzas (hot path) ------------------------------------------------------------------

    def _stanza(self, el: _Element) -> None:
        # Nonzas wait behind stanzas still being routed too: an XEP-0198 <r/> is answered
        # only once everything before it was handled.
        if self._blocked and self._hold(el):
            return
        if el.tag not in STANZA_TAGS:
            self._nonza(el)
            return
        shaper = self._shaper
        if shaper is not None and shaper.stanzas is not None and \
                not shaper.stanzas.take_one(self.last_activity):
            self._over_stanza_rate(el, shaper.stanzas)
            return
        session = self.session
        assert session is not None
        if session.outbox is not None:
            session.outbox.handled += 1  # XEP-0198 §4: h counts stanzas, not nonzas
        sender = el.get("from")
        # RFC 6120 §8.1.2.1: the server stamps the full JID; a client may only claim its own.
        if sender is not None and sender != session.jid_str and sender != session.bare_str:
            try:
                claimed = JID.parse(sender)
            except InvalidJID:
                claimed = None
            if claimed != session.jid and claimed != session.jid.bare:
                self.close("invalid-from", "'from' is not your address")
                return
        el.set("from", session.jid_str)
        # RFC 6120 §4.7.4: a client's stanza without xml:lang gets the one of its stream.
        lang = self.negotiation.client_lang
        if lang is not None and _XML_LANG not in el.attrib:
            el.set(_XML_LANG, lang)
        pending = self._server.router.route(el, session)
        if pending is not None:
            self._wait_for(self._server.router.spawn(pending))

    def _over_stanza_rate(self, el: _Element, bucket: TokenBucket) -> None:
        """The session's stanza rate is used up: this stanza and those after it wait (in
        order, reading paused) until the bucket has refilled; nothing is dropped."""
        wait = bucket.wait(1, self._loop.time())
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = deque()
        backlog.appendleft(el)  # first: it was next (fresh, or just taken from the backlog)
        self._blocked = True
        self._pause(PAUSE_STANZAS, wait, self._stanzas_refilled)

    def _stanzas_refilled(self) -> None:
        self._pauses &= ~PAUSE_STANZAS
        # the clock the stanza check reads (no fresher read happened while paused)
        self.last_activity = self._loop.time()
        if not self._closing:
            self._resume(None)  # type: ignore[arg-type]

    def _nonza(self, el: _Element) -> None:
        """A top-level element that is no stanza (RFC 6120 §8: e.g. XEP-0198's <r/>): the
        module that declared it handles it, else the stream ends."""
        handler = self._server.nonza_handlers.get(el.tag)
        if handler is None:
            self.close("unsupported-stanza-type", f"unexpected element {el.tag}")
            return
        assert self.session is not None
        handler(self.session, el)

    # -- output (the session's transport) ----------------------------------------------------

    def deliver(self, stanza: _Element) -> None:
        """Queue a stanza; everything queued in one loop iteration goes out in one write."""
        self._queue(serialize(stanza, ns.CLIENT))

    def send(self, stanza: _Element) -> None:
        self.deliver(stanza)

    def attach(self, session: Session) -> None:
        """Carry an existing session from now on (XEP-0198 resumption) instead of binding."""
        self.session = session
        self.jid = session.jid
        self.bound = True
        session.transport = self
        self.negotiation.resumed()

    def write_element(self, el: _Element) -> None:
        """A nonza of ours (e.g. XEP-0198 <a/>): written in order with stanzas."""
        self._queue(etree.tostring(el))

    def _end_session(self, reason: str) -> None:
        session = self.session
        if not self.bound or session is None:
            return
        self.bound = False
        server = self._server
        if session.transport is not self:
            return  # another stream carries the session now (resumed elsewhere)
        session.transport = None
        # A module may keep the session for the client to resume (XEP-0198 §5): then it is
        # not over yet; contacts still see it available.
        kept = server.hooks.fire("session-detached", session, reason)
        if kept is None:
            server.end_session(session, reason)

    def _spawn(self, coro: Any) -> None:
        self._server.router.spawn(coro)


_ElementType = type(etree.Element("x"))
_XML_LANG = ns.q(ns.XML, "lang")
# negotiation's <failure/>s: RFC 6120's and XEP-0388's
_SASL_FAILURES = (b'<failure xmlns="urn:ietf:params:xml:ns:xmpp-sasl"',
                  b'<failure xmlns="urn:xmpp:sasl:2"')
