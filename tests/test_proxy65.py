"""SOCKS5 Bytestreams proxy (XEP-0065) at proxy.<domain>: disco and <streamhost/> (§6.3.1-2),
a file between two slixmpp clients (xep_0065) arriving byte-exact, activation only by the
initiator (§6.3.4), half-open and unactivated pairs closed at the timeout, bandwidth limits
measured, concurrency refused, backpressure (a reader that stops stops its writer), bad
SOCKS5 refused with the RFC 1928 reply code."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from server.config import ConfigErrors, load_config
from server.modules import config_sections
from server.modules.proxy65 import RateLimit, Socks5Error, check_request, parse_address, stream_hash
from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import RawClient, condition
from tests.test_service_hosts import two_in_process

NS = "http://jabber.org/protocol/bytestreams"
PROXY = "proxy.a.test"


def proxy_table(extra: str = "", listen: str = "127.0.0.1:0") -> str:
    return f'[proxy65]\nlisten = ["{listen}"]\n{extra}'


@pytest.fixture
async def proxy_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, proxy_table())
    try:
        yield running
    finally:
        await stop_server(running)


class Socks:
    """A raw SOCKS5 client of the proxy (RFC 1928, as XEP-0065 §5.3.2 uses it)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, running: RunningServer, digest: str,
                      expect: int = 0) -> Socks:
        host, port = running.address("proxy65")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x05\x01\x00")
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
        raw = digest.encode()
        writer.write(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + b"\x00\x00")
        head = await asyncio.wait_for(reader.readexactly(5), 5)
        bound = await reader.readexactly(head[4] + 2)
        assert head[1] == expect, f"SOCKS5 reply {head[1]}, expected {expect}"
        if expect == 0:
            assert bound == raw + b"\x00\x00"  # BND.ADDR: the hash given (§5.3.2)
        return cls(reader, writer)

    async def closed_within(self, seconds: float) -> bool:
        """True if the proxy closes this connection within `seconds`."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), seconds):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def receive(self, count: int, timeout: float = 30) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(count), timeout)

    def close(self) -> None:
        self.writer.close()


async def login(running: RunningServer, jid: str) -> RawClient:
    await running.add_user(jid)
    client = await running.raw_login(jid, resource="pc")
    return client


async def activate(client: RawClient, sid: str, target: str, to: str = PROXY) -> object:
    return await client.ask(f"<iq type='set' to='{to}' id='act'><query xmlns='{NS}' sid='{sid}'>"
                            f"<activate>{target}</activate></query></iq>", skip_others=True)


async def pair(running: RunningServer, alice: RawClient, bob: RawClient,
               sid: str) -> tuple[Socks, Socks]:
    """Target then initiator connect with the stream's hash; the initiator activates."""
    digest = stream_hash(sid, alice.jid, bob.jid)  # type: ignore[attr-defined]
    target = await Socks.connect(running, digest)
    initiator = await Socks.connect(running, digest)
    reply = await activate(alice, sid, bob.jid)  # type: ignore[attr-defined]
    assert reply.get("type") == "result", reply  # type: ignore[attr-defined]
    return initiator, target


# -- discovery ----------------------------------------------------------------------------------

async def test_disco_and_streamhost(proxy_server: RunningServer) -> None:
    alice = await login(proxy_server, "alice@a.test")
    items = await alice.ask("<iq type='get' to='a.test' id='i1'>"
                            "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
                            skip_others=True)
    assert PROXY in [i.get("jid") for i in
                     items.iter("{http://jabber.org/protocol/disco#items}item")]
    info = await alice.ask(f"<iq type='get' to='{PROXY}' id='i2'>"
                           "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
                           skip_others=True)
    identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None
    assert (identity.get("category"), identity.get("type")) == ("proxy", "bytestreams")
    assert NS in {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    host, port = proxy_server.address("proxy65")
    assert await streamhost_of(alice) == {"jid": PROXY, "host": host, "port": str(port)}
    # b.test has its own.
    assert (await streamhost_of(alice, "proxy.b.test"))["jid"] == "proxy.b.test"


async def streamhost_of(client: RawClient, to: str = PROXY) -> dict[str, str]:
    reply = await client.ask(f"<iq type='get' to='{to}' id='s'><query xmlns='{NS}'/></iq>",
                             skip_others=True)
    streamhost = reply.find(f".//{{{NS}}}streamhost")
    assert streamhost is not None, etree.tostring(reply)
    return dict(streamhost.attrib)


@pytest.mark.parametrize(("table", "c2s", "expected"), [
    # A wildcard listener: where clients reach this host (the c2s listener's address).
    (proxy_table(listen="0.0.0.0:0"), "127.0.0.1", ("127.0.0.1", None)),
    # Client listeners on every address too: the service's domain, which must resolve here.
    (proxy_table(listen="0.0.0.0:0"), "0.0.0.0", (PROXY, None)),
    (proxy_table('host = "files.example.org"\nport = 7777\n'), "127.0.0.1",
     ("files.example.org", "7777")),
])
async def test_advertised_address(tmp_path: Path, table: str, c2s: str,
                                  expected: tuple[str, str | None]) -> None:
    running = await start_server(tmp_path, table, host=c2s)
    try:
        alice = await login(running, "alice@a.test")
        streamhost = await streamhost_of(alice)
        port = expected[1] or str(running.address("proxy65")[1])
        assert (streamhost["host"], streamhost["port"]) == (expected[0], port)
    finally:
        await stop_server(running)


# -- a file between two slixmpp clients ---------------------------------------------------------

@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:0"])
async def test_slixmpp_file_transfer_is_byte_exact(tmp_path: Path, listen: str) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path, proxy_table(listen=listen))
    try:
        await _transfer(running)
    finally:
        await stop_server(running)


