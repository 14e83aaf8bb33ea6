"""In-process fuzzers of the sans-IO machines: the stream parser and the c2s negotiation.

Parser oracles: only StreamError (with a defined RFC 6120 §4.9.3 condition) may come out;
what a stream yields does not depend on how its bytes were cut into reads, nor on another
stream reading at the same time (the lxml parsers are shared through a pool).
Negotiation oracles: receive() and the answer methods never raise; a stream is only ever closed
with a defined condition.
"""

from __future__ import annotations

import base64
import random
import traceback
from collections.abc import Callable

from lxml import etree

from server.errors import STREAM_ERROR_CONDITIONS, StreamError
from server.stream import negotiation as neg
from server.stream import sasl, sasl2
from server.stream.negotiation import C2SNegotiation, Policy
from server.stream.scram import derive_credentials
from server.xml import ns
from server.xml import parser as parser_module
from server.xml.parser import StreamClosed, StreamOpened, StreamParser
from tests.fuzz import harvest
from tests.fuzz.core import (
    HOSTILE,
    NUMBERS_HOSTILE,
    Budget,
    Finding,
    Report,
    bad_number,
    pick,
    shrink_list,
)

STREAMS = ns.STREAMS

# -- the stream parser ----------------------------------------------------------------------------

_HEADERS = (
    b"<?xml version='1.0'?><stream:stream to='a.test' version='1.0' xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams'>",
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
    b"to='a.test' version='1.0' xml:lang='en'>",
    b"<?xml version='1.0' encoding='UTF-8'?><stream:stream xmlns:stream="
    b"'http://etherx.jabber.org/streams' xmlns='jabber:server' version='1.0'>",
    b"<stream xmlns='http://etherx.jabber.org/streams' version='1.0'>",
    b"<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream xmlns:stream='x'>",
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
    b"version='\xc2\xb2.0' to='a.test'>",
)
_TOKENS = (
    b"<!--c-->", b"<!DOCTYPE x>", b"<!ENTITY x 'y'>", b"&amp;", b"&lt;", b"&x;", b"&#0;",
    b"&#x110000;", b"&#65;", b"&#x41;", b"&#", b"&", b"<?pi x?>", b"<?xml version='1.0'?>",
    b"<![CDATA[x<y]]>", b"<![CDATA[", b"]]>", b"\xff\xfe", b"\xc3", b"\xc3\xa9", b"\xf0\x9f\x98",
    b"\x00", b"\x0b", b"<", b">", b"'", b'"', b" ", b"\n", b"</stream:stream>",
    b"<stream:stream>", b"<a xmlns:b='x' b:c='1' b:c='2'/>", b"<a>" * 40 + b"</a>" * 40,
    b"<a xmlns='urn:x'>text</a>", b"text", b"<message><body>" + b"x" * 3000 + b"</body></message>",
    b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>", b"<x:y/>", b"<a b='<'/>",
    b"<a b='&#60;'/>", b"<a\tb='1'\n/>", b"</a>", b"<message xml:lang='\xc2\xb2'/>",
    b"<presence/>", b"<!", b"<?", b"<a b='>'/>", b"<a b=\"'\"/>", b"\r\n",
)


def _parser_pieces(rng: random.Random, header: bytes | None = None) -> list[bytes]:
    stanzas = harvest.corpus()
    whole = [header or pick_bytes(rng, _HEADERS)]
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.45 and stanzas:
            whole.append(stanzas[rng.randrange(len(stanzas))])
        else:
            whole.append(pick_bytes(rng, _TOKENS))
    data = bytearray(b"".join(whole))
    for _ in range(rng.choice((0, 0, 1, 2, 4))):  # byte-level mutations
        if not data:
            break
        at = rng.randrange(len(data))
        op = rng.random()
        if op < 0.4:
            data[at] = rng.randrange(256)
        elif op < 0.7:
            del data[at:at + rng.randint(1, 8)]
        else:
            data[at:at] = pick_bytes(rng, _TOKENS)
    # cut into reads: one, a few, or byte by byte
    cuts = sorted({rng.randrange(len(data) + 1) for _ in range(rng.choice((0, 1, 3, 10, 40)))})
    pieces, last = [], 0
    for cut in [*cuts, len(data)]:
        if cut > last:
            pieces.append(bytes(data[last:cut]))
        last = cut
    return pieces


def pick_bytes(rng: random.Random, seq: tuple[bytes, ...]) -> bytes:
    return seq[rng.randrange(len(seq))]


