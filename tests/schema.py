"""Validate what the server sent against the XML Schemas in schemas/ (RFC 6120 Appendix A).

The schemas are XSD 1.1: RFC 6120's own XSD 1.0 text breaks the Unique Particle Attribution
rule (an `##other` wildcard beside an element it also matches), which XSD 1.1 allows.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import xmlschema
from lxml import etree

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"
STREAMS = "http://etherx.jabber.org/streams"
_FILES = {
    STREAMS: "streams.xsd",
    "jabber:client": "client.xsd",
    "jabber:server": "server.xsd",
    "urn:ietf:params:xml:ns:xmpp-tls": "tls.xsd",
    "urn:ietf:params:xml:ns:xmpp-sasl": "sasl.xsd",
    "urn:ietf:params:xml:ns:xmpp-bind": "bind.xsd",
    "urn:ietf:params:xml:ns:xmpp-session": "session.xsd",
    "urn:ietf:params:xml:ns:xmpp-stanzas": "stanzaerror.xsd",
    "urn:ietf:params:xml:ns:xmpp-streams": "streamerror.xsd",
    "urn:presenced:watchers:0": "watchers.xsd",
    "jabber:server:dialback": "dialback.xsd",
    "urn:xmpp:bidi": "bidi.xsd",
}
_HEADER = re.compile(rb"(?:<\?xml[^>]*\?>)?\s*<stream:stream\b[^>]*>")


@functools.cache
def schema_for(namespace: str) -> xmlschema.XMLSchemaBase | None:
    name = _FILES.get(namespace)
    if name is None:
        return None
    path = SCHEMAS / name
    try:
        return xmlschema.XMLSchema11(str(path))
    except xmlschema.XMLSchemaException:
        return xmlschema.XMLSchema10(str(path))


def validate_element(element: etree._Element) -> None:
    namespace = etree.QName(element).namespace or ""
    schema = schema_for(namespace)
    if schema is None:
        raise AssertionError(f"no schema for the top-level element {element.tag}")
    errors = list(schema.iter_errors(etree.tostring(element).decode()))
    if errors:
        raise AssertionError(f"{etree.tostring(element)[:300]!r} does not validate against "
                             f"{_FILES[namespace]}: {errors[0].reason}")


def validate_stream_bytes(data: bytes) -> None:
    """Everything a server sent on one connection (several streams after restarts, with or
    without the closing tag): every top-level element must validate against its schema."""
    headers = list(_HEADER.finditer(data))
    if not headers:
        raise AssertionError(f"no stream header in {data[:200]!r}")
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(data)
        body = data[header.end():end].split(b"</stream:stream>")[0]
        document = header.group(0) + body + b"</stream:stream>"
        parser = etree.XMLParser(resolve_entities=False, no_network=True)
        try:
            root = etree.fromstring(document, parser)
        except etree.XMLSyntaxError as exc:
            raise AssertionError(f"the server sent malformed XML: {exc}") from exc
        if root.tag != f"{{{STREAMS}}}stream":
            raise AssertionError(f"root element is {root.tag}")
        for child in root:
            if isinstance(child.tag, str):
                validate_element(child)
