"""A byte-level XMPP client for tests that must see or send exact bytes.

It speaks over real sockets (asyncio streams, stdlib TLS) and parses what it receives with its
own lxml pull parser (independent of the server's parser), keeping every byte for schema checks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl

import scramp
from lxml import etree

STREAMS = "http://etherx.jabber.org/streams"
CLIENT = "jabber:client"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def header(to: str, version: str | None = "1.0", xmlns: str = CLIENT, extra: str = "") -> bytes:
    v = f" version='{version}'" if version is not None else ""
    return (f"<?xml version='1.0'?><stream:stream to='{to}'{v} xmlns='{xmlns}' "
            f"xmlns:stream='{STREAMS}'{extra}>").encode()


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class StreamClosedError(AssertionError):
    pass


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = bytearray()   # every byte the server sent (plaintext), for schema checks
        self._new_parser()
        self.stream_attrs: dict[str, str] = {}
        self.header_extra = ""        # more attributes for open()'s headers, e.g. " xml:lang='en'"
        self.closed = False           # the server sent </stream:stream>
        self.jid = ""                 # the full JID login() bound

    @classmethod
    async def connect(cls, host: str, port: int, *, direct_tls: bool = False,
                      server_hostname: str | None = None) -> RawClient:
        ssl_ctx = insecure_context() if direct_tls else None
        if direct_tls:
            ssl_ctx.set_alpn_protocols(["xmpp-client"])  # type: ignore[union-attr]
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_ctx, server_hostname=server_hostname if direct_tls else None)
        return cls(reader, writer)

    def _new_parser(self) -> None:
        self._parser = etree.XMLPullParser(events=("start", "end"), resolve_entities=False)
        self._root: etree._Element | None = None
        self._queue: list[etree._Element] = []

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)
        await self.writer.drain()

    async def starttls(self) -> None:
        await self.writer.start_tls(insecure_context())
        self._new_parser()

    def restart(self) -> None:
        self._new_parser()

    async def _read_more(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        if not data:
            raise StreamClosedError("connection closed by the server")
        self.received += data
        self._parser.feed(data)
        for event, el in self._parser.read_events():
            if event == "start" and self._root is None:
                self._root = el
                self.stream_attrs = dict(el.attrib)
            elif event == "end":
                if el is self._root:
                    self.closed = True
                elif el.getparent() is self._root:
                    self._queue.append(el)

    async def next(self, timeout: float = 5.0) -> etree._Element:
        """The next top-level element the server sends."""
        while not self._queue:
            await self._read_more(timeout)
        return self._queue.pop(0)

    async def next_of(self, kind: str, timeout: float = 5.0) -> etree._Element:
        """The next message, presence or iq (`kind`); other stanzas are skipped."""
        tag = f"{{{CLIENT}}}{kind}"
        while True:
            el = await self.next(timeout)
            if el.tag == tag:
                return el

    async def expect(self, tag: str, timeout: float = 5.0) -> etree._Element:
        el = await self.next(timeout)
        if el.tag != tag:
            raise AssertionError(f"expected {tag}, got {etree.tostring(el)!r}")
        return el

    async def ask(self, xml: str, *, skip_others: bool = False) -> etree._Element:
        """Send an iq; the answer must be the next stanza (skip_others: the next iq, past the
        presence the server may send meanwhile)."""
        await self.send(xml)
        if not skip_others:
            return await self.expect(f"{{{CLIENT}}}iq")
        return await self.next_of("iq")

    async def open(self, to: str) -> etree._Element:
        """Send a header; returns the features."""
        await self.send(header(to, extra=self.header_extra))
        return await self.expect(f"{{{STREAMS}}}features")

    async def stream_error(self, timeout: float = 5.0) -> str:
        """Wait for a stream error; returns its condition."""
        el = await self.expect(f"{{{STREAMS}}}error", timeout)
        for c in el:
            if etree.QName(c).namespace == STREAM_ERRORS and etree.QName(c).localname != "text":
                return etree.QName(c).localname
        raise AssertionError("stream error without a condition")

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Read until the server closes the TCP connection."""
        async def drain() -> None:
            while await self.reader.read(65536):
                pass
        await asyncio.wait_for(drain(), timeout)

    async def authenticate(self, domain: str, user: str, password: str,
                           mechanism: str = "SCRAM-SHA-1") -> None:
        """STARTTLS (if offered) + SCRAM; leaves the client at the restarted stream's features."""
        features = await self.open(domain)
        if features.find(f"{{{TLS_NS}}}starttls") is not None:
            await self.send(f"<starttls xmlns='{TLS_NS}'/>")
            await self.expect(f"{{{TLS_NS}}}proceed")
            await self.starttls()
            features = await self.open(domain)
        binding = None
        if mechanism.endswith("-PLUS"):
            # RFC 5929 tls-server-end-point: the stdlib cannot export keying material.
            ssl_object = self.writer.get_extra_info("ssl_object")
            binding = ("tls-server-end-point", ssl_object)
        client = scramp.ScramClient([mechanism], user, password, channel_binding=binding)
        first = client.get_client_first()
        await self.send(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'>"
                        f"{base64.b64encode(first.encode()).decode()}</auth>")
        challenge = await self.expect(f"{{{SASL_NS}}}challenge")
        client.set_server_first(base64.b64decode(challenge.text or "").decode())
        final = client.get_client_final()
        await self.send(f"<response xmlns='{SASL_NS}'>"
                        f"{base64.b64encode(final.encode()).decode()}</response>")
        success = await self.next()
        if success.tag != f"{{{SASL_NS}}}success":
            raise AssertionError(f"SASL failed: {etree.tostring(success)!r}")
        client.set_server_final(base64.b64decode(success.text or "").decode())
        self.restart()

    async def login(self, domain: str, user: str, password: str,
                    resource: str | None = "raw") -> str:
        """Authenticate and bind; returns the full JID."""
        await self.authenticate(domain, user, password)
        await self.open(domain)
        res = f"<resource>{resource}</resource>" if resource else ""
        await self.send(f"<iq type='set' id='bind1'><bind xmlns='{BIND_NS}'>{res}</bind></iq>")
        reply = await self.expect(f"{{{CLIENT}}}iq")
        jid = reply.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid")
        if reply.get("type") != "result" or not jid:
            raise AssertionError(f"bind failed: {etree.tostring(reply)!r}")
        self.jid = jid
        return jid

    async def close(self) -> None:
        if not self.writer.is_closing():
            try:
                self.writer.write(b"</stream:stream>")
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                pass
            self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def condition(reply: etree._Element) -> str:
    """The defined condition of an error stanza (RFC 6120 §8.3.3)."""
    assert reply.get("type") == "error", etree.tostring(reply)
    error = reply.find(f"{{{CLIENT}}}error")
    assert error is not None
    names = [etree.QName(c).localname for c in error if etree.QName(c).namespace == STANZAS]
    return next(n for n in names if n != "text")


async def end_stream(client: RawClient, timeout: float = 5.0) -> None:
    """Close our stream (RFC 6120 §4.4): send </stream:stream>, read up to the server's own
    closing tag (stanzas before it are kept for next()), then wait until it hangs up."""
    await client.send(b"</stream:stream>")
    while not client.closed:
        await client._read_more(timeout)
    await client.wait_closed(timeout)


async def sync(client: RawClient, ident: str = "sync") -> list[etree._Element]:
    """Ping the server; returns what arrived before the answer. The server handles one
    stream's stanzas in order, so everything sent before has been processed, and what it sent
    this client because of them is queued before the answer (a marker on the stream whose
    stanzas are asserted on)."""
    await client.send(f"<iq type='get' id='{ident}'><ping xmlns='urn:xmpp:ping'/></iq>")
    before: list[etree._Element] = []
    while True:
        el = await client.next()
        if el.tag == f"{{{CLIENT}}}iq" and el.get("id") == ident:
            assert el.get("type") == "result", etree.tostring(el)
            return before
        before.append(el)