async def _transfer(proxy_server: RunningServer) -> None:
    await proxy_server.add_user("alice@a.test")
    await proxy_server.add_user("bob@a.test")
    plugins = ("xep_0030", "xep_0065")
    alice = await proxy_server.client("alice@a.test", plugins=plugins)
    bob = await proxy_server.client("bob@a.test", plugins=plugins)
    bob.plugin["xep_0065"].auto_accept = True
    data = os.urandom(3 * 1024 * 1024 + 17)
    received = bytearray()
    got_all = asyncio.get_running_loop().create_future()
    back: asyncio.Queue[bytes] = asyncio.Queue()

    def bob_data(chunk: bytes) -> None:
        received.extend(chunk)
        if len(received) >= len(data) and not got_all.done():
            got_all.set_result(None)

    bob.add_event_handler("socks5_data", bob_data)
    alice.add_event_handler("socks5_data", back.put_nowait)
    sock = await asyncio.wait_for(alice.plugin["xep_0065"].handshake(bob.boundjid), 20)
    assert sock is not None
    assert list(alice.plugin["xep_0065"]._proxies) == [PROXY]
    for start in range(0, len(data), 65536):
        await sock.write(data[start:start + 65536])
    await asyncio.wait_for(got_all, 30)
    assert bytes(received) == data
    # And back the other way, on the same bytestream.
    (bob_sock,) = bob.plugin["xep_0065"]._sessions.values()
    await bob_sock.write(b"thanks")
    assert await asyncio.wait_for(back.get(), 10) == b"thanks"
    sock.transport.close()


# -- activation: the initiator only -------------------------------------------------------------

async def test_only_the_initiator_activates(proxy_server: RunningServer) -> None:
    alice = await login(proxy_server, "alice@a.test")
    bob = await login(proxy_server, "bob@a.test")
    mallory = await login(proxy_server, "mallory@a.test")
    sid = "s1"
    digest = stream_hash(sid, alice.jid, bob.jid)  # type: ignore[attr-defined]
    target = await Socks.connect(proxy_server, digest)
    # One party connected: not-allowed (§6.3.4).
    assert condition(await activate(alice, sid, bob.jid)) == "not-allowed"  # type: ignore[arg-type, attr-defined]
    initiator = await Socks.connect(proxy_server, digest)
    # A third connection with the same hash is refused (§9.1: no multicasting).
    await Socks.connect(proxy_server, digest, expect=2)
    # Strangers (another user, the target itself) name no pair of theirs: item-not-found.
    for stranger in (mallory, bob):
        reply = await activate(stranger, sid, bob.jid)  # type: ignore[attr-defined]
        assert condition(reply) == "item-not-found"  # type: ignore[arg-type]
    reply = await activate(mallory, sid, alice.jid)  # type: ignore[attr-defined]
    assert condition(reply) == "item-not-found"  # type: ignore[arg-type]
    # Nothing is relayed before activation (bytes sent early wait, §9.1).
    initiator.writer.write(b"early ")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(target.reader.read(1), 0.3)
    reply = await activate(alice, sid, bob.jid)  # type: ignore[attr-defined]
    assert reply.get("type") == "result"  # type: ignore[attr-defined]
    initiator.writer.write(b"bytes")
    assert await target.receive(11) == b"early bytes"
    target.writer.write(b"reply")
    assert await initiator.receive(5) == b"reply"
    assert condition(await activate(alice, sid, bob.jid)) == "not-allowed"  # type: ignore[arg-type, attr-defined]
    # Half-close: the initiator is done sending, the target can still answer.
    initiator.writer.write_eof()
    assert await target.reader.read() == b""
    target.writer.write(b"last")
    target.writer.write_eof()
    assert await initiator.reader.read() == b"last"
    for bad, expected in [(f"<query xmlns='{NS}'><activate>{bob.jid}</activate></query>",  # type: ignore[attr-defined]
                           "bad-request"),
                          (f"<query xmlns='{NS}' sid='x'/>", "bad-request"),
                          (f"<query xmlns='{NS}' sid='x'><activate>@@</activate></query>",
                           "jid-malformed")]:
        reply = await alice.ask(f"<iq type='set' to='{PROXY}' id='b'>{bad}</iq>",
                                skip_others=True)
        assert condition(reply) == expected, bad
    initiator.close()
    target.close()


