"""What inbound and outbound server-to-server streams share: bytes <-> TLS <-> parser, batched
writes, and closing (RFC 6120 §4.4). The negotiation machines decide; this layer moves bytes."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from server.errors import StreamError
from server.stream.tls import TLSError, TLSLayer
from server.xml.parser import Event
from server.xml.writer import STREAM_CLOSE, stream_error, to_canonical

if TYPE_CHECKING:
    from lxml.etree import _Element

    from federation.service import Federation

log = logging.getLogger("presenced.s2s")
_WRITE_BUFFER_LIMIT = 16 << 20  # a peer that does not read this much is dropped
_CLOSE_GRACE = 2.0
_BACKLOG_PAUSE = 64  # stanzas waiting behind an asynchronous route before we stop reading


class S2SStream(asyncio.Protocol):
    direction = "?"

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.loop = federation.loop
        self.transport: asyncio.Transport | None = None
        self.tls: TLSLayer | None = None
        self.parser = federation.new_parser()
        self.peer = "?"
        self.closing = False
        self.opened_at = self.last_activity = self.loop.time()
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._backlog: deque[_Element] = deque()
        self._blocked = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if self.tls is not None:
            was_done = self.tls.handshake_done
            try:
                data, out = self.tls.receive(data)
            except TLSError as exc:
                log.info("event=tls-failed direction=%s peer=%s reason=%s", self.direction,
                         self.peer, exc)
                self.abort(f"TLS failed: {exc}")
                return
            if out:
                self.write_raw(out)
            if not was_done and self.tls.handshake_done:
                self.tls_ready()
            if not data:
                return
        if self.closing:
            if STREAM_CLOSE in data and self.transport is not None:
                self.transport.close()
            return
        try:
            events = self.parser.feed(data)
        except StreamError as err:
            self.close(err.condition, err.text)
            return
        for event in events:
            if self.closing:
                return
            self.event(event)

    def eof_received(self) -> bool | None:
        if not self.closing:
            self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        self.lost(exc)

    # -- for subclasses ----------------------------------------------------------------------

    def event(self, event: Event) -> None:
        raise NotImplementedError

    def tls_ready(self) -> None:
        """The TLS handshake just finished."""

    def lost(self, exc: Exception | None) -> None:
        """The TCP connection is gone."""

    def header_needed(self) -> bytes:
        """Our stream header, when a stream error must go out before we sent one."""
        return b""

    # -- stanzas from the peer ---------------------------------------------------------------

    def deliver(self, stanza: _Element) -> None:
        """Route a stanza the negotiation accepted, with no origin session: for the router it
        comes from another server (inbound processing, RFC 6121 §3.1.3, §4.3.2). Routing may go
        asynchronous; the next stanza waits, which keeps the stream's order (RFC 6120 §10.1)."""
        if self._blocked:
            self._backlog.append(stanza)
            if len(self._backlog) == _BACKLOG_PAUSE and self.transport is not None:
                self.transport.pause_reading()
            return
        pending = self.federation.router.route(to_canonical(stanza), None)
        if pending is not None:
            self._blocked = True
            task = asyncio.ensure_future(pending)
            task.add_done_callback(self._resume)

    def _resume(self, _task: asyncio.Future[Any]) -> None:
        self._blocked = False
        backlog = self._backlog
        while backlog and not self._blocked and not self.closing:
            self.deliver(backlog.popleft())
        if not backlog and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- output ------------------------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        """Everything queued in one loop iteration goes out in one TLS record batch."""
        if self.closing:
            return
        self._out.append(data)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        self.write_raw(self.tls.send(data) if self.tls is not None else data)

    def write_now(self, data: bytes) -> None:
        if self._out:
            self._out.append(data)
            self.flush()
        else:
            self.write_raw(self.tls.send(data) if self.tls is not None else data)

    def write_raw(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or not data:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT and not self.closing:
            log.info("event=slow-peer direction=%s peer=%s", self.direction, self.peer)
            self.close("policy-violation", "you are not reading your stream")

    # -- closing -----------------------------------------------------------------------------

    def close(self, condition: str | None = None, text: str | None = None) -> None:
        if self.closing:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self.flush()
        if condition is not None:
            log.info("event=stream-error direction=%s peer=%s condition=%s text=%s",
                     self.direction, self.peer, condition, text or "-")
            self.write_now(self.header_needed() + stream_error(condition, text))
        else:
            self.write_now(STREAM_CLOSE)
        self.closing = True
        transport = self.transport
        if transport is not None:
            if self.tls is not None:
                self.write_raw(self.tls.close())
            self.loop.call_later(_CLOSE_GRACE, transport.close)
        self.closed(condition or "closed")

    def closed(self, reason: str) -> None:
        """The stream is ending (we sent or answered </stream:stream>)."""

    def abort(self, reason: str) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
        self.closed(reason)