def _run_parser(pieces: list[bytes], max_stanza: int, max_depth: int) -> tuple[list[str], str]:
    """(events, outcome): outcome is 'ok', 'stream-error:<condition>' or 'crash:<exception>'."""
    _fresh_pool()
    parser = StreamParser(max_stanza_size=max_stanza, max_depth=max_depth)
    events: list[str] = []
    try:
        for piece in pieces:
            events += [_show(e) for e in parser.feed(piece)]
    except StreamError as err:
        return events, f"stream-error:{err.condition}"
    except Exception as exc:
        return events, f"crash:{type(exc).__name__}: {exc}\n{_where(exc)}"
    return events, "ok"


def _fresh_pool() -> None:
    """Each run starts with an empty parser pool, so that a finding replays (what earlier
    cases left in the pool would otherwise take part); sharing is what cross-stream checks."""
    parser_module._local.pool = parser_module._Pool()


def _show(event: object) -> str:
    if isinstance(event, StreamOpened):
        return f"open {event.tag} {sorted(event.attrs.items())} {event.default_ns}"
    if isinstance(event, StreamClosed):
        return "close"
    return etree.tostring(event).decode()  # type: ignore[arg-type]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return "".join(traceback.format_list(frames[-3:])).strip()


def _parser_problem(pieces: list[bytes], other: list[bytes], max_stanza: int,
                    max_depth: int) -> tuple[str, str] | None:
    """(kind, signature) of what is wrong with parsing these reads, or None."""
    events, outcome = _run_parser(pieces, max_stanza, max_depth)
    if outcome.startswith("crash:"):
        return "crash", outcome.split("\n")[0][:120]
    if outcome.startswith("stream-error:"):
        condition = outcome.partition(":")[2]
        if condition not in STREAM_ERROR_CONDITIONS:
            return "undefined-condition", condition
    whole = b"".join(pieces)
    if len(whole) < max_stanza:  # the size limit is checked per slice: cuts may move it
        one = _run_parser([whole], max_stanza, max_depth)
        if _disagree(one, (events, outcome)):
            return "cut-dependent", f"{one[1]} (one read) vs {outcome} (cut)"
        # Another stream reading between our reads (the lxml parser pool) changes nothing.
        _fresh_pool()
        mine = StreamParser(max_stanza_size=max_stanza, max_depth=max_depth)
        theirs = StreamParser()
        got: list[str] = []
        result = "ok"
        for i, piece in enumerate(pieces):
            try:
                got += [_show(e) for e in mine.feed(piece)]
            except StreamError as err:
                result = f"stream-error:{err.condition}"
                break
            except Exception:
                return None  # reported above
            if i < len(other):
                try:
                    theirs.feed(other[i])
                except Exception:
                    theirs = StreamParser()
        if _disagree((events, outcome), (got, result)):
            return "cross-stream", f"{outcome} alone vs {result} beside another stream"
    return None


def _disagree(a: tuple[list[str], str], b: tuple[list[str], str]) -> bool:
    """Two runs over the same bytes disagree when both accepted them but yielded different
    events, or one rejected a stream the other saw through to its end. (Which error is seen
    first, and whether an error in the last bytes is seen yet, may depend on the cuts.)"""
    if a[1] == "ok" and b[1] == "ok":
        if "close" in a[0] or "close" in b[0]:
            return a[0] != b[0]
        # libxml2 may not report an element's end before it has seen the next bytes
        shorter, longer = sorted((a[0], b[0]), key=len)
        return longer[:len(shorter)] != shorter or len(longer) - len(shorter) > 1
    if a[1] == "ok" or b[1] == "ok":
        accepted = a if a[1] == "ok" else b
        return "close" in accepted[0]
    return False


def fuzz_parser(rng: random.Random, budget: Budget, report: Report) -> None:
    while budget.more():
        pieces = _parser_pieces(rng)
        # the other stream often opens alike, so the two share the pool's lxml parsers
        other = _parser_pieces(rng, pieces[0] if rng.random() < 0.5 and pieces else None)
        max_stanza = rng.choice((262144, 262144, 4096, 300))
        max_depth = rng.choice((32, 32, 4))
        report.count("parser")
        problem = _parser_problem(pieces, other, max_stanza, max_depth)
        if problem is None:
            continue
        kind, _sig = problem

        def still(candidate: list[object], kind: str = kind, other: list[bytes] = other,
                  max_stanza: int = max_stanza, max_depth: int = max_depth) -> bool:
            p = _parser_problem(candidate, other, max_stanza, max_depth)  # type: ignore[arg-type]
            return p is not None and p[0] == kind

        small = shrink_list(list(pieces), still, budget)
        final = _parser_problem(small, other, max_stanza, max_depth) or problem  # type: ignore[arg-type]
        report.add(Finding("parser", kind, final[1], repr(small),
                           f"max_stanza_size={max_stanza} max_depth={max_depth}"))


# -- the c2s negotiation machine --------------------------------------------------------------------

_VERSIONS = ("1.0", "1.0", "1.9", "0.9", "2.0", "1", "1.", ".1", *NUMBERS_HOSTILE[:12],
             "1" * 5000 + ".0", "²." + "1" * 5000)
