"""XMPP over WebSocket (RFC 7395): the c2s stream of server/stream/c2s.py with another framing.

WebSocketConnection is a C2SConnection (the same negotiation machine, SASL, bind, stanza
path); only the framing differs, translated at the edges:

- in: each text message is one complete element. ``<open xmlns='urn:ietf:params:xml:ns:
  xmpp-framing'/>`` becomes a synthetic ``<stream:stream>`` header fed to the stream parser
  (also after SASL, when the client opens the restarted stream), ``<close/>`` becomes
  ``</stream:stream>``; anything else is fed as it is, and must have been one whole element.
- out (``_send_out``, the byte-writing layer of XMLStreamConnection): our stream header goes
  out as ``<open/>``, ``</stream:stream>`` as ``<close/>``, a stream error as a standalone
  ``<stream:error>`` followed by ``<close/>`` (RFC 7395 §3.6); every other chunk is already
  one element with its namespace declared, and becomes one text message.

TLS belongs to the HTTP listener (or to a trusted proxy), so the negotiation is built as
already secure: no STARTTLS offered, as with direct TLS. ``_WebSocketTransport`` gives the
connection the asyncio transport it expects (write, close, abort, pause/resume reading, write
buffer size) over an aiohttp WebSocketResponse, whose sends are coroutines: messages queue and
one task sends them in order.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

from aiohttp import WSMsgType, web
from lxml import etree

from server.stream.c2s import C2SConnection
from server.xml import ns
from server.xml.writer import STREAM_CLOSE

if TYPE_CHECKING:
    from server.app import Server

log = logging.getLogger("presenced.websocket")

FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
SUBPROTOCOL = "xmpp"
_OPEN = f"{{{FRAMING}}}open"
_CLOSE = f"{{{FRAMING}}}close"
_CLOSE_MESSAGE = f'<close xmlns="{FRAMING}"/>'.encode()
_STREAM_ERROR = b"<stream:error>"
_STREAM_ERROR_DECLARED = f'<stream:error xmlns:stream="{ns.STREAMS}">'.encode()
_HEADER_STARTS = (b"<?xml", b"<stream:stream")
_FRAMING_START = re.compile(rb"<(?:open|close)[\s/>]")
_LANG = ns.q(ns.XML, "lang")
# A framing element is small: parsed on its own, without entities, DTDs or network.
_FRAMING_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                  huge_tree=False)


class WebSocketConnection(C2SConnection):
    kind = "websocket"
    split_reads = False  # shaping: a message is one element, read whole; the next one waits
    __slots__ = ("_elements", "_opened_parser")

    def __init__(self, server: Server) -> None:
        super().__init__(server, direct_tls=False, secured_below=True)
        self._opened_parser: Any = None  # the stream parser an <open/> was fed to
        self._elements = 0               # parser events of the message being read

    # -- in ----------------------------------------------------------------------------------

    def message(self, data: bytes) -> None:
        """One WebSocket text message from the client."""
        if self._closing:
            if data.lstrip().startswith(b"<close"):
                self.data_received(STREAM_CLOSE)  # the answer to ours: hang up now
            return
        stripped = data.strip()
        if not stripped:
            self.last_activity = self._loop.time()  # a whitespace keepalive
            return
        if self._parser is not self._opened_parser or _FRAMING_START.match(stripped):
            self._framing(stripped)
            return
        if stripped[0] != 0x3C:  # "<"
            self.close("not-well-formed", "a WebSocket message must be one complete XML element")
            return
        self._elements = 0
        self.data_received(data)
        if self._elements != 1 and not self._closing:
            # RFC 7395 §3.3.3: a message is exactly one complete element.
            self.close("not-well-formed", "a WebSocket message must be one complete XML element")

    def binary(self) -> None:
        self.close("bad-format", "XMPP over WebSocket uses text messages only")

    def _framing(self, data: bytes) -> None:
        try:
            el: Any = etree.fromstring(data, _FRAMING_PARSER)
            tag = el.tag
        except etree.XMLSyntaxError:
            el, tag = None, _first_tag(data)
        if el is not None and tag == _CLOSE:
            self.data_received(STREAM_CLOSE)
            return
        if tag not in (_OPEN, _CLOSE) and self._parser is not self._opened_parser:
            # RFC 7395 §3.3.1: the stream opens with <open/> in the framing namespace (not with
            # <stream:stream>, nor with a stanza).
            self.close("invalid-namespace", "the stream must begin with <open xmlns='"
                       f"{FRAMING}'/>")
            return
        if el is None or tag != _OPEN:
            self.close("not-well-formed", "a WebSocket message must be one complete XML element")
            return
        if self._parser is self._opened_parser:
            self.close("bad-format", "unexpected <open/>: the stream is open")
            return
        header = ["<stream:stream", f" xmlns={quoteattr(ns.CLIENT)}",
                  f" xmlns:stream={quoteattr(ns.STREAMS)}"]
        for name in ("to", "from", "id", "version"):
            value = el.get(name)
            if value is not None:
                header.append(f" {name}={quoteattr(value)}")
        lang = el.get(_LANG)
        if lang is not None:
            header.append(f" xml:lang={quoteattr(lang)}")
        header.append(">")
        self._opened_parser = self._parser
        self.data_received("".join(header).encode())

    def _event(self, event: Any) -> None:
        self._elements += 1
        super()._event(event)

    # -- out ---------------------------------------------------------------------------------

    def _send_out(self, chunks: list[bytes] | tuple[bytes, ...]) -> None:
        write = self._write_raw
        for chunk in chunks:
            if chunk.startswith(_HEADER_STARTS):
                end = chunk.index(b">", chunk.index(b"<stream:stream"))
                write(_open_message(chunk[:end + 1]))
                chunk = chunk[end + 1:]
                if not chunk:
                    continue
            if chunk.endswith(STREAM_CLOSE):
                body = chunk[:-len(STREAM_CLOSE)]
                if body:
                    write(body.replace(_STREAM_ERROR, _STREAM_ERROR_DECLARED, 1))
                write(_CLOSE_MESSAGE)
            else:
                write(chunk)


def _first_tag(data: bytes) -> str | None:
    """The first element's name (Clark notation) of a message that is not well-formed."""
    parser = etree.XMLPullParser(events=("start",), resolve_entities=False, no_network=True,
                                 load_dtd=False)
    try:
        parser.feed(data)
        for _event, el in parser.read_events():
            if isinstance(el, etree._Element):
                return str(el.tag)
    except etree.XMLSyntaxError:
        pass
    return None


