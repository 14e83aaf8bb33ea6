"""Idle streams give their lxml parser back between stanzas; any stream with the same opening tag
borrows it, or a new one reads a synthetic opening. Nothing of this may show in the events."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import pytest
from lxml import etree

from server.errors import StreamError
from server.xml import parser as parser_module
from server.xml.parser import StreamClosed, StreamOpened, StreamParser

HEAD = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' to='a.test' version='1.0'>")
STANZAS = (b"<message to='b@a.test' type='chat' id='1'><body>a &amp; b &#65; &lt;&gt;"
           b"<![CDATA[x & <y> ]] ]]></body><x xmlns='urn:x' a='&quot;&gt;'/></message> \n"
           b"<presence><show>away</show></presence><iq type='get' id='2'>"
           b"<ping xmlns='urn:xmpp:ping'/></iq><presence a=\"'>\" b='\">'/>")
STREAM = HEAD + STANZAS + b"</stream:stream>"
OPENING = '<stream:stream xmlns="jabber:client" xmlns:stream="http://etherx.jabber.org/streams">'
# Another prefix for the stream, more declarations, and values that need escaping.
ODD_HEAD = (b"<s:stream xmlns:s='http://etherx.jabber.org/streams' xmlns='jabber:server' "
            b"xmlns:db='jabber:server:dialback' xmlns:q='urn:q&amp;&lt;\"&#9;' to='a.test'>")
ODD_STREAM = (ODD_HEAD + b"<db:result from='a.test' to='b.test'>key</db:result>"
              b"<message><q:x/><body>hi</body></message><q:y q:a='1'/></s:stream>")
OTHER = b"<presence from='other'/>"  # what another stream sends in between


@pytest.fixture(params=["shared", "new"])
def pool(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """shared: parsers are lent between streams; new: none is kept, every borrower makes a new
    one from the synthetic opening."""
    if request.param == "new":
        monkeypatch.setattr(parser_module, "_POOL_SIZE", 0)
        parser_module._pool().idle.clear()
    yield request.param


def describe(events: list[object]) -> list[object]:
    out: list[object] = []
    for e in events:
        if etree.iselement(e):
            out.append((e.tag, dict(e.nsmap), etree.tostring(e)))  # type: ignore[arg-type]
        elif isinstance(e, StreamOpened):
            out.append((e.tag, e.attrs, e.nsmap))
        else:
            out.append(type(e).__name__)
    return out


def whole(stream: bytes) -> list[object]:
    return describe(StreamParser().feed(stream))


@pytest.mark.parametrize("stream", [STREAM, ODD_STREAM], ids=["client", "odd"])
def test_every_split_point_with_another_stream_in_between(pool: str, stream: bytes) -> None:
    expected = whole(stream)
    heads = {HEAD: "{jabber:client}presence", ODD_HEAD: "{jabber:server}presence"}
    gave_back = 0
    for cut in range(1, len(stream)):
        mine = StreamParser()
        events = mine.feed(stream[:cut])
        gave_back += mine.idle
        # Meanwhile a stream with the same opening and one with another read a stanza: they
        # borrow what mine gave back (and give it back), or make their own.
        for head, tag in heads.items():
            other = StreamParser()
            other.feed(head)
            assert [e.tag for e in other.feed(OTHER)] == [tag]  # type: ignore[union-attr]
        events += mine.feed(stream[cut:])
        assert describe(events) == expected, cut
    assert gave_back >= 5  # the cuts between stanzas


def test_interleaved_streams_in_random_chunks(pool: str) -> None:
    rng = random.Random(5)
    for _ in range(100):
        streams = [(StreamParser(), s, []) for s in (STREAM, ODD_STREAM, STREAM, ODD_STREAM)]
        offsets = [0] * len(streams)
        while any(offset < len(s) for offset, (_, s, _) in zip(offsets, streams, strict=True)):
            i = rng.randrange(len(streams))
            parser, stream, got = streams[i]
            n = rng.randint(1, 60)
            got += parser.feed(stream[offsets[i]:offsets[i] + n])
            offsets[i] += n
        for _parser, stream, got in streams:
            assert describe(got) == whole(stream)


@pytest.mark.parametrize("reads", [
    # (bytes, idle after them): given back once everything read since the parser last held
    # nothing is whole tags and text, ending with a tag, at a stanza boundary.
    [(b"<message><body>hi", False), (b"</body>", False), (b"</message>", True)],
    [(b"<message><body>hi</body></message", False), (b">", True), (b" ", True),
     (b"<presence/>", True)],
    [(b"<presence a='>'", False), (b"/>", True), (b"<presence a=\">\"/>", True)],
    [(b"<presence/><!", True), (b"[CDATA[ ]]", False), (b">", True), (b"<presence/>", True)],
    [(b"<presence/><![CDATA[ x>", False)],  # inside the CDATA section still
    [(b"<presence/>&am", True)],  # held back by us, not by libxml2
    [(b"<presence/>\n ", True), (b"<presence", False), (b" \n/>\r\n", True),
     (b"<presence/>", True)],
    # A '<' inside a quote is no tag: libxml2 is still in the attribute value.
    [(b'<iq a="<x/>', False)],
    [(b"<iq a='>' b=\"<x/>", False)],
])
def test_idle_only_at_a_stanza_boundary(pool: str, reads: list[tuple[bytes, bool]]) -> None:
    parser = StreamParser()
    assert parser.idle  # nothing read yet
    parser.feed(HEAD)
    assert parser.idle
    for data, idle in reads:
        parser.feed(data)
        assert parser.idle == idle, data


def test_an_open_quote_never_lends_the_parser() -> None:
    """A stream that stops inside an attribute value whose bytes look like a whole tag keeps its
    parser: lent, the next stream's stanza would be read into that value and vanish (the
    fuzzers' cross-stream check found it)."""
    for attack in (b'<iq a="<x/>', b"<iq a='>' b=\"<x/>", b"<iq a='x'><b c='<y/>",
                   b"<![CDATA[ <x/>", b"<![CDATA[ x>"):
        mine, theirs = StreamParser(), StreamParser()
        mine.feed(HEAD + b"<presence/>")  # gives its parser back
        theirs.feed(HEAD)
        theirs.feed(attack)
        got = mine.feed(b"<message to='b@a.test'><body>hi</body></message>")
        assert [e.tag for e in got] == ["{jabber:client}message"], attack  # type: ignore[union-attr]