async def test_users_of_other_servers_are_refused(tmp_path: Path) -> None:
    async with two_in_process(tmp_path, two_extra=proxy_table('allow = ["friend@one.test"]\n'),
                              two_names=("proxy.two.test",)) as (one, _two):
        mallory = await login(one, "mallory@one.test")
        friend = await login(one, "friend@one.test")
        query = f"<iq type='get' to='proxy.two.test' id='s'><query xmlns='{NS}'/></iq>"
        assert condition(await mallory.ask(query, skip_others=True)) == "forbidden"
        reply = await activate(mallory, "s1", "bob@two.test/pc", to="proxy.two.test")
        assert condition(reply) == "forbidden"  # type: ignore[arg-type]
        reply = await friend.ask(query, skip_others=True)
        assert reply.find(f".//{{{NS}}}streamhost") is not None, reply


# -- timeouts and limits ------------------------------------------------------------------------

async def test_half_open_and_unactivated_pairs_are_closed(tmp_path: Path) -> None:
    running = await start_server(tmp_path, proxy_table("timeout = 1\n"))
    try:
        alice = await login(running, "alice@a.test")
        bob = await login(running, "bob@a.test")
        started = time.monotonic()
        half = await Socks.connect(running, stream_hash("h", alice.jid, bob.jid))  # type: ignore[attr-defined]
        digest = stream_hash("u", alice.jid, bob.jid)  # type: ignore[attr-defined]
        both = [await Socks.connect(running, digest), await Socks.connect(running, digest)]
        assert not await half.closed_within(0.5)
        assert await half.closed_within(3)
        assert all([await conn.closed_within(1) for conn in both])
        assert 0.9 <= time.monotonic() - started < 4
        # The pair is gone: activating it now finds nothing.
        assert condition(await activate(alice, "u", bob.jid)) == "item-not-found"  # type: ignore[arg-type, attr-defined]
        # A connection that never speaks SOCKS5 is closed at the timeout too.
        host, port = running.address("proxy65")
        reader, writer = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
    finally:
        await stop_server(running)


async def _send_and_time(initiator: Socks, target: Socks, size: int) -> float:
    data = os.urandom(size)
    started = time.monotonic()
    initiator.writer.write(data)
    assert await target.receive(size, timeout=60) == data
    return time.monotonic() - started


async def test_bandwidth_per_transfer(tmp_path: Path) -> None:
    rate = 200_000
    running = await start_server(tmp_path, proxy_table(f"rate_per_transfer = {rate}\n"))
    try:
        alice = await login(running, "alice@a.test")
        bob = await login(running, "bob@a.test")
        initiator, target = await pair(running, alice, bob, "r1")
        size = 500_000
        elapsed = await _send_and_time(initiator, target, size)
        # At most one burst (RateLimit.burst) beyond the rate.
        assert elapsed >= (size - min(rate, 65536)) / rate * 0.95, elapsed
        # The other direction has its own limit, just as measured.
        started = time.monotonic()
        target.writer.write(b"x" * size)
        await initiator.receive(size, timeout=60)
        assert time.monotonic() - started >= (size - 65536) / rate * 0.95
    finally:
        await stop_server(running)


async def test_bandwidth_total_and_max_transfers(tmp_path: Path) -> None:
    rate = 200_000
    running = await start_server(tmp_path, proxy_table(
        f"rate_total = {rate}\nmax_transfers = 2\n"))
    try:
        alice = await login(running, "alice@a.test")
        bob = await login(running, "bob@a.test")
        one = await pair(running, alice, bob, "t1")
        two = await pair(running, alice, bob, "t2")
        # A third transfer is refused while two are under way (RFC 1928 reply 2).
        refused = await Socks.connect(running, stream_hash("t3", alice.jid, bob.jid),  # type: ignore[attr-defined]
                                      expect=2)
        assert await refused.closed_within(2)
        size = 250_000
        started = time.monotonic()
        await asyncio.gather(_send_and_time(*one, size), _send_and_time(*two, size))
        elapsed = time.monotonic() - started
        assert elapsed >= (2 * size - 65536) / rate * 0.95, elapsed
        # When one ends, there is room again.
        one[0].close()
        one[1].close()
        assert await one[1].closed_within(2)
        for _ in range(50):
            if len(running.server.modules["proxy65"]._pairs) < 2:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        third = await Socks.connect(running, stream_hash("t3", alice.jid, bob.jid))  # type: ignore[attr-defined]
        third.close()
    finally:
        await stop_server(running)


