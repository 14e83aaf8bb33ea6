"""The HTTP server: host-meta (XEP-0156), XMPP over WebSocket (RFC 7395), file upload
(XEP-0363), /metrics. Real sockets: aiohttp's client sends raw WebSocket frames; slixmpp is the
TCP user at the other end."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lxml import etree

from server.app import Server
from server.config import load_config
from tests.conftest import PASSWORD, RunningServer, stop_server, write_config
from tests.rawclient import insecure_context

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
STREAMS = "http://etherx.jabber.org/streams"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
CLIENT = "jabber:client"
XRD = "http://docs.oasis-open.org/ns/xri/xrd-1.0"


async def start_web(tmp: Path, extra: str = "", *, https: bool = True, http: bool = False,
                    top: str = "") -> RunningServer:
    """A server with an HTTPS (and optionally a plain HTTP) listener on a free port."""
    path = write_config(tmp, extra, top)
    listeners = ["https = []"] if not https else []
    if https:
        listeners.append('https = ["127.0.0.1:0"]')
    if http:
        listeners.append('http = ["127.0.0.1:0"]')
    text = path.read_text().replace("https = []", "\n".join(listeners), 1)
    path.write_text(text)
    server = Server(load_config(path))
    await server.start()
    return RunningServer(server, tmp / "data", path)


@pytest.fixture
async def web_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_web(tmp_path, '[http]\ncors_origins = ["https://chat.example"]\n')
    await running.add_user("alice@a.test")
    await running.add_user("bob@a.test")
    try:
        yield running
    finally:
        await stop_server(running)


def url(running: RunningServer, path: str, kind: str = "https") -> str:
    """kind: https, http, wss (the https listener) or ws (the http one)."""
    host, port = running.address({"wss": "https", "ws": "http"}.get(kind, kind))
    return f"{kind}://{host}:{port}{path}"


class WSClient:
    """A WebSocket XMPP client at the frame level: every message is checked to be one whole
    XML element on its own."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.session = session
        self.ws = ws
        self.messages: list[str] = []

    @classmethod
    async def connect(cls, target: str, *, protocols: tuple[str, ...] = ("xmpp",),
                      headers: dict[str, str] | None = None) -> WSClient:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(target, protocols=protocols, ssl=insecure_context(),
                                          headers=headers or {})
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def next(self, timeout: float = 5.0) -> etree._Element:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        self.messages.append(msg.data)
        return etree.fromstring(msg.data.encode())  # one complete element, or this raises

    async def open(self, to: str = "a.test") -> etree._Element:
        await self.send(f"<open xmlns='{FRAMING}' to='{to}' version='1.0'/>")
        opened = await self.next()
        assert opened.tag == f"{{{FRAMING}}}open", opened.tag
        return opened

    async def login(self, user: str, domain: str = "a.test", resource: str = "ws",
                    password: str = PASSWORD) -> str:
        await self.open(domain)
        features = await self.next()
        assert features.tag == f"{{{STREAMS}}}features"
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        success = await self.next()
        assert success.tag == f"{{{SASL}}}success", etree.tostring(success)
        await self.open(domain)
        features = await self.next()
        assert features.find(f"{{{BIND}}}bind") is not None
        await self.send(f"<iq xmlns='{CLIENT}' type='set' id='b1'><bind xmlns='{BIND}'>"
                        f"<resource>{resource}</resource></bind></iq>")
        bound = await self.next()
        jid = bound.findtext(f"{{{BIND}}}bind/{{{BIND}}}jid")
        assert jid == f"{user}@{domain}/{resource}", etree.tostring(bound)
        return jid

    async def expect_stream_error(self, condition: str) -> None:
        error = await self.next()
        assert error.tag == f"{{{STREAMS}}}error", etree.tostring(error)
        assert error[0].tag == f"{{{STREAM_ERRORS}}}{condition}", etree.tostring(error)
        close = await self.next()
        assert close.tag == f"{{{FRAMING}}}close"
        await self.expect_closed()

    async def expect_closed(self, timeout: float = 5.0) -> None:
        """The server closes the WebSocket (we answer its <close/> with ours, RFC 7395 §3.6)."""
        await self.send(f"<close xmlns='{FRAMING}'/>")
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING):
                return
            assert msg.type is not aiohttp.WSMsgType.TEXT, msg.data

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[WSClient]]:
    made: list[WSClient] = []
    try:
        yield made
    finally:
        for client in made:
            await client.close()


