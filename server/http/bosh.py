"""BOSH (XEP-0124, XEP-0206) at /http-bind: the c2s stream of server/stream/c2s.py carried by
HTTP long polling.

A BoshSession is a C2SConnection (the same negotiation machine, SASL, bind and stanza path)
whose transport is a series of HTTP requests:

- in: each request's ``<body/>`` is checked (RFC 6120 restrictions: no DTD, comments,
  processing instructions or entity references) and its children are fed to the stream parser
  one by one, in ``rid`` order (requests that arrive early wait for the missing ones, within
  the ``requests`` window). Session creation and ``xmpp:restart='true'`` become a synthetic
  ``<stream:stream>`` header, ``type='terminate'`` the stream's end.
- out (``_send_out``, the byte-writing layer): our stream header is dropped (its id is the
  ``authid`` of the creation response), ``</stream:stream>`` ends the session with a
  ``type='terminate'`` body, every other chunk (one or more whole elements) waits for a request
  to carry it. Output is answered on the oldest held request, at most ``hold`` requests are
  held, each for ``wait`` seconds at most (then an empty body).
- retransmission (XEP-0124 §14.3): the last ``requests`` responses are kept by rid; a request
  that repeats an answered rid gets the same response again.
- inactivity (XEP-0124 §7): with no request held for ``inactivity`` seconds (or the ``pause``
  asked for, up to ``maxpause``), the session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

from aiohttp import web
from lxml import etree

from server.stream.c2s import C2SConnection
from server.stream.connection import WRITE_BUFFER_LIMIT
from server.xml import ns
from server.xml.numbers import NumberError, parse_optional_int
from server.xml.writer import STREAM_CLOSE

if TYPE_CHECKING:
    from server.app import Server
    from server.cluster.bosh import BoshRelay

log = logging.getLogger("presenced.bosh")

HTTPBIND = "http://jabber.org/protocol/httpbind"
XBOSH = "urn:xmpp:xbosh"
VERSION = "1.11"
MAX_WAIT = 60        # seconds a request may be held
HOLD = 1             # requests held at once
INACTIVITY = 60      # seconds without a held request before the session ends
MAX_PAUSE = 120
POLLING = 2
MAX_BODY = 1 << 20   # bytes of one request body
MAX_RID = 2**53 - 1  # XEP-0124 §14.1: a rid never exceeds 9007199254740991
_MAX_ASKED = 2**31 - 1  # a wait, hold or pause beyond this is no number a client means
_BODY = f"{{{HTTPBIND}}}body"
_RESTART = f"{{{XBOSH}}}restart"
_XMPP_VERSION = f"{{{XBOSH}}}version"
_LANG = ns.q(ns.XML, "lang")
_HEADER_STARTS = (b"<?xml", b"<stream:stream")
_STREAM_ERROR = b"<stream:error>"
_STREAM_ERROR_DECLARED = f'<stream:error xmlns:stream="{ns.STREAMS}">'.encode()
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          huge_tree=False, remove_comments=False, remove_pis=False)


class _Terminate(Exception):
    def __init__(self, condition: str) -> None:
        super().__init__(condition)
        self.condition = condition


def _terminate_body(condition: str | None = None, payload: bytes = b"") -> bytes:
    attrs = f" condition={quoteattr(condition)}" if condition else ""
    return (f"<body xmlns='{HTTPBIND}' xmlns:stream='{ns.STREAMS}' type='terminate'"
            f"{attrs}>").encode() + payload + b"</body>"


def _body(payload: bytes, attrs: str = "") -> bytes:
    return (f"<body xmlns='{HTTPBIND}' xmlns:stream='{ns.STREAMS}'{attrs}>").encode() \
        + payload + b"</body>"


class _Transport:
    """What XMLStreamConnection asks of a transport; BoshSession writes around it."""

    def __init__(self, session: BoshSession, peer: tuple[str, int] | None) -> None:
        self._session = session
        self._peer = peer
        self.closed = False
        self.reading = asyncio.Event()  # cleared while [limits] shaping pauses the session
        self.reading.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def write(self, data: bytes) -> None:  # not used: BoshSession._send_out keeps the output
        pass

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def close(self) -> None:
        self.reading.set()
        self._session.finish()

    def abort(self) -> None:
        self.reading.set()
        self._session.finish()


class BoshSession(C2SConnection):
    kind = "bosh"
    split_reads = False  # shaping: a request's body is read whole, the next one waits
    __slots__ = ("_answered", "_bosh", "_held", "_inactivity", "_next_rid", "_order",
                 "_pending", "_pending_size", "_terminated", "_timer", "_wakeup", "authid",
                 "hold", "requests", "sid", "wait")

    def __init__(self, server: Server, bosh: Bosh, *, wait: int, hold: int) -> None:
        super().__init__(server, direct_tls=False, secured_below=True)
        self._bosh = bosh
        self.sid = secrets.token_urlsafe(18)
        self.wait = wait
        self.hold = hold
        self.requests = hold + 1
        self.authid = ""
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._held: deque[tuple[int, asyncio.Future[bytes]]] = deque()
        self._answered: OrderedDict[int, bytes] = OrderedDict()
        self._next_rid = 0
        self._order = asyncio.Condition()
        self._terminated: bytes | None = None  # the terminate body, once the stream ended
        self._wakeup: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._inactivity = float(INACTIVITY)

    # -- out ---------------------------------------------------------------------------------

    def _send_out(self, chunks: list[bytes] | tuple[bytes, ...]) -> None:
        for chunk in chunks:
            if chunk.startswith(_HEADER_STARTS):
                end = chunk.index(b">", chunk.index(b"<stream:stream"))
                header = etree.fromstring(chunk[:end + 1] + STREAM_CLOSE, _PARSER)
                self.authid = header.get("id", "")
                chunk = chunk[end + 1:]
                if not chunk:
                    continue
            if chunk.endswith(STREAM_CLOSE):
                body = chunk[:-len(STREAM_CLOSE)]
                if body.startswith(_STREAM_ERROR):
                    payload = b"".join(self._pending) + body.replace(
                        _STREAM_ERROR, _STREAM_ERROR_DECLARED, 1)
                    self._terminated = _terminate_body("remote-stream-error", payload)
                else:
                    self._terminated = _terminate_body(None, b"".join(self._pending) + body)
                self._pending.clear()
                self._pending_size = 0
            elif self._terminated is None:
                self._pending.append(chunk)
                self._pending_size += len(chunk)
        if self._pending_size > WRITE_BUFFER_LIMIT and not self._closing:
            self.close("policy-violation", "you are not reading your stream")
        if self._wakeup is None:
            self._wakeup = self._loop.call_soon(self._answer)

    def _answer(self) -> None:
        """Carry what is pending on the oldest held request."""
        self._wakeup = None
        if not self._pending and self._terminated is None:
            return
        while self._held:
            rid, future = self._held.popleft()
            if future.done():
                continue
            future.set_result(self._take(rid))
            break
        if self._terminated is not None:
            while self._held:
                rid, future = self._held.popleft()
                if not future.done():
                    future.set_result(self._record(rid, self._terminated))
        self._touch()

    def _take(self, rid: int) -> bytes:
        if self._terminated is not None:
            return self._record(rid, self._terminated)
        payload = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return self._record(rid, _body(payload))

    def _record(self, rid: int, response: bytes) -> bytes:
        answered = self._answered
        answered[rid] = response
        while len(answered) > self.requests:
            answered.popitem(last=False)
        return response

    # -- in ----------------------------------------------------------------------------------

    def open_stream(self, body: etree._Element) -> None:
        """Session creation and restarts: a synthetic stream header for the parser."""
        header = ["<stream:stream", f" xmlns={quoteattr(ns.CLIENT)}",
                  f" xmlns:stream={quoteattr(ns.STREAMS)}"]
        for name in ("to", "from"):
            value = body.get(name)
            if value is not None:
                header.append(f" {name}={quoteattr(value)}")
        header.append(f" version={quoteattr(body.get(_XMPP_VERSION) or '1.0')}")
        lang = body.get(_LANG)
        if lang is not None:
            header.append(f" xml:lang={quoteattr(lang)}")
        header.append(">")
        self.data_received("".join(header).encode())

    def feed(self, body: etree._Element) -> None:
        for child in body:
            if self._closing:
                return
            self.data_received(etree.tostring(child, with_tail=False))

    async def request(self, rid: int, body: etree._Element, created: bool = False) -> bytes:
        """One request of this session (after creation): in rid order, then held."""
        self.last_activity = self._loop.time()
        if rid in self._answered:  # XEP-0124 §14.3: a lost response, sent again
            return self._answered[rid]
        if rid < self._next_rid:
            # Processed and still held: this is the client trying again; answer it instead.
            for index, (held_rid, future) in enumerate(self._held):
                if held_rid == rid:
                    del self._held[index]
                    if not future.done():
                        future.set_result(_body(b""))
                    return await self._hold_request(rid)
            raise _Terminate("item-not-found")
        if rid >= self._next_rid + self.requests:
            raise _Terminate("item-not-found")  # outside the window (XEP-0124 §14.2)
        async with self._order:
            try:
                await asyncio.wait_for(
                    self._order.wait_for(lambda: self._next_rid == rid), self.wait)
            except TimeoutError:
                raise _Terminate("item-not-found") from None
            self._next_rid = rid + 1
            self._order.notify_all()
        pause = _number(body, "pause", _MAX_ASKED)  # XEP-0124 §10, up to our maxpause
        if pause is not None:
            self._inactivity = float(min(pause, MAX_PAUSE))
            for _rid, future in self._held:
                if not future.done():
                    future.set_result(_body(b""))
            self._held.clear()
        transport = self._transport
        if isinstance(transport, _Transport) and not transport.reading.is_set():
            await transport.reading.wait()  # [limits]: over its read rate, this body waits
        if body.get(_RESTART) == "true":
            self.open_stream(body)
        else:
            self.feed(body)
        if body.get("type") == "terminate" and not self._closing:
            self.data_received(STREAM_CLOSE)
        return await self._hold_request(rid)

    async def _hold_request(self, rid: int) -> bytes:
        await asyncio.sleep(0)  # output made while feeding goes out on this request
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if self._terminated is not None or self._pending:
            response = self._take(rid)
            self._touch()
            return response
        future: asyncio.Future[bytes] = self._loop.create_future()
        self._held.append((rid, future))
        while len(self._held) > self.hold:  # the oldest goes back empty (XEP-0124 §10)
            old_rid, old = self._held.popleft()
            if not old.done():
                old.set_result(self._record(old_rid, _body(b"")))
        self._touch()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.wait)
        except TimeoutError:
            with contextlib.suppress(ValueError):
                self._held.remove((rid, future))
            if future.done():
                return future.result()
            future.cancel()
            self._touch()
            return self._record(rid, _body(b""))

    def _touch(self) -> None:
        """Restart the inactivity timer when no request is held."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held and self._transport is not None:
            self._timer = self._loop.call_later(self._inactivity, self._inactive)

    def _inactive(self) -> None:
        self._timer = None
        if not self._held:
            log.info("event=bosh-inactive sid=%s who=%s", self.sid[:8], self._who())
            self.abort("inactivity")
            self.finish()

    def finish(self) -> None:
        """The session is over: forget it, as a TCP connection being lost."""
        if self._bosh.sessions.pop(self.sid, None) is None:
            return
        self._bosh.ended(self.sid)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if isinstance(transport, _Transport):
            transport.closed = True
        terminated = self._terminated or _terminate_body("remote-stream-error")
        for rid, future in self._held:
            if not future.done():
                future.set_result(self._record(rid, terminated))
        self._held.clear()
        self.connection_lost(None)


