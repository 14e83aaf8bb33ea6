"""Sans-IO XMPP stream parser on lxml's incremental parser: bytes in, events out.

Events: StreamOpened (the root's start tag), complete top-level elements (stanzas and
negotiation elements, detached from the root so memory stays flat), StreamClosed.

RFC 6120 §11 is enforced on the raw bytes before lxml sees them: bytes.find (memchr speed)
finds the only places where restricted constructs can start (`<!`, `<?`, `&`); bytes whose
meaning depends on what follows are held back until the next feed.
Detaching loses the root's default-namespace declaration, so a stanza is deep-copied first:
a detached `{jabber:client}message` then serialises as `<message xmlns="jabber:client">…`
instead of with generated `ns0:` prefixes (+1.4 µs per stanza). The copy's document still
refers to this parser: an element kept for long must go through
`server.xml.stanza.standalone()`, or it pins the parser's ~10 KiB libxml2 context.

An idle stream holds no lxml parser. A read that ends at a stanza boundary (depth 1, the last
bytes a complete tag then whitespace, so libxml2 holds nothing but whitespace) gives its lxml
parser back to a per-thread pool keyed by the stream's opening tag (name and namespace
declarations). The next read borrows any parser with the same key. These parsers are
interchangeable: between stanzas, all a parser holds is the root's namespace context. If the
pool has none, a new parser reads a synthetic opening tag first. Most reads end at a boundary,
so one parser serves most streams. This saves ~13 KiB of RSS per idle TLS session (bench memory
scenario: 42.7 -> 29.7 KiB). Giving back and borrowing cost ~1 µs per read; a new parser would
cost 10 µs. Error text is taken from the stream's own fatal error, never from what other
streams left in a shared parser's log.
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from typing import TypeAlias

from lxml import etree

from server.errors import StreamError

_PREDEFINED = frozenset({b"amp", b"lt", b"gt", b"quot", b"apos"})
_CHARREF = re.compile(rb"#(?:[0-9]{1,7}|x[0-9a-fA-F]{1,6})\Z")
_ENCODING = re.compile(rb"""encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_CDATA = b"<![CDATA["
_SLICE = 16384
_WHITESPACE = b" \t\r\n"
_BLANK = re.compile(rb"[ \t\r\n]*\Z")
# What libxml2 has read whole, holding nothing but whitespace: text and tags (each ending at
# its first '>' outside quotes, as libxml2 looks for it) or CDATA sections, then whitespace.
# See StreamParser._clean.
_BETWEEN_TAGS = re.compile(
    rb"""(?:[^<]*(?:<!\[CDATA\[(?:[^\]]|\](?!\]>))*\]\]>|<[^<>"']*(?:(?:"[^"]*"|'[^']*')[^<>"']*)*>))*"""
    rb"""[ \t\r\n]*\Z""")
_UNCHECKED_MAX = 1 << 20  # bytes kept to judge a parser clean; beyond, the stream keeps it
_POOL_OPENINGS = 4        # stream openings (c2s, s2s in and out, ...) with idle lxml parsers kept
_POOL_SIZE = 8            # idle lxml parsers kept per opening (per thread)
_RETIRE_AFTER = 64 << 20  # bytes one lxml parser reads before it is let go (bounds its counters)
_ESCAPE = str.maketrans({"&": "&amp;", "<": "&lt;", '"': "&quot;", "\t": "&#9;", "\n": "&#10;",
                         "\r": "&#13;"})


@dataclass(frozen=True, slots=True)
class StreamOpened:
    tag: str
    attrs: dict[str, str]
    default_ns: str | None
    nsmap: dict[str | None, str]


@dataclass(frozen=True, slots=True)
class StreamClosed:
    pass


Event: TypeAlias = StreamOpened | StreamClosed | etree._Element


