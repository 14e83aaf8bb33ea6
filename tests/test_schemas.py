"""The schemas compile, accept what RFC 6120 allows and refuse what it does not."""

from __future__ import annotations

import pytest
from lxml import etree

from tests.schema import _FILES, schema_for, validate_element, validate_stream_bytes

HEAD = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' from='a.test' id='x' version='1.0'>")


@pytest.mark.parametrize("namespace", sorted(_FILES))
def test_every_schema_compiles(namespace: str) -> None:
    assert schema_for(namespace) is not None


@pytest.mark.parametrize("xml", [
    b"<message xmlns='jabber:client' to='a@b' type='chat'><body>hi</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>",
    b"<presence xmlns='jabber:client'><show>away</show><priority>-5</priority></presence>",
    b"<iq xmlns='jabber:client' type='error' id='1'><ping xmlns='urn:xmpp:ping'/>"
    b"<error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
    b"</error></iq>",
    b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>"
    b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>",
    b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>",
    b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>dj1hYmM=</success>",
])
def test_valid_elements(xml: bytes) -> None:
    validate_element(etree.fromstring(xml))


@pytest.mark.parametrize("xml", [
    b"<iq xmlns='jabber:client' id='1'/>",                                   # type is required
    b"<message xmlns='jabber:client' type='shout'/>",
    b"<presence xmlns='jabber:client'><show>busy</show></presence>",
    b"<presence xmlns='jabber:client'><priority>300</priority></presence>",
    b"<iq xmlns='jabber:client' type='error' id='1'><error type='cancel'>"
    b"<no-such-condition xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
    b"<stream:error xmlns:stream='http://etherx.jabber.org/streams'>"
    b"<made-up xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
    b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><wrong/></failure>",
    b"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource></resource></bind>",
])
def test_invalid_elements(xml: bytes) -> None:
    with pytest.raises(AssertionError):
        validate_element(etree.fromstring(xml))


def test_transcript_with_restart() -> None:
    transcript = (HEAD + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                  b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                  + HEAD + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                  b"<mechanism>PLAIN</mechanism></mechanisms></stream:features>")
    validate_stream_bytes(transcript)
    with pytest.raises(AssertionError):
        validate_stream_bytes(transcript + b"<message xmlns='jabber:client' type='x'/>")
    with pytest.raises(AssertionError):
        validate_stream_bytes(b"<message/>")