def test_pending_text_is_not_a_boundary(pool: str) -> None:
    parser = StreamParser()
    parser.feed(HEAD)
    assert [e.tag for e in parser.feed(b"<presence/>text")] == ["{jabber:client}presence"]  # type: ignore[union-attr]
    assert not parser.idle
    # The pending text is still this stream's, and still an error.
    with pytest.raises(StreamError) as err:
        parser.feed(b"<presence/>")
    assert err.value.condition == "bad-format"


def test_pending_text_stays_with_its_stream(pool: str) -> None:
    bad, good = StreamParser(), StreamParser()
    bad.feed(HEAD)
    good.feed(HEAD)
    bad.feed(b"<presence/>text")  # libxml2 holds "text" until the next tag
    assert [e.tag for e in good.feed(b"<presence/>")] == ["{jabber:client}presence"]  # type: ignore[union-attr]
    with pytest.raises(StreamError) as err:
        bad.feed(b"<presence/>")
    assert err.value.condition == "bad-format"


def test_keepalives_between_stanzas_borrow_nothing(pool: str) -> None:
    parser = StreamParser()
    parser.feed(HEAD + b"<presence/>")
    for _ in range(100):
        assert parser.feed(b" \r\n\t") == []
        assert parser.idle
    assert [e.tag for e in parser.feed(b" <presence/>")] == ["{jabber:client}presence"]  # type: ignore[union-attr]


def test_limits_hold_after_a_new_parser(pool: str) -> None:
    parser = StreamParser(max_stanza_size=5_000, max_depth=8)
    parser.feed(HEAD + b"<presence/>")
    assert parser.idle
    parser.feed(b"<message><body>")
    with pytest.raises(StreamError) as err:
        for _ in range(10):
            parser.feed(b"x" * 1000)
    assert err.value.condition == "policy-violation"
    parser = StreamParser(max_stanza_size=5_000, max_depth=8)
    parser.feed(HEAD + b"<presence/>")
    assert len(parser.feed(b"<a>" * 7 + b"</a>" * 7)) == 1  # depth 8 counts the root
    with pytest.raises(StreamError) as err:
        parser.feed(b"<a>" * 8)
    assert err.value.condition == "policy-violation"


@pytest.mark.parametrize(("data", "condition"), [
    (b"<?xml version='1.0'?>", "restricted-xml"),  # only at the very start of the stream
    (b"<!-- comment -->", "restricted-xml"),
    (b"<message>&xxe;</message>", "restricted-xml"),
    (b"<message><body>x</message>", "not-well-formed"),
    (b"<message><body>\xff\xfe</body></message>", "unsupported-encoding"),
    (b"text<presence/>", "bad-format"),
    (b"</stream>", "not-well-formed"),  # the root's name is kept
])
def test_restricted_and_broken_xml_after_a_release(pool: str, data: bytes, condition: str) -> None:
    parser = StreamParser()
    parser.feed(HEAD + b"<presence/>")
    assert parser.idle
    with pytest.raises(StreamError) as err:
        parser.feed(data)
    assert err.value.condition == condition


@pytest.mark.parametrize(("head", "close"), [(HEAD, b"</stream:stream>"),
                                             (ODD_HEAD, b"</s:stream>")])
def test_stream_closed_after_a_release(pool: str, head: bytes, close: bytes) -> None:
    parser = StreamParser()
    parser.feed(head + b"<presence/>")
    assert parser.idle
    events = parser.feed(close + b"<junk after the end")
    assert [type(e) for e in events] == [StreamClosed]
    assert parser.feed(b"<presence/>") == []