class Bosh:
    """The /http-bind endpoint: sessions by sid."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sessions: dict[str, BoshSession] = {}
        self._relay: BoshRelay | None = None

    @property
    def relay(self) -> BoshRelay | None:
        """With [cluster]: requests for sessions held by other nodes go there
        (server/cluster/bosh.py)."""
        cluster = self.server.cluster
        if self._relay is None and cluster is not None:
            from server.cluster.bosh import BoshRelay

            self._relay = BoshRelay(cluster, self.answer, MAX_PAUSE + MAX_WAIT + 30)
        return self._relay

    async def handle(self, request: web.Request, peer: tuple[str, int] | None) -> web.Response:
        if request.method != "POST":
            return web.Response(text="XMPP over BOSH (XEP-0206): POST <body/> here\n")
        try:
            data = await _read_body(request)
        except _Terminate as exc:
            return _xml(_terminate_body(exc.condition))
        return _xml(await self.answer(data, peer))

    async def answer(self, data: bytes, peer: tuple[str, int] | None = None) -> bytes:
        """The response to one request body (also for a request another node relayed)."""
        try:
            body = _parse(data)
            rid = _number(body, "rid", MAX_RID)
            if rid is None:
                raise _Terminate("bad-request")
            sid = body.get("sid")
            if sid is None:
                return await self._create(body, rid, peer)
            session = self.sessions.get(sid)
            relay = self.relay
            if session is None:
                relayed = await self._relayed(relay, sid, data)
                if relayed is None:
                    raise _Terminate("item-not-found")
                return relayed
            if relay is not None:
                relay.used(sid)
            try:
                return await session.request(rid, body)
            except _Terminate as exc:
                # XEP-0124 §14.2: a rid out of the window ends the session; so does a
                # malformed attribute (§17.2 bad-request).
                log.info("event=bosh-terminated sid=%s rid=%d condition=%s", sid[:8], rid,
                         exc.condition)
                session.abort(exc.condition)
                session.finish()
                raise
        except _Terminate as exc:
            return _terminate_body(exc.condition)

    async def _relayed(self, relay: BoshRelay | None, sid: str, data: bytes) -> bytes | None:
        if relay is None:
            return None
        try:
            return await relay.relay(sid, data, MAX_WAIT + 10)
        except TimeoutError:
            return _terminate_body("remote-connection-failed")
        except Exception as exc:  # Redis unreachable: the session cannot be found
            log.warning("event=bosh-relay-failed error=%s", type(exc).__name__)
            return None

    def ended(self, sid: str) -> None:
        if self._relay is not None:
            self._relay.ended(sid)

    async def _create(self, body: etree._Element, rid: int,
                      peer: tuple[str, int] | None) -> bytes:
        if not body.get("to"):
            raise _Terminate("improper-addressing")
        # XEP-0124 §7.1: the client asks, we grant no more than our limits (absent: ours).
        asked_wait = _number(body, "wait", _MAX_ASKED)
        asked_hold = _number(body, "hold", _MAX_ASKED)
        wait = MAX_WAIT if asked_wait is None else min(asked_wait, MAX_WAIT)
        hold = HOLD if asked_hold is None else min(asked_hold, HOLD)
        session = BoshSession(self.server, self, wait=max(wait, 1), hold=max(hold, 1))
        self.sessions[session.sid] = session
        session.connection_made(_Transport(session, peer))  # type: ignore[arg-type]
        session._next_rid = rid + 1
        session.open_stream(body)
        await asyncio.sleep(0)
        if session._wakeup is not None:
            session._wakeup.cancel()
            session._wakeup = None
        if session._terminated is not None:
            response = session._take(rid)
            session.finish()
            return response
        payload = b"".join(session._pending)
        session._pending.clear()
        session._pending_size = 0
        attrs = {"sid": session.sid, "wait": str(session.wait), "hold": str(session.hold),
                 "requests": str(session.requests), "inactivity": str(INACTIVITY),
                 "maxpause": str(MAX_PAUSE), "polling": str(POLLING), "ver": VERSION,
                 "from": session.negotiation.domain or self.server.default_domain,
                 "authid": session.authid, "secure": "true", "xmpp:version": "1.0",
                 # XEP-0206 §5: we understand xmpp:restart='true' (clients look for this).
                 "xmpp:restartlogic": "true"}
        text = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
        response = _body(payload, f" xmlns:xmpp='{XBOSH}'{text}")
        session._record(rid, response)
        session._touch()
        relay = self.relay
        if relay is not None:
            try:
                await relay.held(session.sid)
            except Exception as exc:  # its requests must then reach this node
                log.warning("event=bosh-relay-failed error=%s", type(exc).__name__)
        log.info("event=bosh-session sid=%s peer=%s", session.sid[:8], session.peer)
        return response

    def close_all(self) -> None:
        for session in list(self.sessions.values()):
            session.finish()


async def _read_body(request: web.Request) -> bytes:
    """The whole request body, however many TCP segments it came in: Content-Length bytes, or
    a chunked body up to MAX_BODY. Larger: policy-violation (XEP-0124 §17.2: the request
    broke the connection manager's limits)."""
    length = request.content_length
    if length is not None:
        if length > MAX_BODY:
            raise _Terminate("policy-violation")
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise _Terminate("bad-request") from None
    data = bytearray()
    while chunk := await request.content.read(MAX_BODY + 1 - len(data)):
        data += chunk
        if len(data) > MAX_BODY:
            raise _Terminate("policy-violation")
    return bytes(data)


def _number(body: etree._Element, name: str, maximum: int) -> int | None:
    """An attribute of <body/> that is a number (None when absent); '²', 5,000 digits or a
    negative number is bad-request (XEP-0124 §17.2: a malformed binding element)."""
    try:
        return parse_optional_int(body.get(name), maximum=maximum, name=name)
    except NumberError as exc:
        log.info("event=bosh-bad-attribute name=%s reason=%s", name, exc.reason.replace(" ", "-"))
        raise _Terminate("bad-request") from None


def _parse(data: bytes) -> etree._Element:
    """The request's <body/>; RFC 6120 §11: no DTD, comments, PIs or entity references."""
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError:
        raise _Terminate("bad-request") from None
    if root.tag != _BODY:
        raise _Terminate("bad-request")
    tree = root.getroottree()
    if getattr(tree.docinfo, "doctype", None) or tree.docinfo.internalDTD is not None:
        raise _Terminate("bad-request")
    for node in root.iter():
        if not isinstance(node.tag, str):  # comment, processing instruction, entity
            raise _Terminate("bad-request")
    return root


def _xml(data: bytes) -> web.Response:
    return web.Response(body=data, content_type="text/xml", charset="utf-8",
                        headers={"Cache-Control": "no-store"})