_CREDENTIALS = derive_credentials("pw", iterations=4096)


def _negotiation_vocabulary() -> harvest.FrozenVocabulary:
    return harvest.vocabulary([neg, sasl2, sasl]).frozen()


def _header(rng: random.Random) -> StreamOpened:
    attrs: dict[str, str] = {}
    if rng.random() < 0.95:
        attrs["to"] = "a.test" if rng.random() < 0.7 else rng.choice(
            ("A.TEST", "b.test", pick(rng, HOSTILE)))
    if rng.random() < 0.95:  # mostly right, so that negotiation goes on past the header
        attrs["version"] = "1.0" if rng.random() < 0.7 else pick(rng, _VERSIONS)
    if rng.random() < 0.3:
        attrs[ns.q(ns.XML, "lang")] = rng.choice(("en", "", "²", "x" * 300, "\u202e"))
    if rng.random() < 0.2:
        attrs["from"] = pick(rng, HOSTILE)
    # (lxml names an element with an undeclared prefix 'stream:stream', without a namespace)
    tag = ns.q(STREAMS, "stream") if rng.random() < 0.9 else rng.choice(
        ("{urn:x}stream", ns.q(STREAMS, "other"), "stream:stream", "stream"))
    default_ns = ns.CLIENT if rng.random() < 0.9 else rng.choice((ns.SERVER, "urn:x"))
    prefix = "stream" if rng.random() < 0.95 else "s"
    return StreamOpened(tag, attrs, default_ns, {None: default_ns, prefix: STREAMS})