class StreamParser:
    __slots__ = ("_closed", "_depth", "_fed", "_held", "_in_cdata", "_max_depth", "_max_stanza",
                 "_offset", "_opening", "_parser", "_pool", "_root", "_since_stanza",
                 "_unchecked")

    def __init__(self, max_stanza_size: int = 262144, max_depth: int = 32) -> None:
        self._parser: etree.XMLPullParser | None = None  # made or borrowed by feed()
        self._pool = _pool()
        self._opening: str | None = None  # the pool key, once the stream is open
        self._fed = 0  # bytes the lxml parser has read, from any stream
        # The bytes fed since the parser last held nothing (None: too many to judge, so the
        # parser is never given back); see _give_back.
        self._unchecked: bytes | None = b""
        self._max_stanza = max_stanza_size
        self._max_depth = max_depth
        self._root: etree._Element | None = None
        self._depth = 0
        self._held = b""
        self._in_cdata = False
        self._offset = 0
        self._since_stanza = 0
        self._closed = False

    def feed(self, data: bytes) -> list[Event]:
        if self._closed:
            return []
        if self._held:
            data = self._held + data
            self._held = b""
        try:
            decided = self._scan(data)
        except _Restricted as restricted:
            # What comes before the restricted construct is read first: a stream that ends
            # there has ended, whatever follows (as when the bytes arrive in two reads).
            out = self._parse(data[:restricted.at]) if restricted.at else []
            if self._closed:
                return out
            raise restricted.error from None
        if decided < len(data):
            self._held = data[decided:]
            data = data[:decided]
        return self._parse(data)

    def _parse(self, data: bytes) -> list[Event]:
        """Feed decided bytes to lxml; the events they complete."""
        if not data:
            return []
        self._offset += len(data)
        parser = self._parser
        if parser is None:
            if data[0] in _WHITESPACE and self._opening is not None and _BLANK.match(data):
                # Whitespace between stanzas (keepalives) needs no parser.
                self._since_stanza += len(data)
                if self._since_stanza > self._max_stanza:
                    raise StreamError("policy-violation", "stanza too large")
                return []
            parser = self._borrow()
        self._fed += len(data)
        unchecked = self._unchecked
        if unchecked:  # a stanza across reads: judged on all of it
            unchecked += data
            self._unchecked = unchecked if len(unchecked) <= _UNCHECKED_MAX else None
        elif unchecked is not None:
            self._unchecked = data
        out: list[Event] = []
        # Large reads are fed in slices so the size limit holds within one slice of slack.
        for start in range(0, len(data), _SLICE):
            piece = data[start:start + _SLICE]
            self._since_stanza += len(piece)
            try:
                parser.feed(piece)
                out += self._events()
            except etree.XMLSyntaxError as exc:
                # Bytes after </stream:stream> are no error of the stream: it has ended.
                out += self._events()
                if self._closed:
                    return out
                # str(exc) names the parser's first logged error, which may be an earlier
                # non-fatal one of another stream: the fatal one is this stream's own (a parser
                # with a fatal error is never given back).
                fatal = parser.feed_error_log.filter_from_fatals()
                message = fatal[-1].message if fatal else "not well-formed"
                if "encoding" in message.lower() or "UTF-8" in message:
                    raise StreamError("unsupported-encoding", "only UTF-8 is allowed") from exc
                raise StreamError("not-well-formed", message[:200]) from exc
            if self._closed:
                break
            if self._since_stanza > self._max_stanza and self._depth >= 1:
                raise StreamError("policy-violation", "stanza too large")
        if self._depth == 1 and not self._closed and not self._in_cdata and self._clean():
            self._give_back(parser)
        return out

    def _clean(self) -> bool:
        """Whether libxml2 holds nothing of this stream, judged on everything fed since it last
        held nothing: tag after tag (CDATA sections whole), then whitespace. A tag ends at the
        first '>' outside quotes, where any quote opens a quoted stretch until the same quote
        comes again: libxml2's push parser looks for a tag's end that way (xmlParseLookupGt)
        and holds the bytes until it finds it. Judging only the last tag was not enough: after
        '<iq xmlns=\xfcjabber:client" ...' (found by the fuzzers) every quote that follows is
        paired one off, libxml2 held the rest, and the next stream to borrow the parser had
        its bytes read into that tag (its <starttls/> never came out). Comments and processing
        instructions never get here (refused before)."""
        data = self._unchecked
        if not data:
            return False
        return _BETWEEN_TAGS.match(data) is not None

    @property
    def idle(self) -> bool:
        """True while it holds no lxml parser (none yet, or given back between stanzas)."""
        return self._parser is None

    def _borrow(self) -> etree.XMLPullParser:
        opening = self._opening
        lent = self._pool.take(opening) if opening is not None else None
        if lent is not None:
            self._parser, self._root, self._fed = lent
            return lent[0]
        parser = self._parser = _lxml_parser()
        self._fed = 0
        if opening is not None:
            # A new parser enters the stream through the same opening tag, unseen by the caller.
            parser.feed(opening.encode())
            for _event, root in parser.read_events():
                self._root = root
        return parser

    def _give_back(self, parser: etree.XMLPullParser) -> None:
        """Between stanzas: let the next read of any stream with this opening use the parser."""
        assert self._opening is not None and self._root is not None
        if self._fed < _RETIRE_AFTER:
            self._pool.give(self._opening, (parser, self._root, self._fed))
        self._parser = None
        self._root = None
        self._unchecked = b""

    def _events(self) -> list[Event]:
        out: list[Event] = []
        max_depth = self._max_depth
        assert self._parser is not None
        for event, el in self._parser.read_events():
            if event == "start":
                self._depth += 1
                if self._depth == 1:
                    self._root = el
                    nsmap = dict(el.nsmap)
                    self._opening = _opening(el, nsmap)
                    out.append(StreamOpened(el.tag, dict(el.attrib), nsmap.get(None), nsmap))
                elif self._depth > max_depth:
                    raise StreamError("policy-violation", "elements nested too deeply")
                continue
            self._depth -= 1
            depth = self._depth
            if depth == 1:
                root = self._root
                assert root is not None
                # Text after the stanza that came in the same read is its tail: judged here,
                # as it would be as the root's text had the read ended after the stanza
                # (RFC 6120 §11.7: no character data between top-level elements).
                _check_text(el.tail)
                _check_text(root.text)
                # lxml's element copy: copy.deepcopy's memo and dispatch cost more than it.
                stanza = el.__copy__()
                stanza.tail = None
                root.remove(el)
                root.text = None
                out.append(stanza)
                self._since_stanza = 0
            elif depth == 0:
                self._closed = True
                out.append(StreamClosed())
                break
        root = self._root
        if root is not None and root.text is not None:
            _check_text(root.text)
            root.text = None
        return out

    def _scan(self, data: bytes) -> int:
        """How many leading bytes are decided; _Restricted where restricted XML starts."""
        pos = 0
        n = len(data)
        # Where each construct comes next, at or after pos (n: nowhere). bytes.find is a
        # memchr-speed scan: a regex alternation tests every byte against a character set
        # (re.search of <!|<\?|& cost ~50 instructions per byte read, 5% of the 1:1 path).
        amp = bang = pi = -1
        while True:
            if self._in_cdata:
                end = data.find(b"]]>", pos)
                if end < 0:
                    return n - (2 if data.endswith(b"]]") else 1 if data.endswith(b"]") else 0)
                self._in_cdata = False
                pos = end + 3
                continue
            if amp < pos:
                amp = data.find(b"&", pos) % (n + 1)  # -1 (not found) becomes n
            if bang < pos:
                bang = data.find(b"<!", pos) % (n + 1)
            if pi < pos:
                pi = data.find(b"<?", pos) % (n + 1)
            start = min(amp, bang, pi)
            if start == n:
                return n - 1 if data.endswith(b"<") else n
            token = b"&" if start == amp else data[start:start + 2]
            if token == b"&":
                semi = data.find(b";", start, start + 12)
                if semi < 0:
                    if n - start < 12:
                        return start
                    raise _Restricted(start, "restricted-xml", "entity references are not allowed")
                name = data[start + 1:semi]
                if name not in _PREDEFINED and not _CHARREF.match(name):
                    raise _Restricted(start, "restricted-xml",
                                      "only predefined entities are allowed")
                pos = semi + 1
            elif token == b"<?":
                if self._offset + start != 0:
                    raise _Restricted(start, "restricted-xml",
                                      "processing instructions are not allowed")
                end = data.find(b"?>", start)
                if end < 0:
                    return start  # the XML declaration is still arriving
                declaration = data[start:end]
                if not declaration[2:5] == b"xml" or declaration[5:6] not in (b" ", b"\t",
                                                                            b"\r", b"\n"):
                    raise _Restricted(start, "restricted-xml",
                                      "processing instructions are not allowed")
                encoding = _ENCODING.search(declaration)
                if encoding and encoding.group(1).lower() not in (b"utf-8", b"utf8"):
                    raise _Restricted(start, "unsupported-encoding", "only UTF-8 is allowed")
                pos = end + 2
            else:  # "<!"
                if n - start < len(_CDATA):
                    if _CDATA.startswith(data[start:]):
                        return start
                    raise _Restricted(start, "restricted-xml", "comments and DTDs are not allowed")
                if data[start:start + len(_CDATA)] != _CDATA:
                    raise _Restricted(start, "restricted-xml", "comments and DTDs are not allowed")
                self._in_cdata = True
                pos = start + len(_CDATA)


