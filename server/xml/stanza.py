"""Building and answering stanzas. Stanzas are canonical `{jabber:client}` lxml elements."""

from __future__ import annotations

import copy
from typing import TypeAlias

from lxml import etree

from server.errors import StanzaError
from server.xml import ns

Element: TypeAlias = etree._Element

MESSAGE = ns.q(ns.CLIENT, "message")
PRESENCE = ns.q(ns.CLIENT, "presence")
IQ = ns.q(ns.CLIENT, "iq")
ERROR = ns.q(ns.CLIENT, "error")
BODY = ns.q(ns.CLIENT, "body")
STANZA_TAGS = frozenset({MESSAGE, PRESENCE, IQ})
_CLIENT_NSMAP = {None: ns.CLIENT}


def element(tag: str, attrs: dict[str, str] | None = None, text: str | None = None) -> Element:
    """A new element whose namespace is the default one (serialises without prefixes)."""
    namespace = tag[1:tag.index("}")] if tag.startswith("{") else None
    el = etree.Element(tag, attrs or {}, nsmap={None: namespace} if namespace else None)
    if text is not None:
        el.text = text
    return el


def standalone(stanza: Element) -> Element:
    """A copy for keeping (e.g. a session's last presence) that holds no reference to the
    stream parser it came from: lxml's deep copies keep their source parser alive, which
    would pin ~10 KiB per connection even after the stream gave its parser back."""
    tag = stanza.tag
    namespace = tag[1:tag.index("}")] if tag[0] == "{" else None
    kept = etree.Element(tag, dict(stanza.attrib), nsmap={None: namespace} if namespace else None)
    kept.text = stanza.text
    for part in stanza:
        kept.append(copy.deepcopy(part))
    return kept


def child(parent: Element, tag: str, attrs: dict[str, str] | None = None,
          text: str | None = None) -> Element:
    namespace = tag[1:tag.index("}")] if tag.startswith("{") else None
    if namespace is not None and parent.nsmap.get(None) != namespace:
        el = etree.SubElement(parent, tag, attrs or {}, nsmap={None: namespace})
    else:
        el = etree.SubElement(parent, tag, attrs or {})
    if text is not None:
        el.text = text
    return el


def iq(type_: str, *, to: str | None = None, from_: str | None = None,
       id_: str | None = None) -> Element:
    attrs = {"type": type_}
    if id_ is not None:
        attrs["id"] = id_
    if to is not None:
        attrs["to"] = to
    if from_ is not None:
        attrs["from"] = from_
    return element(IQ, attrs)


def result(request: Element, payload: Element | None = None) -> Element:
    """The type='result' answer to an iq get/set (RFC 6120 §8.2.3)."""
    reply = iq("result", id_=request.get("id", ""))
    _address_reply(request, reply)
    if payload is not None:
        reply.append(payload)
    return reply


def error_reply(stanza: Element, error: StanzaError) -> Element:
    """RFC 6120 §8.3.1: swap addresses, type='error', keep the id, add <error/>."""
    reply = etree.Element(stanza.tag, nsmap=_CLIENT_NSMAP)
    reply.set("type", "error")
    sid = stanza.get("id")
    if sid is not None:
        reply.set("id", sid)
    _address_reply(stanza, reply)
    # Echo the first payload child of an iq, as servers conventionally do, so clients can match it.
    if stanza.tag == IQ and len(stanza):
        first = stanza[0]
        if isinstance(first.tag, str):
            reply.append(etree.Element(first.tag, nsmap={None: etree.QName(first).namespace}))
    err = etree.SubElement(reply, ERROR, {"type": error.type})
    etree.SubElement(err, ns.q(ns.STANZA_ERRORS, error.condition),
                     nsmap={None: ns.STANZA_ERRORS})
    if error.text:
        text = etree.SubElement(err, ns.q(ns.STANZA_ERRORS, "text"),
                                {ns.q(ns.XML, "lang"): "en"}, nsmap={None: ns.STANZA_ERRORS})
        text.text = error.text
    return reply


def _address_reply(request: Element, reply: Element) -> None:
    sender = request.get("from")
    if sender:
        reply.set("to", sender)
    target = request.get("to")
    if target:
        reply.set("from", target)


def is_error(stanza: Element) -> bool:
    return stanza.get("type") == "error"


def payload(stanza: Element) -> Element | None:
    """The single child element of an iq get/set (RFC 6120 §8.2.3), else None."""
    children = [c for c in stanza if isinstance(c.tag, str)]
    return children[0] if len(children) == 1 else None
