"""What inbound and outbound server-to-server streams share beyond the byte moving of
XMLStreamConnection: a link to the federation, and routing what the peer sends."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from server.stream.connection import XMLStreamConnection
from server.stream.tls import TLSLayer
from server.xml.writer import to_canonical

if TYPE_CHECKING:
    from lxml.etree import _Element

    from federation.service import Federation

_BACKLOG_PAUSE = 64  # stanzas waiting behind an asynchronous route before we stop reading


class S2SStream(XMLStreamConnection):
    def __init__(self, federation: Federation, tls: TLSLayer | None = None) -> None:
        super().__init__(federation.loop, federation.new_parser(), tls)
        self.federation = federation
        self._backlog: deque[_Element] = deque()
        self._blocked = False

    def deliver(self, stanza: _Element) -> None:
        """Route a stanza the negotiation accepted, with no origin session: for the router it
        comes from another server (inbound processing, RFC 6121 §3.1.3, §4.3.2). Routing may go
        asynchronous; the next stanza waits, which keeps the stream's order (RFC 6120 §10.1)."""
        if self._blocked:
            self._backlog.append(stanza)
            if len(self._backlog) == _BACKLOG_PAUSE and self._transport is not None:
                self._transport.pause_reading()
            return
        pending = self.federation.router.route(to_canonical(stanza), None)
        if pending is not None:
            self._blocked = True
            task = asyncio.ensure_future(pending)
            task.add_done_callback(self._resume)

    def _resume(self, _task: asyncio.Future[Any]) -> None:
        self._blocked = False
        backlog = self._backlog
        while backlog and not self._blocked and not self._closing:
            self.deliver(backlog.popleft())
        if not backlog and self._transport is not None and not self._closing:
            self._transport.resume_reading()