class _Restricted(Exception):
    """Restricted XML (RFC 6120 §11.1) at offset `at` of the bytes scanned."""

    def __init__(self, at: int, condition: str, text: str) -> None:
        super().__init__(text)
        self.at = at
        self.error = StreamError(condition, text)


def _check_text(text: str | None) -> None:
    if text is not None and text.strip():
        raise StreamError("bad-format", "text is not allowed between stanzas")


def _lxml_parser() -> etree.XMLPullParser:
    return etree.XMLPullParser(
        events=("start", "end"), resolve_entities=False, no_network=True, load_dtd=False,
        huge_tree=False, remove_comments=False, remove_pis=False)


def _opening(root: etree._Element, nsmap: dict[str | None, str]) -> str:
    """The root's start tag reduced to its name and namespace declarations. A new parser that
    reads it reads later stanzas the same way as the original one, and </stream:stream> still
    matches. Interned, so streams with the same opening share one string."""
    tag = root.tag
    prefix = root.prefix
    key = (tag, prefix, tuple(nsmap.items()))
    opening = _OPENINGS.get(key)
    if opening is not None:
        return opening
    name = tag[tag.index("}") + 1:] if tag[0] == "{" else tag
    if prefix:
        name = f"{prefix}:{name}"
    declarations = "".join(
        f' xmlns{":" + p if p else ""}="{uri.translate(_ESCAPE)}"'
        for p, uri in sorted(nsmap.items(), key=lambda item: item[0] or ""))
    opening = sys.intern(f"<{name}{declarations}>")
    if len(_OPENINGS) < _POOL_OPENINGS * 4:
        _OPENINGS[key] = opening  # saves 3 µs per stream; made-up openings fill it, no more
    return opening