def _open_message(header: bytes) -> bytes:
    """Our <stream:stream ...> header as RFC 7395's <open/>."""
    el = etree.fromstring(header + STREAM_CLOSE, _FRAMING_PARSER)
    parts = [f"<open xmlns={quoteattr(FRAMING)}"]
    for name in ("from", "to", "id", "version"):
        value = el.get(name)
        if value is not None:
            parts.append(f" {name}={quoteattr(value)}")
    lang = el.get(_LANG)
    if lang is not None:
        parts.append(f" xml:lang={quoteattr(lang)}")
    parts.append("/>")
    return "".join(parts).encode()


class _WebSocketTransport:
    """The asyncio transport XMLStreamConnection writes to, over an aiohttp WebSocketResponse:
    each write() is one text message (WebSocketConnection writes one element per call)."""

    def __init__(self, ws: web.WebSocketResponse, peer: tuple[str, int] | None) -> None:
        self._ws = ws
        self._peer = peer
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._aborted = False
        self.reading = asyncio.Event()
        self.reading.set()
        self._sender = asyncio.ensure_future(self._send())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._queue.append(data)
        self._queued += len(data)
        self._wakeup.set()

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return self._queued

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def close(self) -> None:
        """Send what is queued, then close the WebSocket."""
        self._closing = True
        self._wakeup.set()
        self.reading.set()

    def abort(self) -> None:
        self._closing = self._aborted = True
        self._queue.clear()
        self._wakeup.set()
        self.reading.set()

    async def _send(self) -> None:
        ws, queue = self._ws, self._queue
        try:
            while True:
                while queue and not self._aborted:
                    data = queue.popleft()
                    self._queued -= len(data)
                    await ws.send_frame(data, WSMsgType.TEXT)
                if self._closing:
                    break
                self._wakeup.clear()
                await self._wakeup.wait()
        except (ConnectionError, RuntimeError):
            pass  # the peer is gone: the reading side sees it
        finally:
            queue.clear()
            if not ws.closed:
                await ws.close()

    async def finish(self) -> None:
        """The reading side is done: stop sending."""
        self.abort()
        await asyncio.gather(self._sender, return_exceptions=True)


def peer_of(request: web.Request) -> tuple[str, int] | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return (str(peer[0]), int(peer[1])) if peer else None


async def serve(server: Server, request: web.Request, *, max_message: int,
                forwarded_for: str | None = None) -> web.StreamResponse:
    """Run one XMPP session over an upgraded request (the caller checked scheme and Origin)."""
    # timeout: how long our WebSocket close waits for the client's (as CLOSE_GRACE for TCP).
    ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=max_message,
                               compress=False, decode_text=False, autoping=True, timeout=2.0)
    ready = ws.can_prepare(request)
    if not ready.ok:
        return web.Response(status=426, text="a WebSocket upgrade is expected here\n",
                            headers={"Upgrade": "websocket"})
    if ready.protocol != SUBPROTOCOL:
        # RFC 7395 §3.2: the "xmpp" subprotocol must be negotiated.
        return web.Response(status=400, text="the WebSocket subprotocol 'xmpp' is required\n")
    await ws.prepare(request)
    peer = peer_of(request)
    if forwarded_for is not None:
        peer = (forwarded_for, 0)
    conn = WebSocketConnection(server)
    transport = _WebSocketTransport(ws, peer)
    conn.connection_made(transport)  # type: ignore[arg-type]
    error: Exception | None = None
    try:
        while True:
            await transport.reading.wait()
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                conn.message(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
            elif msg.type is WSMsgType.BINARY:
                conn.binary()
            elif msg.type is WSMsgType.ERROR:
                # aiohttp closed the WebSocket already, e.g. with 1009 for a message over
                # max_message (RFC 6455 §7.4.1): no stream error can follow; one log line.
                error = msg.data if isinstance(msg.data, Exception) else None
                log.info("event=websocket-error peer=%s code=%s", conn.peer,
                         getattr(error, "code", ws.close_code))
                break
            else:  # CLOSE, CLOSING, CLOSED: the client left (or we closed)
                break
    except asyncio.CancelledError:
        error = ConnectionResetError("shutdown")
        raise
    finally:
        await transport.finish()
        conn.connection_lost(error)
    return ws
