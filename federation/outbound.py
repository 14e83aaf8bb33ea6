"""Our stream to a peer server for one (local domain, remote domain) pair.

Stanzas queue while it resolves, connects and authenticates; if that fails or takes longer than
[s2s] negotiation_timeout, each one is bounced (RFC 6120 §8.3.3: remote-server-not-found or
remote-server-timeout). The stream also carries <db:verify/> requests when we are the receiving
server checking a dialback key with the peer as the authoritative server (XEP-0220 §2.3).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING

from federation import negotiation as neg
from federation.stream import S2SStream
from server.xml.parser import Event

if TYPE_CHECKING:
    from federation.service import Federation

log = logging.getLogger("presenced.s2s")
MAX_QUEUED = 10_000  # stanzas waiting for one stream; more are bounced (resource-constraint)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class OutboundStream(S2SStream):
    kind = "s2s-out"

    def __init__(self, federation: Federation, local: str, remote: str) -> None:
        super().__init__(federation)
        self.local = local
        self.remote = remote
        self.ready = False
        self.failed = False
        self.negotiation: neg.OutboundNegotiation | None = None
        self._direct = False
        self._pending: list[bytes] = []
        self._verify_requests: list[bytes] = []
        self._verifying: dict[str, list[asyncio.Future[bool | None]]] = {}
        self._can_verify = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(
            federation.config.negotiation_timeout, self._timed_out)
        federation.spawn(self._connect())

    # -- what the federation asks of it ------------------------------------------------------

    def send(self, data: bytes) -> None:
        """A serialised jabber:server stanza."""
        if self.ready:
            self.last_activity = self._loop.time()
            self._queue(data)
        elif len(self._pending) >= MAX_QUEUED:
            self.federation.bounce(data, "resource-constraint",
                                   f"too much queued for {self.remote}")
        else:
            self._pending.append(data)

    def verify(self, stream_id: str, key: str) -> asyncio.Future[bool | None]:
        """Ask the peer whether it made `key` for the stream `stream_id` it opened to us."""
        future: asyncio.Future[bool | None] = self._loop.create_future()
        if self.failed:
            future.set_result(None)
            return future
        waiting = self._verifying.setdefault(stream_id, [])
        waiting.append(future)
        if len(waiting) == 1:
            request = neg.verify_request(self.local, self.remote, stream_id, key)
            if self._can_verify:
                self._queue(request)
            else:
                self._verify_requests.append(request)
        return future

    # -- connecting --------------------------------------------------------------------------

    async def _connect(self) -> None:
        federation = self.federation
        try:
            targets = await federation.resolver.targets(self.remote)
        except Exception as exc:  # a resolver failure is a routing failure, not a crash
            log.info("event=s2s-resolve-failed remote=%s reason=%s", self.remote, exc)
            targets = []
        timed_out = False
        tried: list[str] = []
        for target in targets:
            if _is_ip(target.host):
                addresses = [(target.host, target.port)]
            else:
                addresses = await federation.resolver.addresses(target.host, target.port)
            for host, port in addresses:
                if self.failed or self.closing:
                    return
                tried.append(f"{host}:{port}")
                self._direct = target.direct_tls
                try:
                    await asyncio.wait_for(self._loop.create_connection(lambda: self, host, port),
                                           federation.config.connect_timeout)
                except TimeoutError:
                    timed_out = True
                    continue
                except OSError as exc:
                    log.info("event=s2s-connect-failed remote=%s address=%s:%s reason=%s",
                             self.remote, host, port, exc.strerror or exc)
                    continue
                return
        if timed_out:
            self._fail("remote-server-timeout", f"no answer from {self.remote}")
        elif tried:
            self._fail("remote-server-not-found",
                       f"cannot connect to {self.remote} ({', '.join(tried)})")
        else:
            self._fail("remote-server-not-found", f"no address for {self.remote}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.failed:  # timed out while this connection was being set up
            transport.close()
            return
        log.info("event=s2s-connected direction=out local=%s remote=%s peer=%s direct_tls=%s",
                 self.local, self.remote, self.peer, self._direct)
        self.negotiation = neg.OutboundNegotiation(self.federation.policy, self.local,
                                                   self.remote, direct_tls=self._direct)
        if self._direct:
            self._tls = self.federation.outbound_tls(self.local, self.remote, direct=True)
            self._write_raw(self._tls.start())
        self._carry_out(self.negotiation.start())

    # -- negotiation -------------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        assert self.negotiation is not None
        self._carry_out(self.negotiation.receive(event))

    def _tls_ready(self) -> None:
        assert self.negotiation is not None and self._tls is not None
        valid = self.federation.certificate_valid(self._tls.peer_certificate_chain(),
                                                  self.remote, self.peer)
        self._carry_out(self.negotiation.tls_established(valid))

    def _carry_out(self, actions: list[neg.Action]) -> None:
        for action in actions:
            if isinstance(action, neg.Send):
                self._write_now(action.data)
            elif isinstance(action, neg.StartTLS):
                self._tls = self.federation.outbound_tls(self.local, self.remote, direct=False)
                self._write_raw(self._tls.start())
            elif isinstance(action, neg.RestartStream):
                self._parser = self.federation.new_parser()
            elif isinstance(action, neg.CanVerify):
                self._can_verify = True
                for request in self._verify_requests:
                    self._queue(request)
                self._verify_requests.clear()
            elif isinstance(action, neg.VerifyAnswer):
                for future in self._verifying.pop(action.stream_id, []):
                    if not future.done():
                        future.set_result(action.valid)
            elif isinstance(action, neg.Deliver):
                self._stanza(action.stanza)
            elif isinstance(action, neg.Ready):
                self._ready(action.method)
            elif isinstance(action, neg.Failed):
                self._fail(action.condition, action.text)
            elif isinstance(action, neg.CloseStream):
                self.close(action.condition, action.text)
                return

    def _ready(self, method: str) -> None:
        self.ready = True
        self._cancel_timer()
        assert self.negotiation is not None
        log.info("event=s2s-authenticated direction=out local=%s remote=%s method=%s "
                 "bidi=%s queued=%d", self.local, self.remote, method, self.negotiation.bidi,
                 len(self._pending))
        for data in self._pending:
            self._queue(data)
        self._pending.clear()

    def _timed_out(self) -> None:
        self._timer = None
        if not self.ready:
            self._fail("remote-server-timeout",
                       f"{self.remote} did not authenticate within "
                       f"{self.federation.config.negotiation_timeout:g} s")
            if self._transport is not None and not self.closing:
                self.close("connection-timeout", "authentication took too long")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, condition: str, text: str) -> None:
        """Bounce what waits; answer pending verifications with 'unknown'."""
        if self.failed:
            return
        self.failed = True
        self._cancel_timer()
        log.info("event=s2s-failed local=%s remote=%s condition=%s text=%s queued=%d",
                 self.local, self.remote, condition, text, len(self._pending))
        self.federation.forget(self)
        pending, self._pending = self._pending, []
        for data in pending:
            self.federation.bounce(data, condition, text)
        for futures in self._verifying.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)
        self._verifying.clear()

    # -- ending ------------------------------------------------------------------------------

    def _ended(self, reason: str) -> None:
        self.federation.forget(self)
        if not self.ready:
            self._fail("remote-server-not-found", f"stream to {self.remote} closed ({reason})")

    def _lost(self, exc: Exception | None) -> None:
        self._ended("connection lost")
        self._cancel_timer()

    def _who(self) -> str:
        return self.remote
