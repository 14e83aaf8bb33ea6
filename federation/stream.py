"""What inbound and outbound server-to-server streams share beyond the byte moving of
XMLStreamConnection: a link to the federation, and routing what the peer sends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.stream.connection import XMLStreamConnection
from server.stream.tls import TLSLayer
from server.xml.writer import to_canonical

if TYPE_CHECKING:
    from lxml.etree import _Element

    from federation.service import Federation


class S2SStream(XMLStreamConnection):
    def __init__(self, federation: Federation, tls: TLSLayer | None = None) -> None:
        super().__init__(federation.loop, federation.new_parser(), tls)
        self.federation = federation

    def _stanza(self, stanza: _Element) -> None:
        """Route a stanza the negotiation accepted, with no origin session: for the router it
        comes from another server (inbound processing, RFC 6121 §3.1.3, §4.3.2), in the
        stream's order (RFC 6120 §10.1)."""
        if self._blocked and self._hold(stanza):
            return
        pending = self.federation.router.route(to_canonical(stanza), None)
        if pending is not None:
            self._wait_for(self.federation.router.spawn(pending))
