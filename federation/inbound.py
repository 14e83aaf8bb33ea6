"""A stream another server opened to us: negotiate, authenticate, then route what it carries
(and, when the peer asked for XEP-0288 bidirectionality, carry our stanzas back to it)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from federation import negotiation as neg
from federation.stream import S2SStream
from server.xml import ns
from server.xml.parser import Event
from server.xml.writer import stream_header

if TYPE_CHECKING:
    from federation.service import Federation

log = logging.getLogger("presenced.s2s")


class InboundStream(S2SStream):
    kind = "s2s-in"

    def __init__(self, federation: Federation, direct_tls: bool) -> None:
        super().__init__(federation, federation.inbound_tls(direct=True) if direct_tls else None)
        self.negotiation = neg.InboundNegotiation(
            federation.policy, direct_tls=direct_tls, certificate_valid=self._certificate_valid)
        self._verdicts: dict[str, bool] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.federation.inbound.add(self)
        limiter = self.federation.context.limiter
        if limiter is not None:
            self._shaper = limiter.stream_shaper("s2s", transport.get_extra_info("peername"),
                                                 self._loop.time())

    def _certificate_valid(self, domain: str) -> bool:
        verdict = self._verdicts.get(domain)
        if verdict is None:
            chain = self._tls.peer_certificate_chain() if self._tls is not None else []
            verdict = self._verdicts[domain] = self.federation.certificate_valid(
                chain, domain, self.peer)
        return verdict

    def _header_for_error(self) -> bytes:
        if self.negotiation.header_sent:
            return b""
        self.negotiation.header_sent = True
        return stream_header(content_ns=ns.SERVER, from_=self.federation.default_domain,
                             to=None, id_=None)

    def _event(self, event: Event) -> None:
        self._carry_out(self.negotiation.receive(event))

    def _carry_out(self, actions: list[neg.Action]) -> None:
        for action in actions:
            if isinstance(action, neg.Deliver):
                self._stanza(action.stanza)
            elif isinstance(action, neg.Send):
                self._write_now(action.data)
            elif isinstance(action, neg.CloseStream):
                self.close(action.condition, action.text)
                return
            elif isinstance(action, neg.StartTLS):
                self._tls = self.federation.inbound_tls(direct=False)
                self._parser = self.federation.new_parser()
                self.negotiation.tls_established()
            elif isinstance(action, neg.RestartStream):
                self._parser = self.federation.new_parser()
            elif isinstance(action, neg.VerifyKey):
                self.federation.spawn(self._verify(action))
            elif isinstance(action, neg.Authenticated):
                bidi = self.negotiation.bidi
                log.info("event=s2s-authenticated direction=in peer=%s local=%s remote=%s "
                         "method=%s bidi=%s", self.peer, action.local, action.remote,
                         action.method, bidi)
                if bidi:  # XEP-0288: our stanzas for that pair may use this stream
                    self.federation.bidi[(action.local, action.remote)] = self

    async def _verify(self, request: neg.VerifyKey) -> None:
        valid = await self.federation.verify_key(request.local, request.remote,
                                                 self.negotiation.stream_id, request.key)
        if not self.closing:
            self._carry_out(self.negotiation.dialback_verified(request.local, request.remote,
                                                               valid))

    def send(self, data: bytes) -> None:
        """A stanza of ours over this stream (XEP-0288 bidirectional)."""
        self.last_activity = self._loop.time()
        self._queue(data)

    def _ended(self, reason: str) -> None:
        self.federation.forget_inbound(self)

    def _lost(self, exc: Exception | None) -> None:
        self.federation.forget_inbound(self)

    def _who(self) -> str:
        return self.negotiation.remote or "-"
