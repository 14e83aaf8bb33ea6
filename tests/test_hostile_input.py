"""Hostile and odd numbers from the wire (issue 20 item 1), over real sockets: a stream header's
version, SASL2 <fast count/>, XEP-0198 'h', BOSH rid/wait/hold/pause, RSM <max/>, presence
priority. Each one gets the error the protocol names (a stream error before authentication,
a SASL failure, a BOSH terminate, an iq error), the server log has one line and no traceback,
and another client is still served.

The hostile set: '²' (str.isdigit() says yes, int() says no), 5,000 digits (int() refuses past
4,300), a negative number, an empty value, Arabic-Indic digits (int() accepts them)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from lxml import etree

from server.stream import sasl2
from server.xml import ns
from tests import test_http
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import STREAMS, RawClient, condition, header, insecure_context
from tests.test_http import (
    FRAMING,
    HTTPBIND,
    STREAM_ERRORS,
    XBOSH,
    BoshClient,
    WSClient,
    url,
)

HOSTILE = ["²", "9" * 5000, "-1", "", "١٢"]
VERSIONS = ["².0", "1.²", "9" * 5000 + ".0", "١.0", "", "x.0", "-1.0", "1.-0", "2.0", "0.9"]


web_server = test_http.web_server  # the fixture, for pytest to find here


@pytest.fixture
def web(web_server: RunningServer) -> RunningServer:
    """test_http's server: HTTPS (WebSocket, BOSH), c2s, alice and bob."""
    return web_server


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The server's log; at the end of the test it must hold no traceback and no error."""
    caplog.set_level(logging.INFO, logger="presenced")
    yield caplog
    bad = [r for r in caplog.records  # asyncio's "data_received() call failed" counts too
           if not r.name.startswith("slixmpp") and (r.exc_info or r.levelno >= logging.ERROR)]
    assert not bad, [r.getMessage() for r in bad]


