"""XMPP Ping (XEP-0199): the server answers pings to itself and to accounts' bare JIDs."""

from __future__ import annotations

from server.module import Module, Stanza
from server.sessions import Session
from server.xml import ns
from server.xml.stanza import result

module = Module("ping")
module.feature(ns.PING)


@module.iq_get(ns.PING, to=("host", "bare"))
def ping(stanza: Stanza, _origin: Session | None) -> Stanza:
    return result(stanza)
