"""One client connection: negotiation (the c2s machine), then stanzas to the router.

The byte moving (TLS, parser, batched writes, closing) is XMLStreamConnection's. After
resource binding this class handles stanzas itself (the hot path): check and stamp 'from',
route, and keep per-stream order when routing goes asynchronous.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeAlias

from lxml import etree

from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.stream import negotiation as neg
from server.stream.connection import XMLStreamConnection
from server.xml import ns
from server.xml.parser import Event
from server.xml.stanza import STANZA_TAGS
from server.xml.writer import serialize, stream_header

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.c2s")
_Element: TypeAlias = etree._Element


class C2SConnection(XMLStreamConnection):
    kind = "c2s"
    local_client = True  # stanzas from it get outbound processing (the user's server)
    __slots__ = (
        "_bare_str",
        "_jid_str",
        "_server",
        "bound",
        "directed",
        "extra",
        "interested",
        "jid",
        "negotiation",
        "presence",
        "priority",
    )

    def __init__(self, server: Server, direct_tls: bool) -> None:
        super().__init__(server.loop, server.new_parser(),
                         server.tls_layer(direct=True) if direct_tls else None)
        self._server = server
        self.negotiation = neg.C2SNegotiation(
            server.c2s_policy, direct_tls=direct_tls, channel_binding=self._channel_binding,
            post_bind_features=server.post_bind_features)
        self.bound = False
        self.jid: JID = server.placeholder_jid
        self._jid_str = ""
        self._bare_str = ""
        self.priority = 0
        self.presence: _Element | None = None
        self.interested = False   # RFC 6121 §2.1.6: requested the roster, so gets roster pushes
        self.directed: set[JID] | None = None  # RFC 6121 §4.6: directed presence recipients
        self.extra: dict[str, Any] | None = None  # per-session state of feature modules

    # -- the stream --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.connections.add(self)

    def _event(self, event: Event) -> None:
        if self.bound and type(event) is _ElementType:
            self._stanza(event)
        else:
            self._carry_out(self.negotiation.receive(event))

    def _lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._end_session("disconnected" if exc is None else "connection-lost")

    def _ended(self, reason: str) -> None:
        self._end_session(reason)

    def _who(self) -> str:
        return self._jid_str or "-"

    def _header_for_error(self) -> bytes:
        if self.negotiation.header_sent:
            return b""
        self.negotiation.header_sent = True
        return stream_header(content_ns=ns.CLIENT, from_=self._server.default_domain, to=None,
                             id_=None)

    # -- negotiation -------------------------------------------------------------------------

    def _channel_binding(self, kind: str) -> bytes | None:
        return self._tls.channel_binding(kind) if self._tls is not None else None

    def _carry_out(self, actions: list[neg.Action]) -> None:
        for action in actions:
            if isinstance(action, neg.Send):
                self._write_now(action.data)
            elif isinstance(action, neg.CloseStream):
                self.close(action.condition, action.text)
                return
            elif isinstance(action, neg.LookupCredentials):
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
            elif isinstance(action, neg.BindResource):
                self._bind(action.iq, action.resource)

    async def _lookup(self, user: str, domain: str) -> None:
        try:
            found = await self._server.storage.accounts.get_credentials(user, domain)
        except Exception:
            log.exception("event=credentials-lookup-failed user=%s@%s", user, domain)
            if not self._closing:
                self._carry_out(self.negotiation.credentials_failed())
            return
        if not self._closing:
            self._carry_out(self.negotiation.credentials(found))

    def _bind(self, iq: _Element, resource: str | None) -> None:
        server = self._server
        negotiation = self.negotiation
        assert negotiation.user is not None and negotiation.domain is not None
        bare = JID.from_parts(negotiation.user, negotiation.domain)
        try:
            full = server.sessions.bind(self, bare, resource)
        except StanzaError as err:
            self._carry_out(negotiation.bind_failed(iq, err))
            return
        self.jid = full
        self._jid_str = str(full)
        self._bare_str = str(bare)
        self.bound = True
        self._carry_out(negotiation.bound(iq, self._jid_str))
        log.info("event=bound peer=%s jid=%s", self.peer, self._jid_str)
        for pending in server.hooks.fire_all("session-bound", self):
            if asyncio.iscoroutine(pending) or isinstance(pending, asyncio.Future):
                self._spawn(pending)

    # -- stanzas (hot path) ------------------------------------------------------------------

    def _stanza(self, el: _Element) -> None:
        if self._blocked and self._hold(el):
            return
        if el.tag not in STANZA_TAGS:
            self.close("unsupported-stanza-type", f"unexpected element {el.tag}")
            return
        sender = el.get("from")
        # RFC 6120 §8.1.2.1: the server stamps the full JID; a client may only claim its own.
        if sender is not None and sender != self._jid_str and sender != self._bare_str:
            try:
                claimed = JID.parse(sender)
            except InvalidJID:
                claimed = None
            if claimed != self.jid and claimed != self.jid.bare:
                self.close("invalid-from", "'from' is not your address")
                return
        el.set("from", self._jid_str)
        pending = self._server.router.route(el, self)
        if pending is not None:
            self._wait_for(pending)

    # -- output ------------------------------------------------------------------------------

    def send(self, stanza: _Element) -> None:
        """Queue a stanza; everything queued in one loop iteration goes out in one write."""
        self._queue(serialize(stanza, ns.CLIENT))

    def _end_session(self, reason: str) -> None:
        if self.bound:
            self.bound = False
            server = self._server
            if server.sessions.unbind(self):
                log.info("event=unbound jid=%s reason=%s", self._jid_str, reason)
            for pending in server.hooks.fire_all("session-closed", self, reason):
                if asyncio.iscoroutine(pending) or isinstance(pending, asyncio.Future):
                    server.router.spawn(pending)

    def _spawn(self, coro: Any) -> None:
        self._server.router.spawn(coro)


_ElementType = type(etree.Element("x"))