async def fetch(target: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.request(
            kwargs.pop("method", "GET"), target, ssl=insecure_context(), **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


# -- the HTTP server itself -------------------------------------------------------------------


async def test_off_without_listeners(tmp_path: Path) -> None:
    running = await start_web(tmp_path, https=False)
    try:
        assert not [k for k, _h, _p in running.server.bound_addresses() if k.startswith("http")]
    finally:
        await stop_server(running)


async def test_https_serves_the_configured_certificate_by_sni(tmp_path: Path) -> None:
    from server.certs import generate_self_signed
    cert, key = tmp_path / "b.pem", tmp_path / "b.key"
    generate_self_signed(["b.test"], cert, key)
    running = await start_web(tmp_path, f'[tls.domain_certificates]\n"b.test" = ["{cert}", "{key}"]\n')
    try:
        host, port = running.address("https")
        for name, expected in (("b.test", "b.test"), ("a.test", "a.test")):
            ctx = insecure_context()
            _reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                           server_hostname=name)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            from cryptography import x509
            leaf = x509.load_der_x509_certificate(der)
            names = leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
            assert expected in names
            assert (expected == "b.test") == (names == ["b.test"])
    finally:
        await stop_server(running)


async def test_unknown_path_is_404(web_server: RunningServer) -> None:
    status, _h, _b = await fetch(url(web_server, "/nothing-here"))
    assert status == 404


# -- XEP-0156 host-meta -------------------------------------------------------------------------


async def test_host_meta_lists_the_websocket_endpoint(web_server: RunningServer) -> None:
    host, port = web_server.address("https")
    status, headers, body = await fetch(url(web_server, "/.well-known/host-meta"))
    assert status == 200
    assert headers["Content-Type"].startswith("application/xrd+xml")
    assert headers["Access-Control-Allow-Origin"] == "*"
    xrd = etree.fromstring(body)
    links = {link.get("rel"): link.get("href") for link in xrd.iter(f"{{{XRD}}}Link")}
    assert links["urn:xmpp:alt-connections:websocket"] == f"wss://{host}:{port}/xmpp-websocket"
    assert links["urn:xmpp:alt-connections:xbosh"] == f"https://{host}:{port}/http-bind"
    status, headers, body = await fetch(url(web_server, "/.well-known/host-meta.json"))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    links = {link["rel"]: link["href"] for link in json.loads(body)["links"]}
    assert links["urn:xmpp:alt-connections:websocket"] == f"wss://{host}:{port}/xmpp-websocket"


async def test_host_meta_uses_external_url(tmp_path: Path) -> None:
    running = await start_web(tmp_path, '[http]\nexternal_url = "https://chat.example.org/xmpp/"\n')
    try:
        _s, _h, body = await fetch(url(running, "/.well-known/host-meta.json"))
        links = {link["rel"]: link["href"] for link in json.loads(body)["links"]}
        assert links["urn:xmpp:alt-connections:websocket"] == \
            "wss://chat.example.org/xmpp/xmpp-websocket"
    finally:
        await stop_server(running)


# -- RFC 7395 -----------------------------------------------------------------------------------


async def test_websocket_login_and_chat_with_a_tcp_user(web_server: RunningServer,
                                                        clients: list[WSClient]) -> None:
    bob = await web_server.client("bob@a.test")
    got: asyncio.Queue[Any] = asyncio.Queue()
    bob.add_event_handler("message", got.put_nowait)
    alice = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(alice)
    assert alice.ws.protocol == "xmpp"
    await alice.send(f"<open xmlns='{FRAMING}' to='a.test' version='1.0' xml:lang='en'/>")
    opened = await alice.next()
    assert opened.tag == f"{{{FRAMING}}}open"
    assert opened.get("from") == "a.test" and opened.get("version") == "1.0"
    assert opened.get("id")
    features = await alice.next()
    # TLS is the HTTPS listener's: no STARTTLS, SASL at once.
    assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is None
    mechanisms = [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
    assert "PLAIN" in mechanisms and "SCRAM-SHA-256" in mechanisms
    token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    await alice.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
    assert (await alice.next()).tag == f"{{{SASL}}}success"
    await alice.open()
    await alice.next()  # features: bind
    await alice.send(f"<iq xmlns='{CLIENT}' type='set' id='b1'><bind xmlns='{BIND}'>"
                     "<resource>web</resource></bind></iq>")
    bound = await alice.next()
    assert bound.findtext(f"{{{BIND}}}bind/{{{BIND}}}jid") == "alice@a.test/web"
    await alice.send(f"<message xmlns='{CLIENT}' to='bob@a.test' type='chat'>"
                     "<body>hello over websocket</body></message>")
    msg = await asyncio.wait_for(got.get(), 5)
    assert msg["body"] == "hello over websocket"
    assert str(msg["from"]) == "alice@a.test/web"
    bob.send_message(mto="alice@a.test/web", mbody="hello back", mtype="chat")
    reply = await alice.next()
    assert reply.tag == f"{{{CLIENT}}}message"
    assert reply.findtext(f"{{{CLIENT}}}body") == "hello back"
    assert reply.get("from") == "bob@a.test/slix"
    # Every message was one element with its namespaces declared (parsed alone above).
    await alice.send(f"<close xmlns='{FRAMING}'/>")
    close = await alice.next()
    assert close.tag == f"{{{FRAMING}}}close"


async def test_scram_login_over_websocket(web_server: RunningServer,
                                          clients: list[WSClient]) -> None:
    import scramp
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.open()
    await client.next()
    scram = scramp.ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
    first = base64.b64encode(scram.get_client_first().encode()).decode()
    await client.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>")
    challenge = await client.next()
    scram.set_server_first(base64.b64decode(challenge.text or "").decode())
    final = base64.b64encode(scram.get_client_final().encode()).decode()
    await client.send(f"<response xmlns='{SASL}'>{final}</response>")
    success = await client.next()
    assert success.tag == f"{{{SASL}}}success"
    scram.set_server_final(base64.b64decode(success.text or "").decode())


async def test_first_element_must_be_a_framing_open(web_server: RunningServer,
                                                    clients: list[WSClient]) -> None:
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.send(f"<stream:stream xmlns='{CLIENT}' xmlns:stream='{STREAMS}' to='a.test' "
                      "version='1.0'>")
    opened = await client.next()  # our header goes out before the error (RFC 6120 §4.9.1.2)
    assert opened.tag == f"{{{FRAMING}}}open"
    await client.expect_stream_error("invalid-namespace")


async def test_open_in_another_namespace(web_server: RunningServer,
                                         clients: list[WSClient]) -> None:
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.send("<open xmlns='urn:example:wrong' to='a.test' version='1.0'/>")
    await client.next()
    await client.expect_stream_error("invalid-namespace")


@pytest.mark.parametrize("bad", [
    "<message xmlns='jabber:client'><body>half an element",
    "<message xmlns='jabber:client'></presence>",
    "not xml at all",
])
async def test_bad_xml_in_a_message(web_server: RunningServer, clients: list[WSClient],
                                    bad: str) -> None:
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.open()
    await client.next()
    await client.send(bad)
    await client.expect_stream_error("not-well-formed")


async def test_two_elements_in_one_message(web_server: RunningServer,
                                           clients: list[WSClient]) -> None:
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.login("alice")
    await client.send(f"<iq xmlns='{CLIENT}' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>"
                      f"<iq xmlns='{CLIENT}' type='get' id='2'><ping xmlns='urn:xmpp:ping'/></iq>")
    # Both may be answered (they were read before the message was found to hold two).
    error = await client.next()
    while error.tag == f"{{{CLIENT}}}iq":
        error = await client.next()
    assert error.tag == f"{{{STREAMS}}}error"
    assert error[0].tag == f"{{{STREAM_ERRORS}}}not-well-formed"


async def test_restricted_xml_and_unknown_host(web_server: RunningServer,
                                               clients: list[WSClient]) -> None:
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.open()
    await client.next()
    await client.send("<!-- a comment -->")
    await client.expect_stream_error("restricted-xml")
    other = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(other)
    await other.send(f"<open xmlns='{FRAMING}' to='elsewhere.test' version='1.0'/>")
    await other.next()
    await other.expect_stream_error("host-unknown")


async def test_too_large_stanza_is_a_stream_error(web_server: RunningServer,
                                                   clients: list[WSClient]) -> None:
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.login("alice")
    await client.send(f"<message xmlns='{CLIENT}' to='bob@a.test'><body>{'x' * 300000}"
                      "</body></message>")
    await client.expect_stream_error("policy-violation")


async def test_binary_message_is_refused(web_server: RunningServer,
                                         clients: list[WSClient]) -> None:
    client = await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"))
    clients.append(client)
    await client.open()
    await client.next()
    await client.ws.send_bytes(b"<presence xmlns='jabber:client'/>")
    await client.expect_stream_error("bad-format")


async def test_stanza_before_login_and_server_shutdown(tmp_path: Path) -> None:
    running = await start_web(tmp_path)
    await running.add_user("alice@a.test")
    client = await WSClient.connect(url(running, "/xmpp-websocket", "wss"))
    try:
        await client.login("alice")
        stopping = asyncio.ensure_future(running.server.stop())
        await client.expect_stream_error("system-shutdown")
        await asyncio.wait_for(stopping, 10)
    finally:
        await client.close()


async def test_subprotocol_xmpp_is_required(web_server: RunningServer) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await WSClient.connect(url(web_server, "/xmpp-websocket", "wss"), protocols=())
    assert info.value.status == 400


async def test_origin_checks(web_server: RunningServer, clients: list[WSClient]) -> None:
    target = url(web_server, "/xmpp-websocket", "wss")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await WSClient.connect(target, headers={"Origin": "https://evil.example"})
    assert info.value.status == 403
    listed = await WSClient.connect(target, headers={"Origin": "https://chat.example"})
    clients.append(listed)
    await listed.open()
    host, port = web_server.address("https")
    same = await WSClient.connect(target, headers={"Origin": f"https://{host}:{port}"})
    clients.append(same)
    await same.open()


async def test_plain_websocket_needs_a_setting_or_a_trusted_proxy(tmp_path: Path) -> None:
    running = await start_web(tmp_path, https=False, http=True)
    try:
        target = url(running, "/xmpp-websocket", "ws")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await WSClient.connect(target)
        assert info.value.status == 403
        status, _h, _b = await fetch(url(running, "/http-bind", "http"), method="POST",
                                     data=f"<body xmlns='{HTTPBIND}' rid='1' to='a.test'/>")
        assert status == 403  # BOSH too
        # A proxy's header is not believed from an address that is not a trusted proxy.
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await WSClient.connect(target, headers={"X-Forwarded-Proto": "https"})
    finally:
        await stop_server(running)
    running = await start_web(tmp_path / "proxied", '[http]\ntrusted_proxies = ["127.0.0.1/32"]\n',
                              https=False, http=True)
    try:
        target = url(running, "/xmpp-websocket", "ws")
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await WSClient.connect(target, headers={"X-Forwarded-Proto": "http"})
        client = await WSClient.connect(target, headers={"X-Forwarded-Proto": "https"})
        try:
            await client.open()
        finally:
            await client.close()
        _s, _h, body = await fetch(url(running, "/.well-known/host-meta.json", "http"),
                                   headers={"X-Forwarded-Proto": "https",
                                            "X-Forwarded-Host": "chat.example"})
        assert json.loads(body)["links"][0]["href"] == "wss://chat.example/xmpp-websocket"
    finally:
        await stop_server(running)
    running = await start_web(tmp_path / "insecure", "[http]\nwebsocket_insecure = true\n",
                              https=False, http=True)
    try:
        await running.add_user("alice@a.test")
        client = await WSClient.connect(url(running, "/xmpp-websocket", "ws"))
        try:
            assert await client.login("alice") == "alice@a.test/ws"
        finally:
            await client.close()
    finally:
        await stop_server(running)


# -- XEP-0363 HTTP File Upload ------------------------------------------------------------------

UPLOAD = "urn:xmpp:http:upload:0"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


async def start_upload(tmp: Path, upload: str = "") -> RunningServer:
    """Plain HTTP (slixmpp's uploader checks certificates), upload URLs on it."""
    running = await start_web(tmp, f"[upload]\n{upload}\n", https=False, http=True)
    await running.add_user("alice@a.test")
    await running.add_user("bob@a.test")
    return running


async def request_slot(client: Any, filename: str, size: int,
                       content_type: str = "text/plain") -> etree._Element:
    """The raw reply to a slot request (slixmpp raises on errors)."""
    from tests.rawclient import RawClient
    assert isinstance(client, RawClient)
    return await client.ask(
        f"<iq type='get' to='upload.a.test' id='slot'><request xmlns='{UPLOAD}' "
        f"filename='{filename}' size='{size}' content-type='{content_type}'/></iq>")


async def put_file(target: str, data: Any, content_type: str = "text/plain",
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A PUT with the content type the slot was asked for (request_slot's default)."""
    return await fetch(target, method="PUT", data=data,
                       headers={"Content-Type": content_type, **(headers or {})})


def slot_urls(reply: etree._Element) -> tuple[str, str]:
    slot = reply.find(f"{{{UPLOAD}}}slot")
    assert slot is not None, etree.tostring(reply)
    put, get = slot.find(f"{{{UPLOAD}}}put"), slot.find(f"{{{UPLOAD}}}get")
    assert put is not None and get is not None
    return put.get("url", ""), get.get("url", "")


async def test_upload_with_slixmpp_and_download(tmp_path: Path) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_upload(tmp_path)
    try:
        import io
        alice = await running.client("alice@a.test", plugins=("xep_0030", "xep_0363"))
        data = b"hello, file upload\n" * 1000
        got_url = await alice.plugin["xep_0363"].upload_file(
            "notes.txt", size=len(data), content_type="text/plain", input_file=io.BytesIO(data),
            timeout=10)
        assert alice.plugin["xep_0363"].max_file_size == 104857600  # from the disco form
        host, port = running.address("http")
        assert got_url.startswith(f"http://{host}:{port}/upload/") and got_url.endswith("/notes.txt")
        status, headers, body = await fetch(got_url)
        assert status == 200 and body == data
        assert headers["Content-Type"].startswith("text/plain")
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Disposition"].startswith("attachment")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        status, headers, body = await fetch(got_url, headers={"Range": "bytes=7-10"})
        assert status == 206 and body == data[7:11]
        assert headers["Content-Range"] == f"bytes 7-10/{len(data)}"
        status, _h, _b = await fetch(got_url + "x")
        assert status == 404
        # An image is shown inline, with the type the slot was asked for.
        png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
        image_url = await alice.plugin["xep_0363"].upload_file(
            "cat.png", size=len(png), content_type="image/png", input_file=io.BytesIO(png),
            timeout=10)
        status, headers, body = await fetch(image_url)
        assert (status, body, headers["Content-Type"]) == (200, png, "image/png")
        assert headers["Content-Disposition"].startswith("inline")
    finally:
        await stop_server(running)


async def test_upload_service_is_discovered(tmp_path: Path) -> None:
    running = await start_upload(tmp_path)
    try:
        client = await running.raw_login("alice@a.test")
        items = await client.ask("<iq type='get' to='a.test' id='i'><query "
                                 "xmlns='http://jabber.org/protocol/disco#items'/></iq>")
        assert "upload.a.test" in [i.get("jid") for i in
                                   items.iter("{http://jabber.org/protocol/disco#items}item")]
        info = await client.ask("<iq type='get' to='upload.a.test' id='n'><query "
                                "xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        features = [f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")]
        assert UPLOAD in features
        identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
        assert identity is not None and (identity.get("category"), identity.get("type")) == ("store", "file")
        values = {f.get("var"): f.findtext("{jabber:x:data}value")
                  for f in info.iter("{jabber:x:data}field")}
        assert values == {"FORM_TYPE": UPLOAD, "max-file-size": "104857600"}
        await client.close()
    finally:
        await stop_server(running)


async def test_file_too_large_and_quota(tmp_path: Path) -> None:
    running = await start_upload(tmp_path, "max_file_size = 1000\nquota = 1500\n")
    try:
        client = await running.raw_login("alice@a.test")
        reply = await request_slot(client, "big.bin", 1001)
        assert reply.get("type") == "error"
        error = reply.find(f"{{{CLIENT}}}error")
        assert error is not None and error.get("type") == "modify"
        assert error.find(f"{{{STANZAS}}}not-acceptable") is not None
        assert error.findtext(f"{{{UPLOAD}}}file-too-large/{{{UPLOAD}}}max-file-size") == "1000"
        assert slot_urls(await request_slot(client, "a.bin", 1000))
        reply = await request_slot(client, "b.bin", 600)  # 1600 > quota 1500
        assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}resource-constraint") is not None
        assert slot_urls(await request_slot(client, "c.bin", 500))
        for bad in ("", "a/b"):
            reply = await request_slot(client, bad, 10)
            assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}bad-request") is not None
        await client.close()
    finally:
        await stop_server(running)


async def test_put_checks_size_while_streaming_and_refuses_bad_urls(tmp_path: Path) -> None:
    running = await start_upload(tmp_path, "max_file_size = 100000\nslot_lifetime = 5\n")
    try:
        store = running.server.storage.uploads
        files = running.data_dir / "upload"
        client = await running.raw_login("alice@a.test")
        put, get = slot_urls(await request_slot(client, "f.bin", 1000))
        # Larger than the slot, without Content-Length: streamed in, refused once it is too
        # large (the rest is never read), nothing kept, the quota free again.
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            for _ in range(10000):  # 640 MB if it were all read
                sent += 65536
                yield b"x" * 65536

        status = None
        # The server may hang up before the client has finished sending.
        with contextlib.suppress(aiohttp.ClientError):
            status, _h, _b = await put_file(put, endless())
        assert status in (413, None)
        # The server hung up long before the end (socket buffers on loopback take a few MB).
        assert sent < 300 * 65536, sent
        # The client may see the hang-up before the server has cleaned up after the refusal.
        slot_id = put.split("/upload/")[1].split("/")[0]
        for _ in range(100):
            slot = await store.get(slot_id)
            if slot is not None and slot.claimed is None:
                break
            await asyncio.sleep(0.05)
        assert slot is not None and slot.claimed is None  # given back
        assert not list(files.iterdir())
        assert (await fetch(get))[0] == 404
        # That attempt did not use the slot up (its quota stays taken until it is used or
        # expires): the right PUT still works.
        assert await store.usage("alice", "a.test") == 1000
        assert (await put_file(put, b"y" * 1000))[0] == 201
        assert (await fetch(get))[2] == b"y" * 1000
        # A Content-Length larger than the slot: refused at once.
        put, get = slot_urls(await request_slot(client, "g.bin", 1000))
        assert (await put_file(put, b"y" * 1001))[0] == 413
        # An altered URL: another file name, another slot, another expiry, no token.
        put, get = slot_urls(await request_slot(client, "h.bin", 10))
        other_put, _ = slot_urls(await request_slot(client, "i.bin", 10))
        token = put.split("token=")[1]
        other_token = other_put.split("token=")[1]
        for altered in (put.replace("h.bin", "i.bin"), put.replace(token, other_token),
                        put.split("?")[0], put.replace("expires=", "expires=9")):
            assert (await put_file(altered, b"z" * 10))[0] in (403, 404), altered
        assert (await put_file(put, b"z" * 10))[0] == 201
        assert (await fetch(get))[2] == b"z" * 10
        # Once only: the same URL again (a stolen one) is refused.
        assert (await put_file(put, b"w" * 10))[0] == 409
        # The token may come as the slot's Authorization header instead.
        reply = await request_slot(client, "j.bin", 3)
        header = reply.find(f"{{{UPLOAD}}}slot/{{{UPLOAD}}}put/{{{UPLOAD}}}header")
        assert header is not None and header.get("name") == "Authorization"
        bare_put = slot_urls(reply)[0].split("&token=")[0]
        assert (await put_file(bare_put, b"abc"))[0] == 403
        assert (await put_file(bare_put, b"abc",
                               headers={"Authorization": header.text or ""}))[0] == 201
        assert (await fetch(get))[2] == b"z" * 10
        # Expired: slot_lifetime is 5 s (the URL says until when, in whole seconds).
        import time
        expires = int(other_put.split("expires=")[1].split("&")[0])
        await asyncio.sleep(max(0.0, expires - time.time()) + 1.1)
        assert (await put_file(other_put, b"z" * 10))[0] == 403
        await client.close()
    finally:
        await stop_server(running)


async def test_upload_hostile_numbers_content_type_and_cut_off_puts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 20: size='²' and ?expires=² are refused (not an internal error / HTTP 500); a PUT
    must carry the slot's content type (XEP-0363 §5: 415); a PUT cut off in the middle leaves
    the slot usable."""
    caplog.set_level(logging.INFO)
    running = await start_upload(tmp_path, "max_file_size = 100000\n")
    try:
        client = await running.raw_login("alice@a.test")
        for size in ("²", "9" * 5000, "-5", "0", "", "١٢"):
            reply = await request_slot(client, "n.bin", size)  # type: ignore[arg-type]
            assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}bad-request") is not None, size
        put, get = slot_urls(await request_slot(client, "t.txt", 4, "text/plain"))
        expires = put.split("expires=")[1].split("&")[0]
        for bad in ("²", "9" * 5000, "-1", ""):
            assert (await put_file(put.replace(f"expires={expires}", f"expires={bad}"),
                                   b"text"))[0] == 403, bad
        # The slot named text/plain: another type (or none) is 415, and the slot stays usable.
        assert (await put_file(put, b"text", "text/html"))[0] == 415
        assert (await fetch(put, method="PUT", data=b"text",
                            skip_auto_headers=["Content-Type"]))[0] == 415
        assert (await put_file(put, b"text", "Text/Plain; charset=utf-8"))[0] == 201
        status, headers, body = await fetch(get)
        assert (status, body) == (200, b"text") and headers["Content-Type"].startswith("text/plain")
        # No type named: any PUT type, served as octet-stream (never as the PUT said).
        reply = await client.ask(
            f"<iq type='get' to='upload.a.test' id='s2'><request xmlns='{UPLOAD}' "
            f"filename='any.bin' size='4'/></iq>")
        put, get = slot_urls(reply)
        assert (await put_file(put, b"<b/>", "text/html"))[0] == 201
        status, headers, body = await fetch(get)
        assert (status, headers["Content-Type"]) == (200, "application/octet-stream")
        # A PUT cut off after half its body: the slot is still there for the next try.
        put, get = slot_urls(await request_slot(client, "cut.txt", 1000, "text/plain"))
        host, port = running.address("http")
        path = put.split(f"{port}", 1)[1]
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
                     "Content-Length: 1000\r\n\r\n".encode() + b"c" * 500)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()
        await asyncio.sleep(0.3)
        assert (await fetch(get))[0] == 404
        assert (await put_file(put, b"d" * 1000))[0] == 201
        assert (await fetch(get))[2] == b"d" * 1000
        assert (await put_file(put, b"e" * 1000))[0] == 409  # used: once only
        assert not list((running.data_dir / "upload").glob("*.part"))
        await client.close()
    finally:
        await stop_server(running)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_files_expire(tmp_path: Path) -> None:
    # 2 s: time for the PUT and the first GET on a loaded machine (CI saw 404 with 1 s)
    running = await start_upload(tmp_path, "expire_after = 2\n")
    try:
        files = running.data_dir / "upload"
        client = await running.raw_login("alice@a.test")
        put, get = slot_urls(await request_slot(client, "old.txt", 3))
        assert (await put_file(put, b"old"))[0] == 201
        assert (await fetch(get))[2] == b"old"
        await asyncio.sleep(3.1)
        assert (await fetch(get))[0] == 404  # expired, even before a sweep
        await running.server.modules["upload"].sweep()  # (the periodic one may have run)
        assert not list(files.iterdir())
        assert await running.server.storage.uploads.usage("alice", "a.test") == 0
        await client.close()
    finally:
        await stop_server(running)


async def test_files_go_with_the_account(tmp_path: Path) -> None:
    running = await start_upload(tmp_path)
    try:
        files = running.data_dir / "upload"
        bob = await running.raw_login("bob@a.test")
        put, get = slot_urls(await request_slot(bob, "mine.txt", 4))
        assert (await put_file(put, b"mine"))[0] == 201
        alice = await running.raw_login("alice@a.test")
        put, kept = slot_urls(await request_slot(alice, "hers.txt", 4))
        assert (await put_file(put, b"hers"))[0] == 201
        await bob.close()
        await running.server.storage.accounts.delete("bob", "a.test")
        assert (await fetch(get))[0] == 404
        assert await running.server.modules["upload"].sweep() == 1
        assert len(list(files.iterdir())) == 1
        assert (await fetch(kept))[2] == b"hers"
        await alice.close()
    finally:
        await stop_server(running)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_upload_store(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    from server.storage import CORE_STORES, open_storage
    from server.storage import upload as upload_store
    from server.storage.base import NoSuchAccount
    from server.storage.upload import Upload
    from server.stream.scram import derive_credentials
    if backend == "sqlite":
        table = f'[storage]\npath = "{tmp_path / "db.sqlite"}"\n'
    else:
        table = f'[storage]\nbackend = "postgresql"\ndsn = "{request.getfixturevalue("pg_dsn")}"\n'
    config_path = tmp_path / "c.toml"
    config_path.write_text(f'data_dir = "{tmp_path}"\n{table}')
    storage = await open_storage(load_config(config_path), [*CORE_STORES, upload_store.SPEC])
    try:
        await storage.accounts.create("alice", "a.test", derive_credentials("x"))
        store = storage.uploads  # type: ignore[attr-defined]
        one = Upload("id1", "alice", "a.test", "a.txt", 600, "text/plain", 100, None, None)
        assert await store.create(one, 1000)
        assert not await store.create(Upload("id2", "alice", "a.test", "b", 500, "x/y", 100,
                                             None, None), 1000)
        assert await store.create(Upload("id3", "alice", "a.test", "c", 400, "x/y", 200,
                                         None, None), 1000)
        with pytest.raises(NoSuchAccount):
            await store.create(Upload("id4", "nobody", "a.test", "c", 1, "x/y", 1, None, None), 9)
        assert await store.usage("alice", "a.test") == 1000
        assert await store.get("id1") == one
        assert await store.claim("id1", 150) and not await store.claim("id1", 151)
        await store.release("id1")  # a failed PUT gives the slot back
        assert (await store.get("id1")) == one
        assert await store.claim("id1", 150) and not await store.claim("id1", 151)
        await store.stored("id1", 160)
        await store.release("id1")  # a stored file's slot is never given back
        got = await store.get("id1")
        assert got is not None and (got.claimed, got.stored) == (150, 160)
        assert await store.expired(161, 150) == ["id1"]
        assert sorted(await store.expired(0, 201)) == ["id3"]
        assert await store.existing(["id1", "id3", "nope"]) == {"id1", "id3"}
        await store.delete("id3")
        assert await store.existing(["id3"]) == set()
        await storage.accounts.delete("alice", "a.test")
        assert await store.get("id1") is None  # went with the account
    finally:
        await storage.close()


# -- /metrics -----------------------------------------------------------------------------------


async def test_metrics(tmp_path: Path, clients: list[WSClient]) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_web(tmp_path, http=True)
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        bob = await running.client("bob@a.test")
        client = await WSClient.connect(url(running, "/xmpp-websocket", "wss"))
        clients.append(client)
        await client.login("alice")
        await client.send(f"<message xmlns='{CLIENT}' to='bob@a.test'><body>x</body></message>")
        wrong = await WSClient.connect(url(running, "/xmpp-websocket", "wss"))
        clients.append(wrong)
        await wrong.open()
        await wrong.next()
        token = base64.b64encode(b"\0alice\0wrong").decode()
        await wrong.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        assert (await wrong.next()).tag == f"{{{SASL}}}failure"
        await asyncio.sleep(0.7)  # one event-loop lag sample
        status, headers, body = await fetch(url(running, "/metrics", "http"))
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line and not line.startswith("#")}
        assert values["presenced_sessions"] == 2
        assert values['presenced_c2s_streams{transport="websocket"}'] == 2
        assert values['presenced_c2s_streams{transport="c2s"}'] == 1
        assert values['presenced_stanzas_routed_total{kind="message"}'] >= 1
        assert values["presenced_auth_failures_total"] == 1
        assert 'presenced_event_loop_lag_seconds{stat="max"}' in values
        assert 'presenced_storage_latency_seconds{stat="last"}' in values
        assert "presenced_process_resident_memory_bytes" in values
        status, headers, body = await fetch(
            url(running, "/metrics"), headers={"Accept": "application/openmetrics-text"})
        assert status == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
        del bob
    finally:
        await stop_server(running)


async def test_metrics_allow(tmp_path: Path) -> None:
    running = await start_web(tmp_path, '[http]\nmetrics_allow = ["10.0.0.0/8"]\n')
    try:
        assert (await fetch(url(running, "/metrics")))[0] == 403
    finally:
        await stop_server(running)


# -- BOSH (XEP-0124, XEP-0206) ------------------------------------------------------------------

HTTPBIND = "http://jabber.org/protocol/httpbind"
XBOSH = "urn:xmpp:xbosh"


class BoshClient:
    def __init__(self, target: str) -> None:
        self.target = target
        self.http = aiohttp.ClientSession()
        self.rid = 1000
        self.sid: str | None = None
        self.raw: list[bytes] = []

    async def post(self, payload: str = "", attrs: str = "", *, rid: int | None = None,
                   timeout: float = 10.0) -> etree._Element:
        if rid is None:
            self.rid += 1
            rid = self.rid
        sid = f" sid='{self.sid}'" if self.sid else ""
        data = (f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='{rid}'{sid}{attrs}>"
                f"{payload}</body>")
        async with self.http.post(self.target, data=data, ssl=insecure_context(),
                                  headers={"Content-Type": "text/xml; charset=utf-8"},
                                  timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            assert response.status == 200
            raw = await response.read()
        self.raw.append(raw)
        body = etree.fromstring(raw)
        assert body.tag == f"{{{HTTPBIND}}}body"
        return body

    async def create(self, to: str = "a.test", wait: int = 5) -> etree._Element:
        body = await self.post(attrs=f" to='{to}' wait='{wait}' hold='1' ver='1.11' "
                                     "xmpp:version='1.0' xml:lang='en'")
        self.sid = body.get("sid")
        return body

    async def login(self, user: str, resource: str = "bosh") -> str:
        created = await self.create()
        assert created.find(f"{{{STREAMS}}}features") is not None
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        body = await self.post(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>")
        assert body.find(f"{{{SASL}}}success") is not None, etree.tostring(body)
        body = await self.post(attrs=" xmpp:restart='true' to='a.test'")
        assert body.find(f"{{{STREAMS}}}features/{{{BIND}}}bind") is not None
        body = await self.post(f"<iq xmlns='{CLIENT}' type='set' id='b'><bind xmlns='{BIND}'>"
                               f"<resource>{resource}</resource></bind></iq>")
        jid = body.findtext(f"{{{CLIENT}}}iq/{{{BIND}}}bind/{{{BIND}}}jid")
        assert jid is not None, etree.tostring(body)
        return jid

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def bosh_clients() -> AsyncIterator[list[BoshClient]]:
    made: list[BoshClient] = []
    try:
        yield made
    finally:
        for client in made:
            await client.close()


def bosh(running: RunningServer, made: list[BoshClient]) -> BoshClient:
    client = BoshClient(url(running, "/http-bind"))
    made.append(client)
    return client


async def test_bosh_login_chat_and_long_polling(web_server: RunningServer,
                                                bosh_clients: list[BoshClient]) -> None:
    bob = await web_server.client("bob@a.test")
    got: asyncio.Queue[Any] = asyncio.Queue()
    bob.add_event_handler("message", got.put_nowait)
    client = bosh(web_server, bosh_clients)
    created = await client.create()
    assert created.get("sid") and created.get("authid")
    assert (created.get("ver"), created.get("hold"), created.get("requests")) == ("1.11", "1", "2")
    assert created.get("wait") == "5" and created.get("from") == "a.test"
    assert created.get(f"{{{XBOSH}}}version") == "1.0"
    features = created.find(f"{{{STREAMS}}}features")
    assert features is not None
    assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is None
    assert "PLAIN" in [m.text for m in features.iter(f"{{{SASL}}}mechanism")]
    client.sid = None
    client = bosh(web_server, bosh_clients)
    assert await client.login("alice") == "alice@a.test/bosh"
    await client.post(f"<message xmlns='{CLIENT}' to='bob@a.test' type='chat'>"
                      "<body>hello over bosh</body></message>")
    msg = await asyncio.wait_for(got.get(), 5)
    assert msg["body"] == "hello over bosh" and str(msg["from"]) == "alice@a.test/bosh"
    # A held request carries what arrives while it waits.
    poll = asyncio.ensure_future(client.post())
    await asyncio.sleep(0.3)
    assert not poll.done()
    bob.send_message(mto="alice@a.test/bosh", mbody="hello back", mtype="chat")
    body = await asyncio.wait_for(poll, 5)
    assert body.findtext(f"{{{CLIENT}}}message/{{{CLIENT}}}body") == "hello back"
    # A held request with nothing to carry comes back empty after 'wait'.
    started = asyncio.get_running_loop().time()
    body = await client.post()
    assert len(body) == 0 and asyncio.get_running_loop().time() - started >= 4.5


async def test_bosh_retransmission_and_rid_order(web_server: RunningServer,
                                                 bosh_clients: list[BoshClient]) -> None:
    client = bosh(web_server, bosh_clients)
    await client.login("alice")
    ping = f"<iq xmlns='{CLIENT}' type='get' id='p1' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>"
    first = await client.post(ping)
    assert first.find(f"{{{CLIENT}}}iq[@id='p1']") is not None
    # The response was lost: the same rid again gets the same response, not a second answer.
    again = await client.post(ping, rid=client.rid)
    assert client.raw[-1] == client.raw[-2]
    assert etree.tostring(again) == etree.tostring(first)
    # Requests that arrive out of order are handled in rid order.
    rid = client.rid
    later = asyncio.ensure_future(client.post(
        f"<iq xmlns='{CLIENT}' type='get' id='p3' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>",
        rid=rid + 2))
    await asyncio.sleep(0.2)
    earlier = await client.post(
        f"<iq xmlns='{CLIENT}' type='get' id='p2' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>",
        rid=rid + 1)
    answers = [earlier, await asyncio.wait_for(later, 10)]
    ids = [iq.get("id") for body in answers for iq in body.iter(f"{{{CLIENT}}}iq")]
    assert ids == ["p2", "p3"], [etree.tostring(b) for b in answers]
    client.rid = rid + 2
    # Outside the window of 'requests': the session ends.
    body = await client.post(rid=client.rid + 5)
    assert (body.get("type"), body.get("condition")) == ("terminate", "item-not-found")
    assert not any(c.kind == "bosh" and c.bound for c in web_server.server.connections)
    body = await client.post(rid=client.rid + 1)
    assert body.get("condition") == "item-not-found"


async def test_bosh_errors_and_terminate(web_server: RunningServer,
                                         bosh_clients: list[BoshClient]) -> None:
    client = bosh(web_server, bosh_clients)
    client.sid = "no-such-session"
    body = await client.post()
    assert (body.get("type"), body.get("condition")) == ("terminate", "item-not-found")
    async with aiohttp.ClientSession() as http, http.post(
            url(web_server, "/http-bind"), data="<body xmlns='x'", ssl=insecure_context()) as r:
        body = etree.fromstring(await r.read())
    assert body.get("condition") == "bad-request"
    async with aiohttp.ClientSession() as http, http.post(
            url(web_server, "/http-bind"), ssl=insecure_context(),
            data=f"<!DOCTYPE body [<!ENTITY x 'y'>]><body xmlns='{HTTPBIND}' rid='1' to='a.test'>&x;</body>") as r:
        body = etree.fromstring(await r.read())
    assert body.get("condition") == "bad-request"
    other = bosh(web_server, bosh_clients)
    created = await other.create(to="elsewhere.test")
    assert created.get("type") == "terminate"
    assert created.find(f"{{{STREAMS}}}error/{{{STREAM_ERRORS}}}host-unknown") is not None
    client = bosh(web_server, bosh_clients)
    await client.login("alice")
    assert any(c.kind == "bosh" and c.bound for c in web_server.server.connections)
    body = await client.post(f"<presence xmlns='{CLIENT}' type='unavailable'/>",
                             " type='terminate'")
    assert body.get("type") == "terminate" and body.get("condition") is None
    await asyncio.sleep(2.5)  # the stream's closing grace
    assert not any(c.kind == "bosh" for c in web_server.server.connections)
    body = await client.post()
    assert body.get("condition") == "item-not-found"


async def test_bosh_inactivity(web_server: RunningServer, bosh_clients: list[BoshClient],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from server.http import bosh as bosh_module
    monkeypatch.setattr(bosh_module, "INACTIVITY", 1)
    client = bosh(web_server, bosh_clients)
    await client.login("alice")
    assert any(c.kind == "bosh" and c.bound for c in web_server.server.connections)
    await asyncio.sleep(1.6)
    assert not any(c.kind == "bosh" for c in web_server.server.connections)
    body = await client.post()
    assert body.get("condition") == "item-not-found"


# -- issue 19 item 7: web clients from other origins ---------------------------------------------

BOSH_CREATE = (f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='1' to='a.test' wait='5' "
               "hold='1' ver='1.11' xmpp:version='1.0'/>")


async def cors_round(running: RunningServer, origin: str) -> dict[str, Any]:
    """What a page at `origin` gets: the WebSocket handshake, BOSH session creation, and a
    file upload's preflight, PUT and GET (each with its CORS headers)."""
    out: dict[str, Any] = {}
    try:
        ws = await WSClient.connect(url(running, "/xmpp-websocket", "wss"),
                                    headers={"Origin": origin})
        try:
            out["ws"] = await ws.login("alice")
        finally:
            await ws.close()
    except aiohttp.WSServerHandshakeError as exc:
        out["ws"] = exc.status
    status, headers, body = await fetch(url(running, "/http-bind"), method="POST",
                                        data=BOSH_CREATE, headers={"Origin": origin})
    out["bosh"] = (status, headers.get("Access-Control-Allow-Origin"),
                   status == 200 and etree.fromstring(body).get("sid") is not None)
    status, headers, _b = await fetch(url(running, "/http-bind"), method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    out["bosh-preflight"] = (status, headers.get("Access-Control-Allow-Origin"),
                             "POST" in headers.get("Access-Control-Allow-Methods", ""))
    client = await running.raw_login("alice@a.test")
    try:
        put_url, get_url = slot_urls(await request_slot(client, "f.txt", 5))
    finally:
        await client.close()
    base = url(running, "")  # the slot names a.test: asked of the listener directly
    put_path = put_url.split("/upload/", 1)[1]
    get_path = get_url.split("/upload/", 1)[1]
    status, headers, _b = await fetch(f"{base}/upload/{put_path}", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "content-type"})
    out["upload-preflight"] = (status, headers.get("Access-Control-Allow-Origin"),
                               "PUT" in headers.get("Access-Control-Allow-Methods", ""))
    status, headers, _b = await fetch(f"{base}/upload/{put_path}", method="PUT", data=b"hello",
                                      headers={"Origin": origin, "Content-Type": "text/plain"})
    out["put"] = (status, headers.get("Access-Control-Allow-Origin"))
    status, headers, _b = await fetch(f"{base}/upload/{get_path}", headers={"Origin": origin})
    out["get"] = (status, headers.get("Access-Control-Allow-Origin"))
    return out


async def test_any_origin_by_default_and_cors_origins_restricts(tmp_path: Path) -> None:
    """A Converse.js page at another origin (issue 19: `session-refused reason=origin`) may
    use WebSocket, BOSH and upload by default, with CORS headers for the page; a set
    [http] cors_origins still restricts to the listed origins (and the server's own)."""
    page = "http://127.0.0.15:8080"
    running = await start_web(tmp_path / "open", "[upload]\n")
    try:
        await running.add_user("alice@a.test")
        got = await cors_round(running, page)
        assert got == {
            "ws": "alice@a.test/ws",
            "bosh": (200, page, True),
            "bosh-preflight": (204, page, True),
            "upload-preflight": (204, page, True),
            "put": (201, page),
            "get": (200, page),
        }
    finally:
        await stop_server(running)
    running = await start_web(tmp_path / "closed",
                              '[upload]\n[http]\ncors_origins = ["https://chat.example"]\n')
    try:
        await running.add_user("alice@a.test")
        got = await cors_round(running, page)
        assert got == {
            "ws": 403,
            "bosh": (403, None, False),
            "bosh-preflight": (204, None, False),
            "upload-preflight": (204, None, False),
            "put": (201, None),  # no header: the browser keeps the answer from the page
            "get": (200, None),
        }
        listed = await cors_round(running, "https://chat.example")
        assert listed["ws"] == "alice@a.test/ws" and listed["bosh"][:2] == (200,
                                                                         "https://chat.example")
    finally:
        await stop_server(running)
