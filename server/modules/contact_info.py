"""Contact addresses of the service (XEP-0157), in the server's disco#info as a XEP-0128 form.

    [contact_info]
    admin = ["xmpp:admin@example.org", "mailto:admin@example.org"]
    abuse = []
    feedback = []
    sales = []
    security = []
    support = []
    status = []      # where the service's status is published

Each is a list of URIs (mailto:, xmpp:, https:, ...); an empty one is left out (XEP-0157 §3:
only fields with values are sent). With none set, disco#info has no form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from server import events
from server.config import Invalid, option
from server.module import Module, Stanza, hook
from server.sessions import Session
from server.xml import ns
from server.xml import stanza as st

FORM_TYPE = "http://jabber.org/network/serverinfo"
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")  # RFC 3986 §3.1 scheme, then no spaces


def _uris(value: Any, _ctx: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid
    for uri in value:
        if not _URI.fullmatch(uri):
            raise Invalid(f'"{uri}" is not a URI such as "mailto:abuse@example.org"')
    return tuple(value)


_EXPECTED = 'a list of URIs such as ["mailto:abuse@example.org", "xmpp:admin@example.org"]'


@dataclass(frozen=True, slots=True, kw_only=True)
class ContactInfoSettings:
    admin: tuple[str, ...] = field(metadata=option(_EXPECTED, _uris, []))
    abuse: tuple[str, ...] = field(metadata=option(_EXPECTED, _uris, []))
    feedback: tuple[str, ...] = field(metadata=option(_EXPECTED, _uris, []))
    sales: tuple[str, ...] = field(metadata=option(_EXPECTED, _uris, []))
    security: tuple[str, ...] = field(metadata=option(_EXPECTED, _uris, []))
    support: tuple[str, ...] = field(metadata=option(_EXPECTED, _uris, []))
    status: tuple[str, ...] = field(metadata=option(_EXPECTED, _uris, []))


class ContactInfo(Module):
    name = "contact_info"
    settings = ContactInfoSettings

    @hook(events.DISCO_SERVER_INFO)
    def server_info(self, query: Stanza, _stanza: Stanza, _origin: Session | None) -> None:
        given = [(f.name, getattr(self.config, f.name)) for f in fields(self.config)]
        given = [(name, uris) for name, uris in given if uris]
        if not given:
            return
        form = st.child(query, ns.q(ns.DATA_FORMS, "x"), {"type": "result"})
        kind = st.child(form, ns.q(ns.DATA_FORMS, "field"),
                        {"var": "FORM_TYPE", "type": "hidden"})
        st.child(kind, ns.q(ns.DATA_FORMS, "value"), text=FORM_TYPE)
        for name, uris in given:
            # XEP-0157 §2: <kind>-addresses, list-multi.
            item = st.child(form, ns.q(ns.DATA_FORMS, "field"),
                            {"var": f"{name}-addresses", "type": "list-multi"})
            for uri in uris:
                st.child(item, ns.q(ns.DATA_FORMS, "value"), text=uri)