_OPENINGS: dict[tuple[str, str | None, tuple[tuple[str | None, str], ...]], str] = {}


_Lent: TypeAlias = tuple[etree.XMLPullParser, etree._Element, int]  # parser, its root, bytes read


class _Pool:
    """lxml parsers at a stanza boundary, by stream opening. Few openings are kept, the least
    recently used goes first: streams with made-up openings cannot hold on to memory, nor push
    out the parsers of the openings in use."""

    __slots__ = ("idle",)

    def __init__(self) -> None:
        self.idle: dict[str, list[_Lent]] = {}  # least recently given first

    def take(self, opening: str) -> _Lent | None:
        parsers = self.idle.get(opening)
        return parsers.pop() if parsers else None

    def give(self, opening: str, lent: _Lent) -> None:
        idle = self.idle
        parsers = idle.pop(opening, None)
        if parsers is None:
            parsers = []
            if len(idle) >= _POOL_OPENINGS:
                del idle[next(iter(idle))]
        idle[opening] = parsers
        if len(parsers) < _POOL_SIZE:
            parsers.append(lent)


_local = threading.local()


def _pool() -> _Pool:
    """This thread's pool: an lxml parser stays in the thread that made it."""
    try:
        pool: _Pool = _local.pool
    except AttributeError:
        pool = _local.pool = _Pool()
    return pool
