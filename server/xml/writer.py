"""Writing streams: headers, stream errors, and stanzas in the stream's content namespace."""

from __future__ import annotations

from collections.abc import Iterable
from xml.sax.saxutils import quoteattr

from lxml import etree

from server.xml import ns

STREAM_CLOSE = b"</stream:stream>"
_CLIENT_DECL = b'xmlns="jabber:client"'
_SERVER_DECL = b'xmlns="jabber:server"'
_DECLS = {ns.SERVER: _SERVER_DECL, ns.COMPONENT: b'xmlns="jabber:component:accept"'}


def stream_header(*, content_ns: str, from_: str | None, to: str | None, id_: str | None,
                  version: str | None = "1.0", lang: str = "en",
                  extra_ns: dict[str, str] | None = None) -> bytes:
    parts = ["<?xml version='1.0'?><stream:stream", f" xmlns={quoteattr(content_ns)}",
             f" xmlns:stream='{ns.STREAMS}'"]
    for prefix, uri in (extra_ns or {}).items():
        parts.append(f" xmlns:{prefix}={quoteattr(uri)}")
    for name, value in (("from", from_), ("to", to), ("id", id_), ("version", version),
                        ("xml:lang", lang)):
        if value is not None:
            parts.append(f" {name}={quoteattr(value)}")
    parts.append(">")
    return "".join(parts).encode()


def stream_error(condition: str, text: str | None = None) -> bytes:
    body = f'<{condition} xmlns="{ns.STREAM_ERRORS}"/>'
    if text:
        escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        body += f'<text xmlns="{ns.STREAM_ERRORS}" xml:lang="en">{escaped}</text>'
    return f"<stream:error>{body}</stream:error>".encode() + STREAM_CLOSE


def serialize(stanza: etree._Element, content_ns: str) -> bytes:
    """A canonical {jabber:client} stanza as bytes for a stream whose default namespace is
    content_ns. Only the top element's declaration changes for jabber:server (or a
    component's jabber:component:accept): nested jabber:client content (e.g. XEP-0297
    forwarded stanzas) keeps its namespace."""
    shared = _SHARED.pop(id(stanza), None) if _SHARED else None
    if shared is not None and shared[0] is stanza and shared[1] == (len(stanza),
                                                                    len(stanza.attrib)):
        data = shared[2]
    else:
        data = etree.tostring(stanza)
    decl = _DECLS.get(content_ns)
    if decl is not None:
        return data.replace(_CLIENT_DECL, decl, 1)
    return data


# addressed_copies(): copy id -> (the copy, its shape then, its bytes); serialize() takes them.
_SHARED: dict[int, tuple[etree._Element, tuple[int, int], bytes]] = {}
_SHARED_MAX = 4096  # copies never written (blocked, held, their session gone) are forgotten


def addressed_copies(template: etree._Element, recipients: Iterable[str]) -> list[etree._Element]:
    """One copy of a canonical stanza without 'to' per recipient, addressed to it, and the
    template serialised once for them all (DESIGN.md rule 3: a groupchat message to 50
    occupants): serialize() of a copy is the template's bytes with the copy's 'to' put in,
    unless something changed the copy since (a child or an attribute added or removed: then
    it is serialised anew). The copies are ordinary elements for filters, queues and holds."""
    if "to" in template.attrib:
        raise ValueError("the template of addressed copies has no 'to'")
    data: bytes = etree.tostring(template)
    cut = data.index(b" ")  # after the tag name: '<message xmlns="jabber:client" ...'
    head, tail = data[:cut] + b" to=", data[cut:]
    shape = (len(template), len(template.attrib) + 1)
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    copies = []
    for to in recipients:
        one = template.__copy__()  # the element with its subtree (copy.copy's dispatch: +1 µs)
        one.set("to", to)
        quoted = quoteattr(to) if ("&" in to or "<" in to or ">" in to or '"' in to) \
            else f'"{to}"'
        _SHARED[id(one)] = (one, shape, head + quoted.encode() + tail)
        copies.append(one)
    return copies


def to_canonical(stanza: etree._Element) -> etree._Element:
    """A {jabber:server} (or component) stanza as a canonical {jabber:client} one."""
    decl = _DECLS.get(etree.QName(stanza).namespace or "")
    if decl is None:
        return stanza
    data = etree.tostring(stanza).replace(decl, _CLIENT_DECL, 1)
    return etree.fromstring(data)