async def still_served(running: RunningServer) -> None:
    """Another client logs in and gets a ping answered."""
    other = await running.raw()
    await other.login("a.test", "bob", PASSWORD, "check")
    reply = await other.ask("<iq type='get' id='alive' to='a.test'>"
                            "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
    assert reply.get("type") == "result"
    await other.close()


def lines(log: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in log.records if f"event={event}" in r.getMessage()]


# -- the stream header's version (RFC 6120 §4.7.5, §4.9.3.25), before authentication ----------

@pytest.mark.parametrize("direct_tls", [False, True], ids=["tcp", "tls"])
async def test_bad_stream_version_is_unsupported_version(web: RunningServer, direct_tls: bool,
                                                         log: pytest.LogCaptureFixture) -> None:
    for version in VERSIONS:
        client = await web.raw(direct_tls=direct_tls)
        await client.send(header("a.test", version=version))
        assert await client.stream_error() == "unsupported-version", version
        await client.wait_closed()
    errors = lines(log, "stream-error")
    assert len(errors) == len(VERSIONS) and all("unsupported-version" in e for e in errors)
    # Leading zeros are ignored, a higher minor version is spoken (RFC 6120 §4.7.5).
    for version in ("01.0", "1.5"):
        client = await web.raw(direct_tls=direct_tls)
        await client.send(header("a.test", version=version))
        features = await client.expect(f"{{{STREAMS}}}features")
        assert features is not None and client.stream_attrs.get("version") == "1.0"
        await client.close()
    await still_served(web)


async def test_bad_s2s_stream_version(tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    """The same on an inbound s2s stream (federation/negotiation.py uses the same check)."""
    running = await start_server(tmp_path, s2s="127.0.0.1:0")
    try:
        host, port = running.address("s2s")
        for version in ("².0", "9" * 5000 + ".0"):
            client = await RawClient.connect(host, port)
            await client.send(header("a.test", version=version, xmlns="jabber:server",
                                     extra=" from='remote.example'"))
            assert await client.stream_error() == "unsupported-version"
            await client.wait_closed()
        await running.add_user("bob@a.test")
        await still_served(running)
    finally:
        await stop_server(running)


async def test_bad_websocket_open_version(web: RunningServer, log: pytest.LogCaptureFixture) -> None:
    for version in ("².0", "9" * 5000 + ".0", "2.0"):
        ws = await WSClient.connect(url(web, "/xmpp-websocket", "wss"))
        try:
            await ws.send(f"<open xmlns='{FRAMING}' to='a.test' version='{version}'/>")
            opened = await ws.next()
            assert opened.tag == f"{{{FRAMING}}}open"
            await ws.expect_stream_error("unsupported-version")
        finally:
            await ws.close()
    assert len(lines(log, "stream-error")) == 3
    ws = await WSClient.connect(url(web, "/xmpp-websocket", "wss"))
    try:
        assert await ws.login("alice") == "alice@a.test/ws"
    finally:
        await ws.close()
    await still_served(web)


# -- SASL2 <fast count/> (XEP-0484 §3.4), before authentication ------------------------------

async def test_sasl2_fast_count_is_malformed_request(web: RunningServer,
                                                     log: pytest.LogCaptureFixture) -> None:
    from tests.test_sasl2 import secure
    for count in ("²", "9" * 5000, "-1"):
        client = await web.raw()
        features = await secure(client)
        assert features.find(f"{{{sasl2.SASL2}}}authentication") is not None
        token = base64.b64encode(b"alice\0" + b"x" * 32).decode()
        await client.send(
            f"<authenticate xmlns='{sasl2.SASL2}' mechanism='HT-SHA-256-NONE'>"
            f"<initial-response>{token}</initial-response>"
            f"<user-agent id='d4565fa7-4d72-4749-b3d3-740edbf87770'/>"
            f"<fast xmlns='{sasl2.FAST}' count='{count}'/></authenticate>")
        failure = await client.expect(f"{{{sasl2.SASL2}}}failure")
        assert failure.find(f"{{{ns.SASL}}}malformed-request") is not None, etree.tostring(failure)
        await client.close()
    await still_served(web)


# -- XEP-0198 'h' -----------------------------------------------------------------------------

async def test_stream_management_bad_h(web: RunningServer, log: pytest.LogCaptureFixture) -> None:
    for h in ("²", "9" * 5000, "-1"):
        client = await web.raw()
        await client.login("a.test", "alice", PASSWORD, f"sm{len(h)}")
        await client.send("<enable xmlns='urn:xmpp:sm:3'/>")
        await client.expect("{urn:xmpp:sm:3}enabled")
        await client.send(f"<a xmlns='urn:xmpp:sm:3' h='{h}'/>")
        # XEP-0198 §4: an 'h' that is not a count of what we sent ends the stream.
        assert await client.stream_error() in ("undefined-condition", "bad-format",
                                               "invalid-xml", "policy-violation")
    await still_served(web)


# -- RSM <max/> and presence priority --------------------------------------------------------

async def test_mam_max_and_priority(web: RunningServer, log: pytest.LogCaptureFixture) -> None:
    client = await web.raw()
    await client.login("a.test", "alice", PASSWORD)
    for value in HOSTILE:
        reply = await client.ask(
            f"<iq type='set' id='q'><query xmlns='urn:xmpp:mam:2'>"
            f"<set xmlns='http://jabber.org/protocol/rsm'><max>{value}</max></set>"
            f"</query></iq>", skip_others=True)
        assert condition(reply) == "bad-request", value
    for value in ("²", "9" * 5000, "١٢", "128", "+-5"):  # RFC 6121 §4.7.2.3: -128 to 127
        await client.send(f"<presence id='p'><priority>{value}</priority></presence>")
        reply = await client.next_of("presence")
        assert reply.get("type") == "error" and condition(reply) == "bad-request", value
    await client.close()
    await still_served(web)


# -- BOSH numbers (XEP-0124 §7.1, §10, §14.1) ------------------------------------------------

async def post_raw(running: RunningServer, data: bytes | str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.post(
            url(running, "/http-bind"), data=data, ssl=insecure_context(),
            headers={"Content-Type": "text/xml; charset=utf-8"}) as response:
        return response.status, await response.read()


@pytest.mark.parametrize("name", ["rid", "wait", "hold"])
async def test_bosh_bad_numbers_at_creation(web: RunningServer, name: str,
                                            log: pytest.LogCaptureFixture) -> None:
    for value in HOSTILE:
        attrs = {"rid": "1000", "wait": "5", "hold": "1"} | {name: value}
        text = " ".join(f"{k}='{v}'" for k, v in attrs.items())
        status, raw = await post_raw(web, f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' "
                                          f"to='a.test' xmpp:version='1.0' {text}/>")
        assert status == 200
        body = etree.fromstring(raw)
        assert (body.get("type"), body.get("condition")) == ("terminate", "bad-request"), value
    assert not any(c.kind == "bosh" for c in web.server.connections)
    await still_served(web)


async def test_bosh_bad_pause_and_version(web: RunningServer,
                                          log: pytest.LogCaptureFixture) -> None:
    client = BoshClient(url(web, "/http-bind"))
    try:
        await client.login("alice")
        body = await client.post(attrs=" pause='²'")
        assert (body.get("type"), body.get("condition")) == ("terminate", "bad-request")
    finally:
        await client.close()
    client = BoshClient(url(web, "/http-bind"))
    try:
        body = await client.post(attrs=" to='a.test' wait='5' hold='1' xmpp:version='².0'")
        assert body.get("type") == "terminate"
        assert body.find(f"{{{STREAMS}}}error/{{{STREAM_ERRORS}}}unsupported-version") is not None
    finally:
        await client.close()
    await still_served(web)


# -- BOSH bodies (XEP-0124 §17.2, XEP-0206 §5) -------------------------------------------------

async def raw_http(running: RunningServer, parts: list[bytes], pause: float = 0.3) -> bytes:
    """An HTTP/1.1 request sent in several TCP segments; the whole response."""
    host, port = running.address("https")
    reader, writer = await asyncio.open_connection(host, port, ssl=insecure_context(),
                                                   server_hostname="a.test")
    try:
        for index, part in enumerate(parts):
            if index:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def http_body(response: bytes) -> etree._Element:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_text, _, rest = rest.partition(b"\r\n")
            size = int(size_text, 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return etree.fromstring(body)


async def test_bosh_body_in_two_segments(web: RunningServer) -> None:
    body = (f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='500' to='a.test' wait='5' "
            "hold='1' ver='1.11' xmpp:version='1.0'/>").encode()
    head = (f"POST /http-bind HTTP/1.1\r\nHost: a.test\r\nContent-Type: text/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    created = http_body(await raw_http(web, [head + body[:40], body[40:]]))
    assert created.get("type") is None and created.get("sid"), etree.tostring(created)
    # XEP-0206 §5: we understand xmpp:restart, and say so.
    assert created.get(f"{{{XBOSH}}}restartlogic") == "true"
    assert created.find(f"{{{STREAMS}}}features") is not None


async def test_bosh_chunked_bodies(web: RunningServer, log: pytest.LogCaptureFixture) -> None:
    body = (f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='600' to='a.test' wait='5' "
            "hold='1' ver='1.11' xmpp:version='1.0'/>").encode()
    head = (b"POST /http-bind HTTP/1.1\r\nHost: a.test\r\nContent-Type: text/xml\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"
    created = http_body(await raw_http(web, [head + chunk(body[:30]), chunk(body[30:]) + chunk(b"")]))
    assert created.get("sid") and created.get("type") is None, etree.tostring(created)
    # Over MAX_BODY (1 MiB) in chunks: policy-violation, not bad-request.
    big = b"<body xmlns='" + HTTPBIND.encode() + b"' rid='1'>" + b" " * (1 << 20) + b"</body>"
    parts = [head] + [chunk(big[i:i + 65536]) for i in range(0, len(big), 65536)] + [chunk(b"")]
    refused = http_body(await raw_http(web, parts, pause=0))
    assert (refused.get("type"), refused.get("condition")) == ("terminate", "policy-violation")
    await still_served(web)


# -- one page limit for every archive (XEP-0313 with XEP-0059) -------------------------------

async def test_one_archive_page_limit(tmp_path: Path, log: pytest.LogCaptureFixture) -> None:
    """[mam] max_page (default 250) is the page limit of a user's archive and, through
    archive_query.max_page, of a room's."""
    from server.config import load_config
    from server.modules import archive_query
    from tests.conftest import write_config
    assert archive_query.max_page(load_config(write_config(tmp_path / "d"))) == 250
    assert archive_query.max_page(load_config(
        write_config(tmp_path / "c", "[mam]\nmax_page = 300\n"))) == 300
    running = await start_server(tmp_path / "s")
    try:
        await running.add_user("alice@a.test")
        client = await running.raw()
        await client.login("a.test", "alice", PASSWORD)
        for asked, expected in (("250", "result"), ("251", "policy-violation")):
            reply = await client.ask(
                f"<iq type='set' id='q{asked}'><query xmlns='urn:xmpp:mam:2'>"
                f"<set xmlns='http://jabber.org/protocol/rsm'><max>{asked}</max></set>"
                f"</query></iq>", skip_others=True)
            got = "result" if reply.get("type") == "result" else condition(reply)
            assert got == expected, asked
        await client.close()
    finally:
        await stop_server(running)
