"""Fuzzers of the transports over real sockets: raw c2s streams (TCP), BOSH bodies (HTTP POSTs
to /http-bind) and WebSocket frames (/xmpp-websocket).

Oracles: no traceback in the server's log; BOSH answers every request with HTTP 200 and one
well-formed <body/> (errors are terminate bodies, XEP-0124 §17), the same whether the request's
bytes arrive in one TCP segment or two; a WebSocket or TCP stream ends with a stream error or a
close, never a dropped connection without one; and afterwards the server still answers
(a ping over a fresh c2s login, done by the caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from lxml import etree

from server.http import bosh as bosh_module
from server.http import websocket as ws_module
from server.xml import ns
from tests.conftest import RunningServer
from tests.fuzz import harvest, pure, target
from tests.fuzz.core import HOSTILE, Budget, Finding, Report, bad_number, pick

HTTPBIND = bosh_module.HTTPBIND
XBOSH = bosh_module.XBOSH
FRAMING = ws_module.FRAMING
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def _tracebacks(watch: target.LogWatch) -> list[tuple[str, str]]:
    return [(target.where(r), target.describe(r)) for r in watch.new()]


# -- raw c2s streams --------------------------------------------------------------------------------

_HEADER_VERSIONS = ("1.0", "².0", "1" * 5000 + ".0", "-1.0", "", "1.²", "١.0", "2.0", "1.0.0")


def _stream_bytes(rng: random.Random) -> list[bytes]:
    if rng.random() < 0.5:
        version = pick(rng, _HEADER_VERSIONS).encode()
        to = rng.choice((b"a.test", b"A.TEST", pick(rng, HOSTILE).encode()[:2000]))
        header = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream="
                  b"'http://etherx.jabber.org/streams' to='" + _escape(to) + b"' version='"
                  + _escape(version) + b"'>")
        return [header, *pure._parser_pieces(rng)[1:]]
    return pure._parser_pieces(rng)


def _escape(data: bytes) -> bytes:
    return data.replace(b"&", b"&amp;").replace(b"'", b"&apos;").replace(b"<", b"&lt;")


async def _tcp_case(running: RunningServer, pieces: list[bytes]) -> str | None:
    """None, or what went wrong: the server hung up without </stream:stream> or an error."""
    host, port = running.address("c2s")
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    hung_up = False  # by the server, before we closed our side
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        with contextlib.suppress(TimeoutError):
            while True:
                data = await asyncio.wait_for(reader.read(65536), 0.1)
                if not data:
                    hung_up = True
                    break
                received += data
    except (ConnectionError, OSError):
        hung_up = True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if hung_up and received and b"</stream:stream>" not in received:
        return "the server hung up without a stream error or </stream:stream>"
    if hung_up and not received:
        return "the server hung up without a word"
    return None


async def _fuzz_stream(name: str, make: Callable[[random.Random], Any],
                       attack: Callable[[RunningServer, Any], Awaitable[str | None]],
                       rng: random.Random, budget: Budget, report: Report,
                       running: RunningServer, watch: target.LogWatch) -> None:
    """Cases made by `make` and played by `attack` (None, or how the stream ended badly)."""
    while budget.more():
        case = make(rng)
        report.count(name)
        problem = await attack(running, case)
        shown = repr(b"".join(case) if name == "tcp" else case)[:2000]
        for place, text in _tracebacks(watch):
            report.add(Finding(name, "traceback", place, shown, text))
        if problem is not None and await attack(running, case) is not None:
            # (reported when it happens again: a close racing our last read is no finding)
            _tracebacks(watch)
            report.add(Finding(name, "abrupt-close", problem.split(" (")[0], shown, problem))


async def fuzz_tcp(rng: random.Random, budget: Budget, report: Report,
                   running: RunningServer, watch: target.LogWatch) -> None:
    await _fuzz_stream("tcp", _stream_bytes, _tcp_case, rng, budget, report, running, watch)


# -- BOSH ---------------------------------------------------------------------------------------------

_BOSH_ATTRS = ("rid", "sid", "to", "wait", "hold", "pause", "ver", "content", "route", "ack",
               "type", "xml:lang", "xmpp:version", "xmpp:restart", "polling", "requests")
_BOSH_NUMERIC = ("rid", "wait", "hold", "pause", "ack", "polling", "requests")


class BoshCase:
    def __init__(self, attrs: dict[str, str], children: list[bytes], raw: bytes | None = None,
                 split: bool = False) -> None:
        self.attrs = attrs
        self.children = children
        self.raw = raw      # replaces the whole body
        self.split = split  # the body in two TCP segments

    def body(self, sid: str | None, rid: int) -> bytes:
        if self.raw is not None:
            return self.raw
        attrs = dict(self.attrs)
        attrs.setdefault("rid", str(rid))
        if sid is not None and "sid" not in attrs:
            attrs["sid"] = sid
        text = "".join(f" {k}={_quote(v)}" for k, v in attrs.items())
        return (f"<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}'{text}>".encode()
                + b"".join(self.children) + b"</body>")

    def show(self, sid: str | None, rid: int) -> str:
        return f"{'(in two segments) ' if self.split else ''}{self.body(sid, rid)!r}"


def _quote(value: str) -> str:
    return "'" + value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;") + "'"


def _bosh_case(rng: random.Random, creating: bool) -> BoshCase:
    attrs: dict[str, str] = {}
    if creating:
        attrs.update({"to": "a.test", "wait": "1", "hold": "1", "ver": "1.11",
                      "xmpp:version": "1.0", "xml:lang": "en"})
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        name = pick(rng, _BOSH_ATTRS)
        attrs[name] = bad_number(rng) if name in _BOSH_NUMERIC and rng.random() < 0.8 \
            else pick(rng, HOSTILE)
    if not creating and rng.random() < 0.3:
        attrs["type"] = "terminate"
    children: list[bytes] = []
    corpus = harvest.corpus()
    for _ in range(rng.choice((0, 1, 1, 2) if creating else (0, 1, 1, 1, 2))):
        children.append(corpus[rng.randrange(len(corpus))] if rng.random() < 0.6
                        else pick(rng, pure._TOKENS))
    raw = None
    if rng.random() < 0.1:
        raw = rng.choice((b"", b"<body/>", b"<body xmlns='" + HTTPBIND.encode() + b"' rid='1'>",
                          b"<!DOCTYPE body><body xmlns='" + HTTPBIND.encode() + b"' rid='1'/>",
                          b"\xff\xfe", b"<body xmlns='" + HTTPBIND.encode() + b"' rid='1'>"
                          + b"<a>" * 3000 + b"</body>"))
    return BoshCase(attrs, children, raw, split=rng.random() < 0.25)


async def _post(running: RunningServer, data: bytes, split: bool,
                timeout: float = 10.0) -> tuple[int, bytes]:
    """POST over a raw socket (to control TCP segments): (status, body); status 0: no answer."""
    host, port = running.address("http")
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST /http-bind HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: text/xml; "
            f"charset=utf-8\r\nContent-Length: {len(data)}\r\nX-Forwarded-Proto: https\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        if split and len(data) > 1:
            half = len(data) // 2
            writer.write(head + data[:half])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(data[half:])
        else:
            writer.write(head + data)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout)
    except (TimeoutError, ConnectionError, OSError):
        return 0, b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    m = _STATUS.match(response)
    status = int(m.group(1)) if m else -1
    _, _, body = response.partition(b"\r\n\r\n")
    return status, body


def _bosh_verdict(status: int, body: bytes) -> tuple[str | None, etree._Element | None]:
    if status == 0:
        return "no answer within 10 s", None
    if status != 200:
        return f"HTTP {status}", None
    try:
        el = etree.fromstring(body)
    except etree.XMLSyntaxError:
        return "a response that is not one well-formed <body/>", None
    if el.tag != f"{{{HTTPBIND}}}body":
        return "a response that is not <body/>", None
    return None, el


def _outcome(el: etree._Element | None) -> str:
    if el is None:
        return "none"
    return f"{el.get('type', 'ok')}:{el.get('condition', '')}"


async def fuzz_bosh(rng: random.Random, budget: Budget, report: Report,
                    running: RunningServer, watch: target.LogWatch) -> None:
    while budget.more():
        report.count("bosh")
        rid = rng.randrange(1, 1 << 40)
        creation = _bosh_case(rng, creating=True)
        steps = [(creation, None)]
        status, body = await _post(running, creation.body(None, rid), creation.split)
        problem, el = _bosh_verdict(status, body)
        shown = [creation.show(None, rid)]
        sid = el.get("sid") if el is not None else None
        if problem is None and creation.split:
            # the same request in one segment is answered alike (a new session each time)
            status1, body1 = await _post(running, creation.body(None, rid + 7), False)
            _, el1 = _bosh_verdict(status1, body1)
            if _outcome(el1) != _outcome(el):
                problem = (f"in two TCP segments: {_outcome(el)}; in one: {_outcome(el1)}")
        quick = el is not None and el.get("wait") in ("1", "2")  # else held up to 60 s
        if problem is None and sid is not None and quick:
            for _ in range(rng.choice((0, 1, 2))):
                rid += 1
                case = _bosh_case(rng, creating=False)
                steps.append((case, sid))
                shown.append(case.show(sid, rid))
                status, body = await _post(running, case.body(sid, rid), case.split)
                problem, el = _bosh_verdict(status, body)
                if problem is not None or el is None or el.get("type") == "terminate":
                    break
        for place, text in _tracebacks(watch):
            report.add(Finding("bosh", "traceback", place, " then ".join(shown), text))
        if problem is not None:
            kind = "segments" if problem.startswith("in two") else "bad-response"
            report.add(Finding("bosh", kind, problem.split(":")[0], " then ".join(shown),
                               f"{problem}; response: {body[:300]!r}"))


# -- WebSocket ---------------------------------------------------------------------------------------

def _ws_frames(rng: random.Random) -> list[str | bytes]:
    attrs = {"to": "a.test", "version": "1.0"}
    for _ in range(rng.choice((0, 1, 1, 2))):
        name = rng.choice(("to", "version", "xml:lang", "from", "id"))
        attrs[name] = pick(rng, _HEADER_VERSIONS) if name == "version" else pick(rng, HOSTILE)
    text = "".join(f" {k}={_quote(v)}" for k, v in attrs.items())
    frames: list[str | bytes] = [f"<open xmlns='{FRAMING}'{text}/>"]
    corpus = harvest.corpus()
    for _ in range(rng.randint(0, 5)):
        r = rng.random()
        if r < 0.4:
            frames.append(corpus[rng.randrange(len(corpus))].decode())
        elif r < 0.55:
            frames.append(f"<open xmlns='{FRAMING}' to='a.test' version='{pick(rng, HOSTILE)}'/>")
        elif r < 0.65:
            frames.append(f"<close xmlns='{FRAMING}'/>")
        elif r < 0.75:
            frames.append(rng.randbytes(rng.randint(0, 50)))  # a binary frame
        elif r < 0.85:
            a, b = corpus[rng.randrange(len(corpus))], corpus[rng.randrange(len(corpus))]
            frames.append((a + b).decode())  # two elements in one frame
        else:
            frames.append(pick(rng, pure._TOKENS).decode("utf-8", "replace"))
    return frames


async def _ws_case(running: RunningServer, frames: list[str | bytes]) -> str | None:
    host, port = running.address("http")
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(f"http://{host}:{port}/xmpp-websocket",
                                          protocols=("xmpp",),
                                          timeout=aiohttp.ClientWSTimeout(ws_close=5),
                                          headers=target.PROXY_HEADERS)
        except aiohttp.ClientError as exc:
            return f"refused: {exc}"
        try:
            for frame in frames:
                if ws.closed:
                    break
                if isinstance(frame, bytes):
                    await ws.send_bytes(frame)
                else:
                    await ws.send_str(frame)
            saw_close = False
            with contextlib.suppress(TimeoutError):
                while True:
                    msg = await asyncio.wait_for(ws.receive(), 0.1)
                    if msg.type == aiohttp.WSMsgType.TEXT and "<close" in msg.data:
                        saw_close = True
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                        if not saw_close and ws.close_code not in (1000, 1002, 1003, 1007,
                                                                    1008, 1009):
                            return f"closed without <close/> (code {ws.close_code})"
                        break
        except (ConnectionError, aiohttp.ClientError):
            pass
        finally:
            await ws.close()
    return None


async def fuzz_websocket(rng: random.Random, budget: Budget, report: Report,
                         running: RunningServer, watch: target.LogWatch) -> None:
    await _fuzz_stream("websocket", _ws_frames, _ws_case, rng, budget, report, running, watch)


async def still_serving(running: RunningServer) -> str | None:
    """A fresh login and a ping: None if the server answers."""
    client = None
    try:
        client = await target.login(running, "bob@a.test", "check")
        reply = await client.ask(f"<iq type='get' id='alive' to='a.test'>"
                                 f"<ping xmlns='{ns.PING}'/></iq>", skip_others=True)
        return None if reply.get("type") == "result" else "ping answered with an error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await target.close_quietly(client)


async def fuzz_transports(rng: random.Random, budgets: dict[str, Budget], report: Report,
                          tmp: Path) -> None:
    running = await target.start(tmp)
    try:
        with target.LogWatch() as watch:
            for name, fuzzer in (("tcp", fuzz_tcp), ("bosh", fuzz_bosh),
                                 ("websocket", fuzz_websocket)):
                if name in budgets:
                    await fuzzer(rng, budgets[name], report, running, watch)
                    dead = await still_serving(running)
                    if dead is not None:
                        report.add(Finding(name, "server-unresponsive", "after the run",
                                           "a login and a ping", dead))
    finally:
        await target.stop(running)