async def test_a_reader_that_stops_stops_its_writer(proxy_server: RunningServer) -> None:
    """Backpressure: with a target that reads nothing, the initiator can push only what the
    socket buffers on the way hold, never the whole file into the proxy's memory."""
    alice = await login(proxy_server, "alice@a.test")
    bob = await login(proxy_server, "bob@a.test")
    initiator, target = await pair(proxy_server, alice, bob, "b1")
    total = 96 * 1024 * 1024
    chunk = bytes(range(256)) * 256  # 64 KiB
    pushed = 0
    with pytest.raises(TimeoutError):
        while pushed < total:
            initiator.writer.write(chunk)
            await asyncio.wait_for(initiator.writer.drain(), 1.5)
            pushed += len(chunk)
    assert pushed < 40 * 1024 * 1024, pushed
    # Once the target reads, everything arrives, in order.
    got = 0
    while got < pushed:
        data = await asyncio.wait_for(target.reader.read(1 << 20), 10)
        assert data
        assert all(data[i] == (got + i) % 256 for i in range(0, len(data), 4099))
        got += len(data)
    initiator.close()
    target.close()


# -- SOCKS5 that is not what XEP-0065 uses ------------------------------------------------------

@pytest.mark.parametrize(("request_bytes", "code"), [
    (b"\x05\x02\x00\x03\x28" + b"0" * 40 + b"\0\0", 7),        # BIND: command not supported
    (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90", 8),           # an IPv4 address
    (b"\x05\x01\x00\x03\x05hello\0\0", 8),                      # not a SHA-1 hash
])
async def test_bad_requests_get_their_reply_code(proxy_server: RunningServer,
                                                 request_bytes: bytes, code: int) -> None:
    host, port = proxy_server.address("proxy65")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(request_bytes)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer[:2] == bytes([5, code]), answer
    writer.close()


async def test_other_protocols_are_closed(proxy_server: RunningServer) -> None:
    host, port = proxy_server.address("proxy65")
    for greeting, answer in [(b"GET / HTTP/1.0\r\n\r\n", b""),   # not SOCKS5: closed, no reply
                             (b"\x05\x01\x02", b"\x05\xff")]:    # username/password only
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(greeting)
        assert await asyncio.wait_for(reader.read(), 5) == answer
        writer.close()


def test_parse_request_and_rate_limit_units() -> None:
    digest = stream_hash("sid", "a@x/1", "b@y/2")
    check_request(b"\x05\x01\x00\x03")
    assert parse_address(b"\x28" + digest.encode() + b"\0\0") == digest
    for head, code in [(b"\x05\x01\x00\x04", 8), (b"\x05\x03\x00\x03", 7),
                       (b"\x04\x01\x00\x03", 1)]:
        with pytest.raises(Socks5Error) as info:
            check_request(head)
        assert info.value.reply == code
    for rest in (b"\x28" + digest.upper().encode() + b"\0\0", b"\x29" + digest.encode() + b"0\0\0",
                 b"\x28" + digest.encode() + b"\0"):
        with pytest.raises(Socks5Error) as info:
            parse_address(rest)
        assert info.value.reply == 8
    assert RateLimit(0).chunk() == 65536 and RateLimit(8000).chunk() == 1024


def test_proxy_is_off_by_default_and_settings_are_checked(tmp_path: Path) -> None:
    settings = load_config(None).section("proxy65")
    assert (settings.enabled, settings.listen) == (False, ())
    path = tmp_path / "presenced.toml"
    path.write_text('[proxy65]\nenabled = true\n')
    with pytest.raises(ConfigErrors) as info:
        load_config(path, config_sections())
    assert [e.key for e in info.value.errors] == ["proxy65.listen"]
    path.write_text('[proxy65]\nlisten = ["127.0.0.1:7777"]\nallow = ["a@b/c"]\n')
    with pytest.raises(ConfigErrors) as info:
        load_config(path, config_sections())
    assert [e.key for e in info.value.errors] == ["proxy65.allow"]
    path.write_text('[proxy65]\nlisten = ["127.0.0.1:7777"]\n')
    config = load_config(path, config_sections())
    assert config.section("proxy65").enabled and "proxy.localhost" in config.service_domains
