"""The sans-IO stream parser: events, RFC 6120 §11 restrictions, limits, any chunking."""

from __future__ import annotations

import random

import pytest
from lxml import etree

from server.errors import StreamError
from server.xml.parser import StreamClosed, StreamOpened, StreamParser
from server.xml.writer import serialize, stream_error, stream_header, to_canonical

HEAD = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' to='a.test' version='1.0'>")
BODY = (b"<message to='b@a.test' type='chat' id='1'><body>a &amp; b &#65; &lt;&gt;"
        b"<![CDATA[x & <y> ]] ]]></body><x xmlns='urn:x' a='&quot;'/></message> \n"
        b"<presence><show>away</show></presence><iq type='get' id='2'><ping xmlns='urn:xmpp:ping'/></iq>")
STREAM = HEAD + BODY + b"</stream:stream>"


def run(chunks: list[bytes], parser: StreamParser | None = None) -> list[object]:
    parser = parser or StreamParser()
    events: list[object] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def summary(events: list[object]) -> list[object]:
    return [e.tag if etree.iselement(e) else type(e).__name__ for e in events]  # type: ignore


EXPECTED = ["StreamOpened", "{jabber:client}message", "{jabber:client}presence",
            "{jabber:client}iq", "StreamClosed"]


def tree(el: etree._Element) -> tuple[object, ...]:
    """An element as data: tag, attributes, text, and each child with its tail."""
    return (el.tag, dict(el.attrib), el.text,
            [(*tree(child), child.tail) for child in el])


def content(events: list[object]) -> list[object]:
    """Everything an event carries: the header's attributes and namespaces, each stanza's
    attributes, text and children."""
    out: list[object] = []
    for e in events:
        if isinstance(e, StreamOpened):
            out.append(("StreamOpened", e.attrs, e.default_ns, e.nsmap))
        elif etree.iselement(e):
            out.append(tree(e))  # type: ignore[arg-type]
        else:
            out.append(type(e).__name__)
    return out


# What STREAM holds, written out (not computed by the parser under test).
CONTENT = [
    ("StreamOpened", {"to": "a.test", "version": "1.0"}, "jabber:client",
     {None: "jabber:client", "stream": "http://etherx.jabber.org/streams"}),
    ("{jabber:client}message", {"to": "b@a.test", "type": "chat", "id": "1"}, None, [
        ("{jabber:client}body", {}, "a & b A <>x & <y> ]] ", [], None),
        ("{urn:x}x", {"a": '"'}, None, [], None)]),
    ("{jabber:client}presence", {}, None, [("{jabber:client}show", {}, "away", [], None)]),
    ("{jabber:client}iq", {"type": "get", "id": "2"}, None,
     [("{urn:xmpp:ping}ping", {}, None, [], None)]),
    "StreamClosed",
]


def test_whole_stream() -> None:
    events = run([STREAM])
    assert summary(events) == EXPECTED
    assert content(events) == CONTENT
    opened = events[0]
    assert isinstance(opened, StreamOpened) and opened.attrs["to"] == "a.test"
    assert opened.default_ns == "jabber:client"
    message = events[1]
    assert message.findtext("{jabber:client}body") == "a & b A <>x & <y> ]] "  # type: ignore
    # Detached stanzas serialise with a default namespace, no prefixes, no stream decl.
    data = serialize(message, "jabber:client")  # type: ignore[arg-type]
    assert data.startswith(b'<message xmlns="jabber:client" ') and b"stream" not in data
    assert serialize(message, "jabber:server").startswith(b'<message xmlns="jabber:server"')  # type: ignore


def test_every_split_point_gives_the_same_events() -> None:
    """Cut anywhere (inside a name, an attribute value, an entity, a CDATA section), the
    events carry the same tags, attributes and text."""
    for cut in range(1, len(STREAM)):
        assert content(run([STREAM[:cut], STREAM[cut:]])) == CONTENT, cut


def test_byte_by_byte_and_random_chunks() -> None:
    assert content(run([STREAM[i:i + 1] for i in range(len(STREAM))])) == CONTENT
    rng = random.Random(7)
    for _ in range(50):
        chunks, rest = [], STREAM
        while rest:
            n = rng.randint(1, 40)
            chunks.append(rest[:n])
            rest = rest[n:]
        assert content(run(chunks)) == CONTENT, [len(c) for c in chunks]


@pytest.mark.parametrize(("data", "condition"), [
    (b"<!-- comment -->", "restricted-xml"),
    (b"<?pi data?>", "restricted-xml"),
    (b"<message>&xxe;</message>", "restricted-xml"),
    (b"<message a='&foo;'/>", "restricted-xml"),
    (b"<!DOCTYPE x SYSTEM 'http://evil/x.dtd'>", "restricted-xml"),
    (b"<message><body>x</message>", "not-well-formed"),
    (b"<message><<</message>", "not-well-formed"),
    (b"text in the stream root<presence/>", "bad-format"),  # found at the next element
    (b"<message><body>\xff\xfe</body></message>", "unsupported-encoding"),
])
def test_restricted_and_broken_xml(data: bytes, condition: str) -> None:
    for chunks in ([HEAD + data], [HEAD] + [data[i:i + 1] for i in range(len(data))]):
        with pytest.raises(StreamError) as err:
            run(chunks)
        assert err.value.condition == condition


