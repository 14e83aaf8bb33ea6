"""Federation: the s2s listener, one outbound stream per (local, remote) domain pair, dialback
verification, certificate checks, policy ([s2s] allow/deny) and bounces.

The router hands us every stanza for a domain we do not host (hook `route/remote`, after the
presence module's outbound processing); inbound streams hand stanzas to the router.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lxml import etree

from federation import auth
from federation import negotiation as neg
from federation.inbound import InboundStream
from federation.outbound import OutboundStream
from federation.resolver import Resolver
from server import listening
from server.errors import StanzaError
from server.jid import JID, InvalidJID
from server.stream.tls import TLSLayer, client_context, sni_server_context
from server.xml import ns
from server.xml import stanza as st
from server.xml.parser import StreamParser
from server.xml.writer import serialize, to_canonical

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from OpenSSL import SSL

    from server.config import Address, S2SConfig, TLSConfig
    from server.events import Hooks
    from server.limits import Limiter
    from server.router import Router
    from server.sessions import Session

log = logging.getLogger("presenced.s2s")
_SWEEP_INTERVAL = 5.0
_ALPN = [b"xmpp-server"]  # XEP-0368 §3


@dataclass(frozen=True)
class FederationContext:
    """What federation needs of the server it serves, and no more."""

    loop: asyncio.AbstractEventLoop
    router: Router                       # route(), spawn() for what the peers send
    hooks: Hooks                         # federation takes `route/remote`
    domains: frozenset[str]              # every domain we host: users' and services'
    default_domain: str
    s2s: S2SConfig
    tls: TLSConfig
    listen: tuple[tuple[str, tuple[Address, ...]], ...]  # ("s2s" | "s2s_tls", addresses)
    new_parser: Callable[[], StreamParser]
    limiter: Limiter | None = None       # the read rate of inbound streams ([limits])
    # The dialback secret when [s2s] dialback_secret is unset: the one every node of the domain
    # shares (storage/keystore.py), so that any node verifies a key another node sent.
    shared_secret: bytes | None = None


class Federation:
    def __init__(self, context: FederationContext) -> None:
        self.context = context
        self.loop = context.loop
        self.router = context.router
        self.config = config = context.s2s
        self.hosts = context.domains
        self.default_domain = context.default_domain
        self._secret = (config.dialback_secret.encode() if config.dialback_secret
                        else context.shared_secret or secrets.token_hex(32).encode())
        self.policy = neg.Policy(
            domains=self.hosts, require_tls=config.require_starttls,
            require_valid_certificates=config.require_valid_certificates, bidi=config.bidi,
            allowed=self.allowed, dialback_key=self.dialback_key, keys_equal=auth.keys_equal)
        self.resolver = Resolver({d: (a.host, a.port) for d, a in config.routes.items()},
                                 nameservers=config.nameservers or None,
                                 timeout=config.connect_timeout)
        self._outbound_ctx: dict[tuple[str, bool], SSL.Context] = {}
        self.reload_tls(context.tls)
        self.outbound: dict[tuple[str, str], OutboundStream] = {}
        self.inbound: set[InboundStream] = set()
        # XEP-0288: inbound streams that carry our stanzas back, by (local, remote) pair.
        self.bidi: dict[tuple[str, str], InboundStream] = {}
        self._listeners: list[tuple[str, asyncio.Server]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = False  # no new streams once stop() began

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.context.hooks.add("route/remote", self.route, 0)
        for kind, addresses in self.context.listen:
            for address in addresses:
                await self._listen(kind, address.host, address.port)
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _listen(self, kind: str, host: str, port: int) -> None:
        direct = kind == "s2s_tls"
        listener = await self.loop.create_server(
            lambda: InboundStream(self, direct_tls=direct), host, port, backlog=1024,
            reuse_address=True, reuse_port=listening.ports_shared())
        self._listeners.append((kind, listener))
        for sock in listener.sockets:
            name = sock.getsockname()
            log.info("event=listening kind=%s address=%s:%s", kind, name[0], name[1])

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return [(kind, *sock.getsockname()[:2])
                for kind, listener in self._listeners for sock in listener.sockets]

    async def stop(self) -> None:
        self._stopped = True
        for _kind, listener in self._listeners:
            listener.close()
        self._listeners.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for stream in list(self.inbound):
            stream.close("system-shutdown", "the server is shutting down")
        for out in list(self.outbound.values()):
            out.close()
        for task in list(self._tasks):
            task.cancel()
        await self.resolver.close()

    async def _sweep(self) -> None:
        config = self.config
        while True:
            await asyncio.sleep(min(_SWEEP_INTERVAL, config.negotiation_timeout / 2,
                                    config.idle_timeout / 2))
            now = self.loop.time()
            for stream in list(self.inbound):
                if (not stream.negotiation.authenticated
                        and now - stream.opened_at > config.negotiation_timeout):
                    stream.close("connection-timeout", "authentication took too long")
                elif now - stream.last_activity > config.idle_timeout:
                    stream.close("connection-timeout", "idle for too long")
            for out in list(self.outbound.values()):
                if out.ready and now - out.last_activity > config.idle_timeout:
                    log.info("event=s2s-idle-close local=%s remote=%s", out.local, out.remote)
                    out.close()

    def reload_tls(self, tls: TLSConfig) -> None:
        """Contexts for new streams (at start, and on reload: server/ctl.py); raises and
        changes nothing when a file cannot be used."""
        trust = auth.load_trust(tls.ca_file)
        default, per_domain = (tls.certificate, tls.key), tls.domain_certificates
        inbound = sni_server_context(default, per_domain, ca_file=tls.ca_file,
                                     request_certificate=True)
        inbound_direct = sni_server_context(default, per_domain, alpn=_ALPN,
                                            ca_file=tls.ca_file, request_certificate=True)
        # Towards peers each hosted domain shows its own certificate (XEP-0178 identity).
        outbound: dict[tuple[str, bool], SSL.Context] = {}
        for domain in self.hosts:
            cert, key = per_domain.get(domain, default)
            outbound[(domain, False)] = client_context(cert, key)
            outbound[(domain, True)] = client_context(cert, key, alpn=_ALPN)
        self.trust, self._inbound_ctx, self._inbound_direct_ctx = trust, inbound, inbound_direct
        self._outbound_ctx = outbound

    # -- pieces the streams use --------------------------------------------------------------

    def new_parser(self) -> StreamParser:
        return self.context.new_parser()

    def inbound_tls(self, direct: bool) -> TLSLayer:
        return TLSLayer(self._inbound_direct_ctx if direct else self._inbound_ctx)

    def outbound_tls(self, local: str, remote: str, direct: bool) -> TLSLayer:
        return TLSLayer(self._outbound_ctx[(local, direct)], server_name=remote)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def allowed(self, domain: str) -> bool:
        if domain in self.config.deny:
            return False
        return not self.config.allow or domain in self.config.allow

    def dialback_key(self, receiving: str, originating: str, stream_id: str) -> str:
        return auth.dialback_key(self._secret, receiving, originating, stream_id)

    def certificate_valid(self, chain: list[bytes], domain: str, peer: str) -> bool:
        verdict = auth.verify_peer(chain, domain, self.trust)
        if not verdict.valid:
            log.info("event=s2s-certificate-invalid peer=%s domain=%s reason=%s", peer, domain,
                     verdict.reason)
        return verdict.valid

    def forget_inbound(self, stream: InboundStream) -> None:
        self.inbound.discard(stream)
        for pair in [p for p, s in self.bidi.items() if s is stream]:
            del self.bidi[pair]

    def forget(self, stream: OutboundStream) -> None:
        key = (stream.local, stream.remote)
        if self.outbound.get(key) is stream:
            del self.outbound[key]

    # -- routing -----------------------------------------------------------------------------

    def route(self, stanza: etree._Element, origin: Session | None, to: JID) -> bool:
        """A stanza for a remote domain: onto the stream for its (from-domain, to-domain)."""
        if self._stopped:
            raise StanzaError("remote-server-not-found", "this server is shutting down")
        remote = to.domain
        sender = stanza.get("from")
        try:
            local = JID.parse(sender).domain if sender else self.default_domain
        except InvalidJID:
            local = self.default_domain
        if local not in self.hosts:
            # Only our own users' stanzas leave here: never relay between two other servers.
            raise StanzaError("not-allowed", "this server does not relay")
        if not self.allowed(remote):
            raise StanzaError("not-allowed", f"no federation with {remote}")
        data = serialize(stanza, ns.SERVER)
        back = self.bidi.get((local, remote))
        if back is not None and not back.closing:
            back.send(data)  # the peer's own stream to us (XEP-0288)
        else:
            self._stream(local, remote).send(data)
        return True

    def _stream(self, local: str, remote: str) -> OutboundStream:
        stream = self.outbound.get((local, remote))
        if stream is None or stream.closing or stream.failed:
            stream = self.outbound[(local, remote)] = OutboundStream(self, local, remote)
        return stream

    async def verify_key(self, local: str, remote: str, stream_id: str, key: str) -> bool | None:
        """XEP-0220 §2.3: ask the authoritative server of `remote` (over our stream to it)
        whether it made `key` for its stream `stream_id` to `local`. None: no answer."""
        future = self._stream(local, remote).verify(stream_id, key)
        try:
            return await asyncio.wait_for(future, self.config.negotiation_timeout)
        except TimeoutError:
            return None

    def bounce(self, data: bytes, condition: str, text: str) -> None:
        """RFC 6120 §8.3.3: tell our user the stanza could not be delivered (never for an error;
        never for an iq result, which nobody waits for)."""
        stanza = to_canonical(etree.fromstring(data))
        if st.is_error(stanza) or (stanza.tag == st.IQ and stanza.get("type") == "result"):
            return
        reply = st.error_reply(stanza, StanzaError(condition, text))
        pending = self.router.route(reply, None)
        if pending is not None:
            self.router.spawn(pending)
