"""A stream another server opened to us: negotiate, authenticate, then route what it carries.

Stanzas are routed with no origin session: for the router they come from another server, so
modules apply inbound processing (RFC 6121 §3.1.3, §4.3.2). Routing may go asynchronous; the
next stanza waits for it, which keeps the stream's order (RFC 6120 §10.1).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from federation import negotiation as neg
from federation.stream import S2SStream
from server.xml import ns
from server.xml.parser import Event
from server.xml.writer import stream_header, to_canonical

if TYPE_CHECKING:
    from lxml.etree import _Element

    from federation.service import Federation

log = logging.getLogger("presenced.s2s")
_BACKLOG_PAUSE = 64


class InboundStream(S2SStream):
    direction = "in"

    def __init__(self, federation: Federation, direct_tls: bool) -> None:
        super().__init__(federation)
        if direct_tls:
            self.tls = federation.inbound_tls(direct=True)
        self.negotiation = neg.InboundNegotiation(
            federation.policy, direct_tls=direct_tls, certificate_valid=self._certificate_valid)
        self._verdicts: dict[str, bool] = {}
        self._backlog: deque[_Element] = deque()
        self._blocked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.federation.inbound.add(self)

    def _certificate_valid(self, domain: str) -> bool:
        verdict = self._verdicts.get(domain)
        if verdict is None:
            chain = self.tls.peer_certificate_chain() if self.tls is not None else []
            verdict = self._verdicts[domain] = self.federation.certificate_valid(
                chain, domain, self.peer)
        return verdict

    def header_needed(self) -> bytes:
        if self.negotiation.header_sent:
            return b""
        self.negotiation.header_sent = True
        return stream_header(content_ns=ns.SERVER, from_=self.federation.default_domain,
                             to=None, id_=None)

    def event(self, event: Event) -> None:
        self._carry_out(self.negotiation.receive(event))

    def _carry_out(self, actions: list[neg.Action]) -> None:
        for action in actions:
            if isinstance(action, neg.Deliver):
                self._deliver(action.stanza)
            elif isinstance(action, neg.Send):
                self.write_now(action.data)
            elif isinstance(action, neg.CloseStream):
                self.close(action.condition, action.text)
                return
            elif isinstance(action, neg.StartTLS):
                self.tls = self.federation.inbound_tls(direct=False)
                self.parser = self.federation.new_parser()
                self.negotiation.tls_established()
            elif isinstance(action, neg.RestartStream):
                self.parser = self.federation.new_parser()
            elif isinstance(action, neg.VerifyKey):
                self.federation.spawn(self._verify(action))
            elif isinstance(action, neg.Authenticated):
                log.info("event=s2s-authenticated direction=in peer=%s local=%s remote=%s "
                         "method=%s", self.peer, action.local, action.remote, action.method)

    async def _verify(self, request: neg.VerifyKey) -> None:
        valid = await self.federation.verify_key(request.local, request.remote,
                                                 self.negotiation.stream_id, request.key)
        if not self.closing:
            self._carry_out(self.negotiation.dialback_verified(request.local, request.remote,
                                                               valid))

    # -- stanzas -----------------------------------------------------------------------------

    def _deliver(self, stanza: _Element) -> None:
        if self._blocked:
            self._backlog.append(stanza)
            if len(self._backlog) == _BACKLOG_PAUSE and self.transport is not None:
                self.transport.pause_reading()
            return
        pending = self.federation.router.route(to_canonical(stanza), None)
        if pending is not None:
            self._blocked = True
            task = asyncio.ensure_future(pending)
            task.add_done_callback(self._resume)

    def _resume(self, _task: asyncio.Future[Any]) -> None:
        self._blocked = False
        backlog = self._backlog
        while backlog and not self._blocked and not self.closing:
            self._deliver(backlog.popleft())
        if not backlog and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def closed(self, reason: str) -> None:
        self.federation.inbound.discard(self)

    def lost(self, exc: Exception | None) -> None:
        self.federation.inbound.discard(self)