def test_doctype_and_billion_laughs_before_the_root() -> None:
    laughs = (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
              b"<!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]><stream:stream>&lol2;")
    with pytest.raises(StreamError) as err:
        run([laughs])
    assert err.value.condition == "restricted-xml"


def test_other_encodings_refused() -> None:
    with pytest.raises(StreamError) as err:
        run([b"<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream>"])
    assert err.value.condition == "unsupported-encoding"


def test_size_limit_while_the_stanza_is_still_arriving() -> None:
    parser = StreamParser(max_stanza_size=10_000)
    parser.feed(HEAD)
    parser.feed(b"<message><body>")
    with pytest.raises(StreamError) as err:
        for _ in range(100):
            parser.feed(b"x" * 1000)  # never ends
    assert err.value.condition == "policy-violation"
    # One huge read is checked slice by slice.
    parser = StreamParser(max_stanza_size=10_000)
    with pytest.raises(StreamError):
        parser.feed(HEAD + b"<message><body>" + b"y" * 100_000 + b"</body></message>")
    # Many small stanzas add up to nothing.
    parser = StreamParser(max_stanza_size=10_000)
    parser.feed(HEAD)
    for _ in range(100):
        assert len(parser.feed(b"<message><body>" + b"z" * 500 + b"</body></message>")) == 1


def test_depth_limit() -> None:
    with pytest.raises(StreamError) as err:
        run([HEAD + b"<a>" * 40], StreamParser(max_depth=32))
    assert err.value.condition == "policy-violation"


def test_keepalives_do_not_accumulate() -> None:
    parser = StreamParser()
    parser.feed(HEAD)
    for _ in range(1000):
        assert parser.feed(b" \n") == []
    assert summary(parser.feed(b"<presence/>")) == ["{jabber:client}presence"]


def test_nothing_after_close() -> None:
    parser = StreamParser()
    events = parser.feed(HEAD + b"</stream:stream><message/>")
    assert isinstance(events[-1], StreamClosed)
    assert parser.feed(b"<more/>") == []


def outcome(chunks: list[bytes]) -> tuple[list[object], str]:
    try:
        return summary(run(chunks)), "ok"
    except StreamError as err:
        return [], err.condition


@pytest.mark.parametrize("between, after, expected", [
    # RFC 6120 §11.7: text between top-level elements is bad-format, read with the stanza or not
    (b"text", b"", (None, "bad-format")),
    (b" \n", b"", (["StreamOpened", "{jabber:client}presence", "StreamClosed"], "ok")),
    # what follows </stream:stream> is not the stream's: it ended first
    (b"", b"<!ENTITY x 'y'>", (["StreamOpened", "{jabber:client}presence", "StreamClosed"], "ok")),
    (b"", b"<?pi?>&bogus;", (["StreamOpened", "{jabber:client}presence", "StreamClosed"], "ok")),
])
def test_the_end_of_a_stream_is_judged_alike_however_it_is_cut(
        between: bytes, after: bytes, expected: tuple[list[object] | None, str]) -> None:
    data = HEAD + b"<presence/>" + between + b"</stream:stream>" + after
    for cut in range(len(HEAD), len(data) + 1):
        events, result = outcome([data[:cut], data[cut:]])
        assert result == expected[1], (cut, data[:cut], data[cut:])
        if expected[0] is not None:
            assert events == expected[0], cut


def test_writer_helpers() -> None:
    header = stream_header(content_ns="jabber:client", from_="a.test", to="u@a.test",
                           id_="i'd", lang="en")
    opened = run([header])[0]
    assert isinstance(opened, StreamOpened) and opened.attrs["id"] == "i'd"
    error = etree.fromstring(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>"
                             + stream_error("host-unknown", "no <such> host"))
    assert error[0][1].text == "no <such> host"
    server_stanza = etree.fromstring(b"<message xmlns='jabber:server'><body>x</body></message>")
    assert to_canonical(server_stanza).tag == "{jabber:client}message"


def test_standalone_copy_for_keeping() -> None:
    from server.xml.stanza import standalone
    presence = run([HEAD + b"<presence><show>away</show><c xmlns='urn:caps' v='1'/></presence>"])[1]
    kept = standalone(presence)  # type: ignore[arg-type]
    assert serialize(kept, "jabber:client") == serialize(presence, "jabber:client")  # type: ignore[arg-type]
    kept.set("to", "x@a.test")
    assert presence.get("to") is None  # type: ignore[union-attr]