def test_an_error_of_one_stream_never_shows_in_another() -> None:
    sloppy, broken = StreamParser(), StreamParser()
    sloppy.feed(HEAD)
    broken.feed(HEAD)
    # An undefined prefix is no fatal error for libxml2, but it is logged in the parser.
    sloppy.feed(b"<secret:presence/>")
    with pytest.raises(StreamError) as err:
        broken.feed(b"<presence a='1' a='2'/>")
    assert err.value.condition == "not-well-formed"
    assert "secret" not in (err.value.text or "")
    assert "redefined" in (err.value.text or "")


def test_the_pool_is_bounded_whatever_the_openings() -> None:
    pool = parser_module._pool()
    # Streams in the middle of a stanza, then all at a boundary: more than the pool keeps.
    busy = [StreamParser() for _ in range(3 * parser_module._POOL_SIZE)]
    for parser in busy:
        parser.feed(HEAD + b"<presence>")
    for parser in busy:
        parser.feed(b"</presence>")
    assert all(parser.idle for parser in busy)
    assert len(pool.idle[OPENING]) == parser_module._POOL_SIZE
    in_use = StreamParser()
    in_use.feed(HEAD)
    for i in range(100):
        StreamParser().feed(f"<stream:stream xmlns='jabber:client' xmlns:x{i}='urn:{i}' "
                            f"xmlns:stream='http://etherx.jabber.org/streams'>".encode())
        in_use.feed(b"<presence/>")
    assert len(pool.idle) <= parser_module._POOL_OPENINGS
    assert all(len(parsers) <= parser_module._POOL_SIZE for parsers in pool.idle.values())
    # The openings used last are kept: the busy one, and the last made-up one.
    assert any("urn:99" in opening for opening in pool.idle)
    assert not any('"urn:0"' in opening for opening in pool.idle)
    assert len(pool.idle[OPENING]) == parser_module._POOL_SIZE


def test_a_parser_that_read_enough_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = parser_module._pool()
    pool.idle.clear()
    monkeypatch.setattr(parser_module, "_RETIRE_AFTER", 2 * len(HEAD))
    parser = StreamParser()
    parser.feed(HEAD)
    assert parser.idle and len(pool.idle[OPENING]) == 1
    lent = pool.idle[OPENING][0][0]
    parser.feed(b"<presence/>" * (len(HEAD) // 11 - 1))
    assert parser.idle and pool.idle[OPENING][0][0] is lent
    parser.feed(b"<presence/>")  # now at the limit: not given back
    assert parser.idle and not pool.idle[OPENING]


# Reads the fuzzers found (tests/fuzz, transports): their last bytes are a whole tag, so the
# byte-level judgement (_clean) took libxml2 to be between stanzas, but libxml2 still held them
# (a byte that is no UTF-8 start waiting for the rest of its character; an attribute without a
# value): the next stream to borrow the parser had its bytes read into what was held, and
# never saw its own <starttls/> (every later connection of the process hung).
HELD_BY_LIBXML2 = [
    b"<iq xmlns=\"jabber:client\" type=\"set\" to=\"room@muc.a.test\" id=\"r2\"><query "
    b"xmlns=\"jabber:iq:register\"/></iq><iq xmlns=\xfcjabber:client\" type=\"get\" id=\"g1\">"
    b"<vCard xmlns=\"vcard-temp\"/></iq>",
    b"<message xmlns=\"jabber:client\" to=\"alice@a.test\" type=\"chat\" id=\"b2\"><body>one"
    b"</body></message><iq xmabber:client\" type=\"set\" id=\"p3\" to=\"bob@a.test\"><purge "
    b"xmlns=\"urn:presenced:mam:purge:0\"/></iq>><a b=\'<\'/><iq xmlns=\"jabber:client\" "
    b"type=\"result\" id=\"x\"/>",
]


@pytest.mark.parametrize("held", HELD_BY_LIBXML2, ids=["not-utf8", "attribute-no-value"])
def test_a_parser_still_holding_bytes_is_not_lent(held: bytes) -> None:
    parser_module._pool().idle.clear()
    attacker = StreamParser()
    with contextlib.suppress(StreamError):  # whatever it makes of it is this stream's
        attacker.feed(HEAD + held)  # in one read, as the fuzzer sent it
    victim = StreamParser()
    victim.feed(HEAD)
    pool = parser_module._pool().idle[OPENING]
    pool.pop()  # the victim's own, given back after its header: it borrows the one before
    assert describe(victim.feed(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")) == [
        ("{urn:ietf:params:xml:ns:xmpp-tls}starttls",
         {None: "urn:ietf:params:xml:ns:xmpp-tls"},
         b'<starttls xmlns="urn:ietf:params:xml:ns:xmpp-tls"/>')]
