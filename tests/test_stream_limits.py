"""Stream limits over real sockets: slow readers, read pausing behind a slow route, the
per-user session limit, a client's own </stream:stream>, and the s2s negotiation timeout
(server/stream/connection.py, server/stream/c2s.py, federation/service.py)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from server.stream import connection
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import BIND_NS, CLIENT, STREAMS, RawClient, condition, end_stream, header
from tests.test_presence import next_presence, subscribe_both

IQ = f"{{{CLIENT}}}iq"
STREAM_ERROR = f"{{{STREAMS}}}error"
PING = "<ping xmlns='urn:xmpp:ping'/>"


async def ping_round_trip(client: RawClient, ident: str) -> None:
    reply = await client.ask(f"<iq type='get' id='{ident}' to='a.test'>{PING}</iq>",
                             skip_others=True)
    assert reply.get("id") == ident and reply.get("type") == "result", etree.tostring(reply)


# -- a slow reader is disconnected (WRITE_BUFFER_LIMIT) ------------------------------------------

async def test_client_that_never_reads_is_disconnected(server: RunningServer) -> None:
    """bob/slow stops reading while alice floods it: once the server holds more than
    WRITE_BUFFER_LIMIT for it, the session ends (bob/watch sees it go) and so does the TCP
    connection, although bob/slow still reads nothing."""
    for user in ("alice", "bob"):
        await server.add_user(f"{user}@a.test")
    watch = await server.raw_login("bob@a.test", resource="watch")
    await watch.send("<presence/>")
    await next_presence(watch, None, "bob@a.test/watch")
    slow = await server.raw_login("bob@a.test", resource="slow")
    await slow.send("<presence/>")
    await next_presence(watch, None, "bob@a.test/slow")
    (conn,) = [c for c in server.server.connections if str(c.jid) == "bob@a.test/slow"]
    sock = slow.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room in the kernel
    # From here on nobody reads `slow`: its StreamReader stops the transport at 128 KiB.
    alice = await server.raw_login("alice@a.test")
    body = "x" * 200_000
    total = 0
    flood = 0
    while total < connection.WRITE_BUFFER_LIMIT + (8 << 20):  # the limit + kernel buffers
        await alice.send(f"<message to='bob@a.test/slow' id='f{flood}'><body>{body}</body>"
                         "</message>")
        total += len(body)
        flood += 1
    await ping_round_trip(alice, "flooded")  # every message was routed
    gone = await next_presence(watch, "unavailable", "bob@a.test/slow")
    assert gone.get("from") == "bob@a.test/slow"
    # The TCP connection goes too, within the close grace, although `slow` still reads
    # nothing: the server lets go of the socket and of what it had buffered for it.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connection.CLOSE_GRACE + 5
    while conn in server.server.connections:
        assert loop.time() < deadline, (
            f"the server still holds the slow reader's connection "
            f"({conn._transport.get_write_buffer_size()} bytes buffered)")
        await asyncio.sleep(0.1)


# -- reading pauses behind a slow route (BACKLOG_PAUSE) ------------------------------------------

async def test_reading_pauses_past_backlog_and_resumes(server: RunningServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A message to an offline account waits for storage; the stanzas behind it are held in
    order, and at BACKLOG_PAUSE held stanzas the server stops reading the socket. Bytes sent
    then (here: broken XML) are read only after the route finished and the held stanzas were
    answered: the 64 ping results come first, the not-well-formed stream error after them."""
    for user in ("alice", "bob", "carol"):
        await server.add_user(f"{user}@a.test")
    offline = server.server.storage.offline
    store = offline.store
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def slow_store(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await store(*args, **kwargs)

    monkeypatch.setattr(offline, "store", slow_store)
    alice = await server.raw_login("alice@a.test")
    other = await server.raw_login("carol@a.test")
    held = connection.BACKLOG_PAUSE
    pings = "".join(f"<iq type='get' id='h{n}' to='a.test'>{PING}</iq>" for n in range(held))
    await alice.send("<message to='bob@a.test' id='off'><body>later</body></message>" + pings)
    await asyncio.wait_for(entered.wait(), 5)
    # Another stream's round trip: the server loop has since had the held pings in hand.
    await ping_round_trip(other, "o1")
    await alice.send("<message></iq>")  # not well-formed: an error as soon as it is read
    for n in range(3):  # enough loop turns for the server to read the bytes, were it reading
        await ping_round_trip(other, f"o{n + 2}")
    gate.set()
    got: list[tuple[str, str | None, str | None]] = []
    while len(got) <= held:  # the results, then the stream error (or the error first)
        el = await alice.next()
        if el.tag == STREAM_ERROR:
            got.append((el.tag, None, etree.QName(el[0]).localname))
            break
        got.append((el.tag, el.get("id"), el.get("type")))
    assert got == [(IQ, f"h{n}", "result") for n in range(held)] + [
        (STREAM_ERROR, None, "not-well-formed")]
    assert await server.server.storage.offline.count("bob", "a.test") == 1


# -- [limits] max_sessions_per_user --------------------------------------------------------------

async def bind(client: RawClient, user: str, resource: str) -> etree._Element:
    await client.authenticate("a.test", user, PASSWORD)
    await client.open("a.test")
    return await client.ask(f"<iq type='set' id='bind'><bind xmlns='{BIND_NS}'>"
                            f"<resource>{resource}</resource></bind></iq>")


async def test_session_limit_per_user(tmp_path: Path) -> None:
    running = await start_server(tmp_path, "[limits]\nmax_sessions_per_user = 2\n")
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        one = await running.raw_login("alice@a.test", resource="one")
        await running.raw_login("alice@a.test", resource="two")
        third = await running.raw()
        reply = await bind(third, "alice", "three")
        assert condition(reply) == "resource-constraint"
        assert reply.find(f"{{{CLIENT}}}error").get("type") == "wait"
        assert reply.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid") is None
        # The limit is per account, and counts sessions: another account binds, and alice
        # binds again once one of hers has ended.
        await running.raw_login("bob@a.test", resource="one")
        await end_stream(one)
        again = await running.raw()
        reply = await bind(again, "alice", "three")
        assert reply.get("type") == "result", etree.tostring(reply)
        assert reply.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid") == "alice@a.test/three"
    finally:
        await stop_server(running)


# -- a client's own </stream:stream> -------------------------------------------------------------

async def test_client_closes_its_stream(server: RunningServer) -> None:
    """RFC 6120 §4.4: the server answers with its own closing tag and hangs up; the session
    is over, so a contact sees the client go unavailable."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test")
    await alice.send("<presence/>")
    await bob.send("<presence/>")
    await subscribe_both(server, alice, bob, "alice@a.test", "bob@a.test")
    await end_stream(alice, timeout=connection.CLOSE_GRACE + 3)
    assert alice.closed  # the server's </stream:stream>, not just a TCP close
    gone = await next_presence(bob, "unavailable", "alice@a.test")
    assert gone.get("from") == "alice@a.test/raw"
    # Gone for routing too: an iq to the old full JID gets service-unavailable (RFC 6121 §8.5.3.2.3).
    await bob.send("<iq type='get' id='gone' to='alice@a.test/raw'>" + PING + "</iq>")
    reply = await bob.next_of("iq")
    assert reply.get("id") == "gone" and condition(reply) == "service-unavailable"


# -- [s2s] negotiation_timeout -------------------------------------------------------------------

@pytest.mark.parametrize("opening", [b"", header("a.test", xmlns="jabber:server",
                                                  extra=" from='b.test'")],
                         ids=["silent", "header-only"])
async def test_s2s_peer_that_never_authenticates_times_out(tmp_path: Path,
                                                           opening: bytes) -> None:
    timeout = 1.0
    running = await start_server(tmp_path, f"[s2s]\nnegotiation_timeout = {timeout}\n",
                                 s2s="127.0.0.1:0")
    try:
        host, port = running.address("s2s")
        peer = await RawClient.connect(host, port)
        loop = asyncio.get_running_loop()
        began = loop.time()
        if opening:
            await peer.send(opening)
            features = await peer.expect(f"{{{STREAMS}}}features")
            assert features is not None
        assert await peer.stream_error(timeout=timeout + 5) == "connection-timeout"
        took = loop.time() - began
        assert timeout - 0.1 <= took <= timeout + 2.5, (
            f"connection-timeout after {took:.1f} s, [s2s] negotiation_timeout = {timeout}")
        await peer.wait_closed(connection.CLOSE_GRACE + 3)
    finally:
        await stop_server(running)


# -- WebSocket message limits (RFC 7395 over RFC 6455) ---------------------------------------

async def test_websocket_message_limits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stanza over [limits] max_stanza_size in one WebSocket message is a policy-violation
    stream error then <close/> (RFC 6120 §4.9.3.16), as over TCP; a message over the WebSocket
    limit (2 x max_stanza_size + 4096, server/modules/http.py) is closed with 1009 Message Too Big (RFC 6455 §7.4.1).
    Neither leaves a traceback, and another WebSocket client is still served."""
    import logging

    import aiohttp

    from tests.test_http import WSClient, start_web, url
    caplog.set_level(logging.INFO)
    # The parser checks the size once per 16 KiB slice: a stanza well over the limit is caught.
    running = await start_web(tmp_path, "[limits]\nmax_stanza_size = 100000\n")
    await running.add_user("alice@a.test")
    await running.add_user("bob@a.test")
    try:
        target = url(running, "/xmpp-websocket", "wss")
        alice = await WSClient.connect(target)
        try:
            await alice.login("alice")
            await alice.send(f"<message xmlns='{CLIENT}' to='bob@a.test'><body>"
                             + "x" * 150000 + "</body></message>")
            await alice.expect_stream_error("policy-violation")
        finally:
            await alice.close()
        alice = await WSClient.connect(target)
        try:
            await alice.login("alice")
            await alice.send(f"<message xmlns='{CLIENT}' to='bob@a.test'><body>"
                             + "x" * 250000 + "</body></message>")
            msg = await asyncio.wait_for(alice.ws.receive(), 5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR), msg
            # The server sends 1009, but it hangs up with the rest of our message unread, so
            # the kernel may reset the connection before the close frame is read here (1006).
            assert alice.ws.close_code in (1009, 1006)
            for _ in range(50):  # the server logs it once its close handshake gives up
                if any("event=websocket-error" in r.getMessage()
                       and "code=1009" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("no event=websocket-error code=1009 in the log")
        finally:
            await alice.close()
        bob = await WSClient.connect(target)
        try:
            await bob.login("bob")
            await bob.send(f"<iq xmlns='{CLIENT}' type='get' id='p' to='a.test'>{PING}</iq>")
            reply = await bob.next()
            assert reply.get("type") == "result"
        finally:
            await bob.close()
    finally:
        await stop_server(running)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
