"""What every XML stream connection does, client or server: bytes <-> TLS <-> parser, batched
writes, and closing (RFC 6120 §4.4). Subclasses (c2s.py, federation's streams) decide what
parser events mean; this layer only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from server.errors import StreamError
from server.limits import PAUSE_BYTES
from server.stream.tls import TLSError, TLSLayer
from server.xml.parser import Event, StreamParser
from server.xml.writer import STREAM_CLOSE, stream_error

if TYPE_CHECKING:
    from lxml.etree import _Element

    from server.limits import ReadShaper

log = logging.getLogger("presenced.stream")
WRITE_BUFFER_LIMIT = 8 << 20  # a peer that does not read this much gets disconnected
CLOSE_GRACE = 2.0             # RFC 6120 §4.4: wait this long for the peer's </stream:stream>
BACKLOG_PAUSE = 64            # stanzas waiting behind an asynchronous route: stop reading


class XMLStreamConnection(asyncio.Protocol):
    kind = "stream"  # for logs: "c2s", "s2s-in", "s2s-out"
    # Shaping: True reads a stream's bytes in pieces as its bucket allows (TCP); False takes a
    # message whole and pauses after it (WebSocket: one message is one element).
    split_reads = True
    __slots__ = ("_backlog", "_blocked", "_closing", "_flush_handle", "_loop", "_out", "_parser",
                 "_pauses", "_shaped", "_shaper", "_tls", "_transport", "last_activity",
                 "opened_at", "peer")

    def __init__(self, loop: asyncio.AbstractEventLoop, parser: StreamParser,
                 tls: TLSLayer | None) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._tls = tls
        self._parser = parser
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._closing = False
        self._backlog: deque[_Element] | None = None  # made when needed: a deque is 760 bytes
        self._blocked = False
        self._shaper: ReadShaper | None = None  # None: not limited (trusted peer, limits off)
        self._shaped: bytearray | None = None   # bytes read beyond the rate, waiting
        self._pauses = 0                        # PAUSE_* bits
        self.peer = ""
        self.opened_at = self.last_activity = loop.time()

    @property
    def closing(self) -> bool:
        return self._closing

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        if self._shaper is not None:
            data = self._shape(data)
            if not data:
                return
        tls = self._tls
        if tls is not None:
            was_done = tls.handshake_done
            try:
                data, out = tls.receive(data)
            except TLSError as exc:
                log.info("event=tls-failed kind=%s peer=%s reason=%s", self.kind, self.peer, exc)
                self.abort(f"TLS failed: {exc}")
                return
            if out:
                self._write_raw(out)
            if not was_done and tls.handshake_done:
                self._tls_ready()
            if not data:
                return
        if self._closing:
            # We already sent </stream:stream>; the peer's closing tag lets us hang up now.
            if STREAM_CLOSE in data and self._transport is not None:
                self._transport.close()
            return
        try:
            events = self._parser.feed(data)
        except StreamError as err:
            self.close(err.condition, err.text)
            return
        for event in events:
            if self._closing:
                return
            self._event(event)

    def eof_received(self) -> bool | None:
        if not self._closing:
            # The peer hung up without </stream:stream>: a lost connection, not a goodbye
            # (XEP-0198: such a session may be resumed).
            self.close(reason="disconnected")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        self._lost(exc)

    # -- for subclasses ----------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        raise NotImplementedError

    def _tls_ready(self) -> None:
        """The TLS handshake just finished."""

    def _lost(self, exc: Exception | None) -> None:
        """The TCP connection is gone."""

    def _ended(self, reason: str) -> None:
        """The stream is ending: we sent </stream:stream> (or a stream error), or aborted."""

    def _header_for_error(self) -> bytes:
        """Our stream header, when a stream error must go out before we sent one
        (RFC 6120 §4.9.1.2); empty once it was sent."""
        return b""

    def _who(self) -> str:
        """Who is at the other end, for logs."""
        return "-"

    # -- stanzas in stream order (RFC 6120 §10.1) ---------------------------------------------

    def _stanza(self, stanza: _Element) -> None:
        """One stanza from the peer, handled in order: see _hold and _wait_for."""
        raise NotImplementedError

    def _hold(self, stanza: _Element) -> bool:
        """True when an earlier stanza's routing is still under way: this one waits."""
        if not self._blocked:
            return False
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = deque()
        backlog.append(stanza)
        if len(backlog) == BACKLOG_PAUSE and self._transport is not None:
            self._transport.pause_reading()
        return True

    def _wait_for(self, task: asyncio.Future[Any]) -> None:
        """Routing went asynchronous (task: from Router.spawn, so shutdown waits for it):
        later stanzas wait until it is done."""
        self._blocked = True
        task.add_done_callback(self._resume)

    def _resume(self, _task: asyncio.Future[Any]) -> None:
        self._blocked = False
        backlog = self._backlog
        while backlog and not self._blocked and not self._closing:
            self._stanza(backlog.popleft())
        if not backlog:
            self._backlog = None
            if self._transport is not None and not self._closing and not self._pauses:
                self._transport.resume_reading()

    # -- shaping (server/limits.py: Prosody's mod_limits, ejabberd's shaper) --------------------

    def _shape(self, data: bytes) -> bytes:
        """The part of data that may be read now; the rest waits, with reading paused, until
        the bucket has refilled: shaped, never dropped."""
        shaper = self._shaper
        assert shaper is not None
        if self._shaped is not None:  # a transport that kept delivering: behind the rest
            self._shaped += data
            return b""
        bucket = shaper.bytes
        if bucket is None:
            return data
        now = self.last_activity
        size = len(data)
        # the usual case first, inline: the bucket holds enough
        full_at = bucket.full_at
        if full_at < now:
            full_at = now
        full_at += size * bucket.step
        if full_at - now <= bucket.room:
            bucket.full_at = full_at
            return data
        if not self.split_reads:
            bucket.full_at = full_at  # taken whole, into debt: the next read waits it out
            if not self._pauses & PAUSE_BYTES:
                self._pause(PAUSE_BYTES, bucket.wait(0, now), self._bytes_refilled)
            return data
        allowed = bucket.take_up_to(size, now)
        self._shaped = bytearray(data[allowed:])
        self._pause(PAUSE_BYTES, shaper.resume_after(size - allowed, now), self._release)
        return data[:allowed]

    def _pause(self, reason: int, delay: float, then: Any) -> None:
        if not self._pauses and self._transport is not None:
            self._transport.pause_reading()
        self._pauses |= reason
        shaper = self._shaper
        if shaper is not None and shaper.limiter is not None:
            shaper.limiter.paused(self.kind, reason)
        self._loop.call_later(delay, then)

    def _unpause(self, reason: int) -> None:
        self._pauses &= ~reason
        backlog = self._backlog
        if not self._pauses and not self._closing and self._transport is not None and \
                (backlog is None or len(backlog) < BACKLOG_PAUSE):
            self._transport.resume_reading()

    def _bytes_refilled(self) -> None:
        bucket = self._shaper.bytes if self._shaper is not None else None
        now = self._loop.time()
        if bucket is not None and bucket.level(now) < 0:
            # more was taken while paused (a transport that kept delivering): wait for that
            self._loop.call_later(bucket.wait(0, now), self._bytes_refilled)
            return
        self._unpause(PAUSE_BYTES)

    def _release(self) -> None:
        """Read what waited, as far as the bucket allows now."""
        held, self._shaped = self._shaped, None
        if self._closing or held is None:
            return
        self._pauses &= ~PAUSE_BYTES
        self.data_received(bytes(held))  # shaped again: what the bucket allows now
        if self._shaped is None:
            self._unpause(0)

    # -- output ------------------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        """Everything queued in one loop iteration goes out in one TLS record batch."""
        if self._closing:
            return
        self._out.append(data)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out = self._out
        if not out:
            return
        self._out = []  # first: writing may close the stream (slow reader), which writes too
        self._send_out(out)

    def _write_now(self, data: bytes) -> None:
        if self._out:
            self._out.append(data)
            self._flush()
        else:
            self._send_out((data,))

    def _send_out(self, chunks: list[bytes] | tuple[bytes, ...]) -> None:
        """Write what was queued, in one TLS record batch. Each chunk is whole: one or more
        top-level elements, our stream header or </stream:stream>. A transport with framing of
        its own (WebSocket, one element per message) overrides this."""
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        self._write_raw(self._tls.send(data) if self._tls is not None else data)

    def _write_raw(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or not data:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT and not self._closing:
            log.info("event=slow-reader kind=%s peer=%s who=%s", self.kind, self.peer,
                     self._who())
            self.close("policy-violation", "you are not reading your stream")
            # It reads nothing, so waiting for its </stream:stream> only pins the buffer.
            transport.abort()

    # -- closing -----------------------------------------------------------------------------

    def close(self, condition: str | None = None, text: str | None = None, *,
              reason: str | None = None) -> None:
        """End the stream: optional stream error, </stream:stream>, then TCP after a grace.
        reason: why, for _ended, when it is not the condition (default "closed")."""
        if self._closing:
            return
        self._closing = True  # first: a write below may find a slow reader and close again
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        if condition is not None:
            log.info("event=stream-error kind=%s peer=%s who=%s condition=%s text=%s",
                     self.kind, self.peer, self._who(), condition, text or "-")
            self._write_now(self._header_for_error() + stream_error(condition, text))
        else:
            self._write_now(STREAM_CLOSE)
        self._ended(reason or condition or "closed")
        transport = self._transport
        if transport is not None:
            if self._tls is not None:
                self._write_raw(self._tls.close())
            self._loop.call_later(CLOSE_GRACE, transport.close)

    def abort(self, reason: str = "aborted") -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        self._ended(reason)