def _b64(rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.3:
        return base64.b64encode(rng.choice((
            b"\0fuzz\0pw", b"n,,n=fuzz,r=abc", b"n,,n=,r=", b"p=tls-exporter,,n=fuzz,r=x",
            b"\0" * 3, b"fuzz\0fuzz\0pw", "\0²\0pw".encode(), b"\xff\xfe"))).decode()
    if choice < 0.5:
        return rng.choice(("=", "", "!!!", "a", "YQ", "YQ==="))
    return base64.b64encode(rng.randbytes(rng.randint(0, 40))).decode()


def _element(rng: random.Random, voc: harvest.FrozenVocabulary, depth: int = 0) -> etree._Element:
    known = harvest.elements()
    if known and rng.random() < 0.4:  # one the suite writes, its numbers made invalid
        el = etree.fromstring(known[rng.randrange(len(known))])
        if rng.random() < 0.3:
            el.append(etree.fromstring(known[rng.randrange(len(known))]))
        for node in el.iter():
            for name in node.attrib:
                if name in voc.numeric and rng.random() < 0.7:
                    node.set(name, bad_number(rng))
        return el
    namespaces = list(voc.elements)
    if rng.random() < 0.15:
        xml = rng.choice((
            f"<iq xmlns='{ns.CLIENT}' type='set' id='b'><bind xmlns='{ns.BIND}'><resource>r"
            "</resource></bind></iq>",
            f"<message xmlns='{ns.CLIENT}' to='b@a.test'/>",
            f"<enable xmlns='{sasl2.SM}'/>", f"<resume xmlns='{sasl2.SM}' previd='x' h='²'/>"))
        return etree.fromstring(xml)
    namespace = pick(rng, namespaces)
    el = etree.Element(ns.q(namespace, pick(rng, voc.elements[namespace])))
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        name = pick(rng, voc.numeric) if voc.numeric and rng.random() < 0.3 else pick(
            rng, voc.attributes)
        el.set(name, _value(rng, name in voc.numeric))
    if rng.random() < 0.5:
        el.text = _b64(rng)
    if depth < 2:
        same = voc.elements[namespace]
        for _ in range(rng.choice((0, 0, 1, 2, 3))):
            if rng.random() < 0.5:
                child = etree.SubElement(el, ns.q(namespace, pick(rng, same)))
                for _ in range(rng.choice((0, 1, 2))):
                    name = pick(rng, voc.attributes)
                    child.set(name, _value(rng, name in voc.numeric))
                if rng.random() < 0.5:
                    child.text = _b64(rng)
            else:  # another namespace's element (SASL2 carries FAST, Bind 2, SM inside)
                el.append(_element(rng, voc, depth + 1))
    return el


def _value(rng: random.Random, numeric: bool) -> str:
    r = rng.random()
    if numeric and r < 0.6:
        return bad_number(rng)
    if r < 0.4:
        return pick(rng, HOSTILE)
    return rng.choice(("1", "0", "true", "false", "PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256",
                       "HT-SHA-256-NONE", "fuzz", "a.test", "fuzz@a.test", "x"))


Step = tuple[str, object]  # ("open", StreamOpened) | ("element", _Element) | ("tls", None)


def _negotiation_steps(rng: random.Random, voc: harvest.FrozenVocabulary) -> list[Step]:
    steps: list[Step] = [("open", _header(rng))]
    known = harvest.elements()
    if known and rng.random() < 0.5:  # first, one the suite writes (an <auth/>, <authenticate/>)
        el = etree.fromstring(known[rng.randrange(len(known))])
        for node in el.iter():
            for name in node.attrib:
                if name in voc.numeric and rng.random() < 0.8:
                    node.set(name, bad_number(rng))
        steps.append(("element", el))
    for _ in range(rng.randint(1, 10)):
        r = rng.random()
        if r < 0.08:
            steps.append(("open", _header(rng)))
        elif r < 0.12:
            steps.append(("close", None))
        else:
            steps.append(("element", _element(rng, voc)))
    return steps


def _drive(steps: list[Step], policy: Policy, direct_tls: bool) -> str | None:
    """Run the steps, answering the machine's requests like the connection would; the
    problem found, or None."""
    machine = C2SNegotiation(policy, direct_tls=direct_tls)
    pending: list[neg.Action] = []

    def act(call: Callable[[], list[neg.Action]]) -> None:
        pending.extend(call())

    try:
        for kind, payload in steps:
            if kind == "open":
                act(lambda p=payload: machine.receive(p))  # type: ignore[misc]
            elif kind == "close":
                act(lambda: machine.receive(StreamClosed()))
            else:
                act(lambda p=payload: machine.receive(p))  # type: ignore[misc]
            while pending:
                action = pending.pop(0)
                if isinstance(action, neg.StartTLS):
                    machine.tls_established()
                elif isinstance(action, neg.LookupCredentials):
                    found = _CREDENTIALS if action.user == "fuzz" else None
                    act(lambda f=found: machine.credentials(f))  # type: ignore[misc]
                elif isinstance(action, neg.VerifyToken):
                    act(lambda: machine.token_verified(None))
                elif isinstance(action, neg.BindResource):
                    act(lambda a=action: machine.bound(a.iq, "fuzz@a.test/r"))  # type: ignore[misc]
                elif isinstance(action, neg.BindInline):
                    act(lambda: machine.inline_bound("fuzz@a.test/r", []))
                elif isinstance(action, neg.ResumeInline):
                    failed = etree.Element(ns.q(sasl2.SM, "failed"))
                    act(lambda f=failed: machine.inline_resumed(f, None))  # type: ignore[misc]
                elif isinstance(action, neg.IssueToken):
                    act(lambda: machine.token_issued("token", "2030-01-01T00:00:00Z"))
                elif isinstance(action, neg.CloseStream):
                    if action.condition is not None and \
                            action.condition not in STREAM_ERROR_CONDITIONS:
                        return f"undefined-condition|{action.condition}"
                elif isinstance(action, neg.PreBindElement):
                    pass  # no module takes it: the connection closes the stream
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "/server/" in f.filename]  # the defect's place, not lxml's
        last = (ours or frames or [None])[-1]
        where = f"{last.filename.rsplit('/', 2)[-1]}:{last.lineno}" if last else "?"
        return f"crash|{type(exc).__name__} at {where}|{str(exc)[:200]}"
    return None


def _show_step(step: Step) -> str:
    kind, payload = step
    if kind == "open":
        assert isinstance(payload, StreamOpened)
        return f"open(tag={payload.tag!r}, attrs={payload.attrs!r}, ns={payload.default_ns!r})"
    if kind == "element":
        return etree.tostring(payload).decode()  # type: ignore[arg-type]
    return kind


def fuzz_negotiation(rng: random.Random, budget: Budget, report: Report) -> None:
    voc = _negotiation_vocabulary()
    while budget.more():
        policy = Policy(domains=frozenset({"a.test", "b.test"}),
                        require_starttls=rng.random() < 0.5, allow_plain=rng.random() < 0.7,
                        tls_available=rng.random() < 0.9, sasl2=rng.random() < 0.8)
        direct_tls = rng.random() < 0.5
        steps = _negotiation_steps(rng, voc)
        report.count("negotiation")
        problem = _drive(steps, policy, direct_tls)
        if problem is None:
            continue
        kind, signature, detail = [*problem.split("|"), ""][:3]

        def still(candidate: list[object], problem: str = problem, policy: Policy = policy,
                  direct_tls: bool = direct_tls) -> bool:
            got = _drive(candidate, policy, direct_tls)  # type: ignore[arg-type]
            return got is not None and got.partition("|")[0] == problem.partition("|")[0]

        small = shrink_list(list(steps), still, budget)
        report.add(Finding("negotiation", kind, signature,
                           " ; ".join(_show_step(s) for s in small),  # type: ignore[arg-type]
                           f"{detail} policy={policy} direct_tls={direct_tls}"))
