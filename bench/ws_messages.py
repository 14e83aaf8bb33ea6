"""1:1 messages over WebSocket (issue 15): pairs of clients on RFC 7395 WebSocket (wss://, the
`xmpp` subprotocol, one element per frame), each sender keeping `window` messages in flight to
its receiver, beside the same pairs over TCP (bench/run.py's scenario), on presenced and on
Prosody 0.12 with mod_websocket; one fresh server each. Server CPU is read from /proc.

    python -m bench.ws_messages [--quick] [--servers presenced,prosody]
                                [--duration 8] [--pairs 50] [--window 32]
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import sys
import time
from typing import Any

import aiohttp

from bench import feature, loadgen
from bench.feature import PeerMaker, Variant
from bench.peers import Peer, PresencedPeer, ProsodyPeer
from bench.run import ADDRESSES, DOMAIN, NO_ARCHIVE, PASSWORD, Fleet, Params, pairs

HTTPS_PORT = 5281
FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
BODY = "x" * 100


# Both variants on the same servers, with their WebSocket endpoint on HTTPS_PORT.
SERVERS: dict[str, PeerMaker] = {
    "presenced": lambda host, port: PresencedPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                                  https_port=HTTPS_PORT, extra_config=NO_ARCHIVE),
    "prosody": lambda host, port: ProsodyPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                              extra_modules=("websocket",),
                                              https_port=HTTPS_PORT,
                                              extra_config=f'http_default_host = "{DOMAIN}"'),
}
VARIANTS = (Variant("tcp", SERVERS, op="messages"), Variant("websocket", SERVERS, op="websocket"))


class WSClient:
    """One XMPP-over-WebSocket session: framing, SASL PLAIN (the socket is TLS), bind."""

    def __init__(self, session: aiohttp.ClientSession, url: str, user: str) -> None:
        self.session = session
        self.url = url
        self.user = user
        self.jid = ""
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def _until(self, needle: str, timeout: float = 30.0) -> str:
        assert self.ws is not None
        while True:
            frame = await self.ws.receive(timeout)
            if frame.type != aiohttp.WSMsgType.TEXT:
                raise loadgen.XMPPError(f"{self.user}: WebSocket {frame.type!r}")
            if needle in frame.data:
                return str(frame.data)
            if "<failure" in frame.data or "stream:error" in frame.data:
                raise loadgen.XMPPError(f"{self.user}: {frame.data[:200]}")

    async def _open(self) -> str:
        assert self.ws is not None
        await self.ws.send_str(f"<open xmlns='{FRAMING}' to='{DOMAIN}' version='1.0'/>")
        return await self._until("features")

    async def login(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.ws = await self.session.ws_connect(self.url, protocols=("xmpp",), ssl=context,
                                                max_msg_size=0, autoping=False)
        await self._open()
        token = base64.b64encode(f"\0{self.user}\0{PASSWORD}".encode()).decode()
        await self.ws.send_str(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        await self._until("<success")
        await self._open()
        await self.ws.send_str(f"<iq xmlns='jabber:client' type='set' id='b'><bind xmlns="
                               f"'{BIND}'><resource>bench</resource></bind></iq>")
        reply = await self._until("</jid>")
        self.jid = reply.split("<jid>")[1].split("</jid>")[0]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def measure_ws(host: str, users: list[tuple[str, str]], window: int, warmup: float,
                     duration: float, peer: Peer) -> dict[str, Any]:
    url = f"wss://{host}:{HTTPS_PORT}/xmpp-websocket"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        senders = [WSClient(session, url, s) for s, _ in users]
        receivers = [WSClient(session, url, r) for _, r in users]
        for i in range(0, len(senders + receivers), 20):
            await asyncio.gather(*(c.login() for c in (senders + receivers)[i:i + 20]))
        counts = [0] * len(users)
        sent = [0] * len(users)
        running = True

        async def pump(i: int) -> None:
            sender, receiver = senders[i], receivers[i]
            assert sender.ws is not None and receiver.ws is not None
            message = (f"<message xmlns='jabber:client' to='{receiver.jid}' type='chat'>"
                       f"<body>{BODY}</body></message>")

            async def fill() -> None:
                assert sender.ws is not None
                while running and sent[i] - counts[i] < window:
                    sent[i] += 1
                    await sender.ws.send_str(message)
            await fill()
            while running:
                try:
                    frame = await receiver.ws.receive(1.0)
                except TimeoutError:
                    continue
                if frame.type != aiohttp.WSMsgType.TEXT:
                    return
                if "<message" in frame.data:
                    counts[i] += 1
                    if sent[i] - counts[i] <= window // 2:
                        await fill()

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(users))]
        await asyncio.sleep(warmup)
        start_count, start_cpu, start = sum(counts), peer.cpu_seconds(), time.monotonic()
        await asyncio.sleep(duration)
        delivered = sum(counts) - start_count
        cpu, seconds = peer.cpu_seconds() - start_cpu, time.monotonic() - start
        running = False
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in senders + receivers:
            await c.close()
    if delivered == 0:
        raise RuntimeError("no message was delivered")
    return {"msgs_per_s": delivered / seconds, "per_cpu_s": delivered / max(cpu, 1e-9)}


def measure(variant: Variant, p: Params, peer: Peer, fleet: Fleet,
            target: loadgen.Target) -> dict[str, Any]:
    if variant.op != "websocket":
        return feature.messages(variant.op, p, peer, fleet, target)
    return asyncio.run(measure_ws(peer.host, pairs(p.general_accounts, p.pairs), p.window,
                                  p.warmup, p.duration, peer))


def main(argv: list[str] | None = None) -> int:
    p, kinds = feature.parse(__doc__ or "", "presenced,prosody", argv)
    feature.compare(kinds, p, VARIANTS, "transport", ADDRESSES, measure,
                    "the WebSocket generator is one process: a floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
