"""The stanza fuzzer: well-formed iq, message and presence stanzas with hostile attribute
values, sent by an authenticated client over a real socket.

Targets are read off the running server, nothing is listed by hand: every entry of the
router's iq handler table (type, target, namespace, element) and of each service's own
(server/services.py), every service host (muc, pubsub, upload, echo, components' domains)
with the vocabulary of the module behind it, and
the stanzas the test suite sends (harvest.corpus), mutated.

Oracles, for every case:
- an iq get/set is answered (result or error) within ANSWER_TIMEOUT;
- no answer is internal-server-error, and no traceback reaches the server's log;
- the stream stays open, and the server still answers a ping afterwards;
- an attribute the server reads as a number (harvest: int()/parse_int/isdigit of its value)
  given an invalid number is not silently ignored: when '1' there changes the result, the
  invalid value must not give the same result as leaving the attribute out
  (pubsub <items max_items='-5'/> answering the whole node is caught this way).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from server.xml import ns
from tests.conftest import RunningServer
from tests.fuzz import harvest, target
from tests.fuzz.core import (
    HOSTILE,
    JIDS_HOSTILE,
    NUMBERS_HOSTILE,
    TEXT_HOSTILE,
    Budget,
    Finding,
    Report,
    bad_number,
    pick,
)
from tests.rawclient import CLIENT, STANZAS, RawClient, StreamClosedError

ANSWER_TIMEOUT = 10.0
_IQ, _MESSAGE, _PRESENCE = (f"{{{CLIENT}}}{k}" for k in ("iq", "message", "presence"))
_NORMAL = ("1", "2", "0", "true", "false", "fuzz", "Fuzz", "alice@a.test", "bob@a.test",
           "bob@a.test/raw", "a.test", "fuzzroom@muc.a.test", "fuzzroom@muc.a.test/Fuzz",
           "current", "1", "item1", "chat", "get", "set", "en", "max", "owner", "member",
           "participant", "moderator", "none", "outcast", "open", "submit", "form", "cancel",
           "2030-01-01T00:00:00Z", "text/plain", "fuzz.txt", "urn:xmpp:microblog:0")
_TYPES = {"iq": ("get", "set"), "message": ("chat", "normal", "groupchat", "headline", "error"),
          "presence": ("", "unavailable", "subscribe", "subscribed", "unsubscribe", "probe",
                       "error")}


@dataclass
class Case:
    stanza: etree._Element
    origin: str                       # corpus, table, service
    hostile_numbers: list[tuple[etree._Element, str]] = field(default_factory=list)


@dataclass
class Outcome:
    answer: etree._Element | None = None   # the reply to our id (iq), or an error to it
    errors: list[str] = field(default_factory=list)  # conditions of errors to our id
    timed_out: bool = False
    closed: str | None = None             # the stream ended: its condition
    tracebacks: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)


class Targets:
    """What to fuzz, read off the running server."""

    def __init__(self, running: RunningServer) -> None:
        server = running.server
        # (type, target: host/self/bare or a service's JID, namespace, element, vocabulary)
        self.iq_table: list[tuple[str, str, str, str, harvest.FrozenVocabulary]] = []
        for (type_, kind, xmlns, name), handler in sorted(server.router._iq.items(),
                                                           key=lambda kv: kv[0]):
            voc = harvest.vocabulary(harvest.modules_of(handler)).frozen()
            self.iq_table.append((type_, kind, xmlns, name, voc))
        self.service_domains = frozenset(server.router.services)
        self.services: list[tuple[str, harvest.FrozenVocabulary]] = []
        # and the namespaces each says it speaks (its disco features), tried first
        self.spoken: dict[str, tuple[str, ...]] = {}
        for domain, route in sorted(server.router.services.items()):
            voc = harvest.vocabulary(harvest.modules_of(route)).frozen()
            self.services.append((domain, voc))
            owner = getattr(route, "__self__", None)
            features = (*getattr(owner, "service_features", ()), *getattr(owner, "features", ()))
            self.spoken[domain] = tuple(f for f in features if f in voc.elements)
            # a service's own iq table (handlers declared to="service" / "service-bare")
            declared = getattr(owner, "service_iq_handlers", None)
            for iq_route, _handler in (declared() if callable(declared) else ()):
                for kind in iq_route.targets:
                    to = domain if kind == "service" else f"fuzzroom@{domain}"
                    self.iq_table.append((iq_route.type, to, iq_route.xmlns, iq_route.name, voc))
        everything = harvest.Vocabulary()
        for module in server.modules.values():
            everything.merge(harvest.vocabulary(harvest.modules_of(module)))
        self.all = everything.frozen()
        self.corpus = [etree.fromstring(x) for x in harvest.corpus()]
        # the corpus stanzas with an attribute the server reads as a number
        self.numeric_corpus = [s for s in self.corpus if any(
            name in self.all.numeric for el in s.iter() for name in el.attrib)]
        # attributes (with example values) the suite puts on each element
        self.examples: dict[str, dict[str, list[str]]] = {}
        for stanza in self.corpus:
            for el in stanza.iter():
                if el is stanza or not isinstance(el.tag, str):
                    continue
                attrs = self.examples.setdefault(el.tag, {})
                for name, value in el.attrib.items():
                    if "{" not in name:
                        values = attrs.setdefault(name, [])
                        if value not in values:
                            values.append(value)


# -- making cases ------------------------------------------------------------------------------------

def _value(rng: random.Random, name: str, voc: harvest.FrozenVocabulary,
           case: Case, el: etree._Element) -> str:
    if name in voc.numeric and rng.random() < 0.7:
        value = bad_number(rng)
        case.hostile_numbers.append((el, name))
        return value
    r = rng.random()
    if r < 0.25:
        value = bad_number(rng)
        if name in voc.numeric:
            case.hostile_numbers.append((el, name))
        return value
    if r < 0.4:
        return pick(rng, TEXT_HOSTILE)
    if r < 0.55:
        return pick(rng, JIDS_HOSTILE)
    if name in _PREFERRED and rng.random() < 0.6:
        return _PREFERRED[name]
    return pick(rng, _NORMAL)


_PREFERRED = {"node": "fuzz", "jid": "bob@a.test", "nick": "Fuzz", "filename": "fuzz.txt"}


def _random_element(rng: random.Random, voc: harvest.FrozenVocabulary, namespace: str | None,
                    case: Case, depth: int = 0, targets: Targets | None = None) -> etree._Element:
    namespaces = [n for n in voc.elements if n != CLIENT] or list(voc.elements)
    if namespace is None or namespace not in voc.elements:
        namespace = pick(rng, namespaces)
    el = etree.Element(ns.q(namespace, pick(rng, voc.elements[namespace])),
                       nsmap={None: namespace})
    _decorate(rng, el, voc, case, depth, targets)
    return el


def _decorate(rng: random.Random, el: etree._Element, voc: harvest.FrozenVocabulary,
              case: Case, depth: int, targets: Targets | None = None) -> None:
    namespace = etree.QName(el).namespace
    examples = targets.examples.get(el.tag) if targets is not None else None
    if examples and rng.random() < 0.7:
        # the attributes the suite gives this element, with a value it uses
        for name, values in examples.items():
            el.set(name, _PREFERRED.get(name) if name in _PREFERRED and rng.random() < 0.5
                   else pick(rng, values))
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        if voc.numeric and rng.random() < 0.4:
            name = pick(rng, voc.numeric)
        elif voc.attributes:
            name = pick(rng, voc.attributes)
        else:
            break
        el.set(name, _value(rng, name, voc, case, el))
    if rng.random() < 0.2:
        el.text = pick(rng, (*_NORMAL, *HOSTILE))
    if depth < 2 and voc.elements:
        for _ in range(rng.choice((0, 0, 1, 1, 2))):
            same = namespace if rng.random() < 0.8 else None
            el.append(_random_element(rng, voc, same, case, depth + 1, targets))


def _table_case(rng: random.Random, targets: Targets, ids: Iterator[int]) -> Case:
    type_, kind, xmlns, name, voc = targets.iq_table[rng.randrange(len(targets.iq_table))]
    case = Case(etree.Element(_IQ, nsmap={None: CLIENT}), "table")
    iq = case.stanza
    iq.set("type", type_)
    to = {"host": rng.choice(("a.test", "b.test")), "bare": "bob@a.test",
          "self": rng.choice((None, "alice@a.test"))}.get(kind, kind)  # else a service's JID
    if to is not None and to.startswith("fuzzroom@") and rng.random() < 0.5:
        to = to.replace("fuzzroom@", f"room{rng.randrange(10000)}@")
    if to is not None:
        iq.set("to", to)
    payload = etree.SubElement(iq, ns.q(xmlns, name), nsmap={None: xmlns})
    _decorate(rng, payload, voc, case, 0, targets)
    return case


def _service_case(rng: random.Random, targets: Targets, ids: Iterator[int]) -> Case:
    domain, voc = targets.services[rng.randrange(len(targets.services))]
    kind = rng.choice(("iq", "iq", "iq", "iq", "message", "message", "message", "presence",
                       "presence", "presence"))
    room = "fuzzroom" if rng.random() < 0.4 else f"room{rng.randrange(10000)}"  # joins anew
    if kind == "presence" and rng.random() < 0.8:
        to = f"{room}@{domain}/{rng.choice(('Fuzz', 'Bob'))}"  # an occupant: a join
    else:
        to = rng.choice((domain, f"{room}@{domain}", f"{room}@{domain}/Fuzz",
                         f"{room}@{domain}/Bob"))
    case = Case(etree.Element(f"{{{CLIENT}}}{kind}", nsmap={None: CLIENT}), "service")
    stanza = case.stanza
    stanza.set("to", to)
    type_ = "" if kind != "iq" and rng.random() < 0.7 else pick(rng, _TYPES[kind])
    if type_:
        stanza.set("type", type_)
    spoken = targets.spoken.get(domain, ())
    if voc.elements:
        for _ in range(1 if kind == "iq" else rng.choice((0, 1, 2))):
            namespace = pick(rng, spoken) if spoken and rng.random() < 0.8 else None
            stanza.append(_random_element(rng, voc, namespace, case, 0, targets))
    if kind == "iq" and len(stanza) == 0:
        stanza.append(etree.Element(ns.q(ns.PING, "ping")))
    return case


def _corpus_case(rng: random.Random, targets: Targets, ids: Iterator[int]) -> Case:
    pool = targets.numeric_corpus if targets.numeric_corpus and rng.random() < 0.3 \
        else targets.corpus
    original = pool[rng.randrange(len(pool))]
    case = Case(copy.deepcopy(original), "corpus")
    stanza = case.stanza
    stanza.attrib.pop("from", None)
    if etree.QName(stanza).localname == "iq" and stanza.get("type") not in ("get", "set"):
        stanza.set("type", rng.choice(("get", "set")))
    to = stanza.get("to") or ""
    _local, at, rest = to.partition("@")
    if at and rest.split("/")[0] in targets.service_domains and rng.random() < 0.5:
        stanza.set("to", f"room{rng.randrange(10000)}@{rest}")  # a room joined anew
    voc = targets.all
    elements = list(stanza.iter())
    numeric = [(el, name) for el in elements for name in el.attrib if name in voc.numeric]
    if numeric and rng.random() < 0.6:  # a number the server reads, made invalid
        el, name = numeric[rng.randrange(len(numeric))]
        el.set(name, bad_number(rng))
        case.hostile_numbers.append((el, name))
        if rng.random() < 0.7:
            return case
    for _ in range(rng.choice((1, 1, 2, 3))):
        el = elements[rng.randrange(len(elements))]
        op = rng.random()
        if op < 0.45 and el is not stanza:  # an existing attribute, or a new one, made hostile
            names = [a for a in el.attrib if "{" not in a]
            if names and rng.random() < 0.6:
                name = pick(rng, names)
            elif voc.numeric and rng.random() < 0.5:
                name = pick(rng, voc.numeric)
            else:
                name = pick(rng, voc.attributes)
            el.set(name, _value(rng, name, voc, case, el))
            if name in voc.numeric and (el, name) not in case.hostile_numbers \
                    and el.get(name) in NUMBERS_HOSTILE:
                case.hostile_numbers.append((el, name))
        elif op < 0.6:
            el.text = pick(rng, (*HOSTILE, *_NORMAL))
        elif op < 0.75 and el is not stanza:
            namespace = etree.QName(el).namespace
            el.append(_random_element(rng, voc, namespace, case, 2, targets))
        elif op < 0.85 and len(el) and el is not stanza:
            el.remove(el[rng.randrange(len(el))])
        elif op < 0.92:
            stanza.set("to", pick(rng, (*JIDS_HOSTILE, *_NORMAL[6:12])))
        else:
            kind = etree.QName(stanza).localname
            stanza.set("type", pick(rng, (*_TYPES.get(kind, ("",)), *HOSTILE[:6])))
    return case


def make_case(rng: random.Random, targets: Targets, ids: Iterator[int]) -> Case:
    r = rng.random()
    if r < 0.45 and targets.corpus:
        case = _corpus_case(rng, targets, ids)
    elif r < 0.75:
        case = _table_case(rng, targets, ids)
    else:
        case = _service_case(rng, targets, ids)
    return case


# -- running cases -------------------------------------------------------------------------------

class Attacker:
    """alice, who sends the cases, and bob, online to receive what is sent to him (both answer
    iqs other entities send them, as a client must, RFC 6120 §8.2.3)."""

    def __init__(self, running: RunningServer, watch: target.LogWatch) -> None:
        self.running = running
        self.watch = watch
        self.alice: RawClient | None = None
        self.bob: RawClient | None = None
        self._bob_task: asyncio.Task[None] | None = None
        self.ids = itertools.count(1)

    async def connect(self) -> None:
        await self.close()
        self.alice = await target.login(self.running, "alice@a.test")
        self.bob = await target.login(self.running, "bob@a.test")
        await self.bob.send("<presence/>")
        await self.alice.send("<presence/>")
        self._bob_task = asyncio.ensure_future(self._serve_bob(self.bob))

    async def close(self) -> None:
        if self._bob_task is not None:
            self._bob_task.cancel()
            self._bob_task = None
        await target.close_quietly(self.alice)
        await target.close_quietly(self.bob)
        self.alice = self.bob = None

    async def _serve_bob(self, bob: RawClient) -> None:
        try:
            while True:
                el = await bob.next(3600)
                await _answer_if_asked(bob, el)
        except (StreamClosedError, ConnectionError, TimeoutError, OSError):
            pass

    async def run(self, stanza: etree._Element) -> Outcome:
        """Send one stanza and a ping after it; gather what comes back."""
        if self.alice is None or self.alice.writer.is_closing():
            await self.connect()
        alice = self.alice
        assert alice is not None
        out = Outcome()
        case_id = f"fz{next(self.ids)}"
        ping_id = case_id + "p"
        stanza = copy.deepcopy(stanza)
        stanza.set("id", case_id)
        is_iq = etree.QName(stanza).localname == "iq" and stanza.get("type") in ("get", "set")
        data = etree.tostring(stanza)
        ping = f"<iq type='get' id='{ping_id}' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>"
        got_ping = False
        try:
            await alice.send(data + ping.encode())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ANSWER_TIMEOUT
            while not got_ping or (is_iq and out.answer is None):
                left = deadline - loop.time()
                if left <= 0:
                    out.timed_out = True
                    break
                try:
                    el = await alice.next(left)
                except TimeoutError:
                    out.timed_out = True
                    break
                if el.tag == f"{{{ns.STREAMS}}}error":
                    out.closed = _stream_condition(el)
                    break
                if el.tag == _IQ and el.get("type") in ("get", "set") and el.get("from"):
                    await _answer_if_asked(alice, el)  # ours too, when sent to ourselves
                elif el.get("id") == ping_id and el.tag == _IQ:
                    got_ping = True
                elif el.get("id") == case_id:
                    if el.get("type") == "error":
                        out.errors.append(_condition(el))
                    if el.tag == _IQ and el.get("type") in ("result", "error"):
                        out.answer = el
        except (StreamClosedError, ConnectionError, OSError) as exc:
            out.closed = f"connection lost ({type(exc).__name__})"
        if alice.closed and out.closed is None:
            out.closed = "closed"
        await asyncio.sleep(0)
        for record in self.watch.new():
            out.tracebacks.append(target.describe(record))
            out.places.append(target.where(record))
        if out.closed is not None or out.timed_out:
            await self.close()
        return out


async def _answer_if_asked(client: RawClient, el: etree._Element) -> None:
    if el.tag == _IQ and el.get("type") in ("get", "set") and el.get("from"):
        reply = etree.Element(_IQ, nsmap={None: CLIENT})
        reply.set("type", "error")
        reply.set("to", el.get("from", ""))
        if el.get("id") is not None:
            reply.set("id", el.get("id", ""))
        error = etree.SubElement(reply, f"{{{CLIENT}}}error", type="cancel")
        etree.SubElement(error, f"{{{STANZAS}}}service-unavailable")
        await client.send(etree.tostring(reply))


def _condition(el: etree._Element) -> str:
    error = el.find(f"{{{CLIENT}}}error")
    if error is None:
        return "?"
    for child in error:
        if etree.QName(child).namespace == STANZAS and etree.QName(child).localname != "text":
            return etree.QName(child).localname
    return "?"


def _stream_condition(el: etree._Element) -> str:
    for child in el:
        if etree.QName(child).localname != "text":
            return etree.QName(child).localname
    return "?"


def problems(outcome: Outcome) -> list[tuple[str, str]]:
    """(kind, detail) of every oracle the outcome breaks."""
    found = []
    for place, text in zip(outcome.places, outcome.tracebacks, strict=True):
        found.append(("traceback", f"{place}|{text}"))
    if "internal-server-error" in outcome.errors and not found:
        # (with a traceback, the traceback's place names the defect)
        found.append(("internal-server-error", ""))
    carried_out = outcome.answer is not None and outcome.answer.get("type") == "result"
    if outcome.closed is not None and not carried_out:
        # (a request the server carried out may end the session: XEP-0077 §3.2, an account
        # removed, its streams closed with <not-authorized/>)
        found.append(("stream-closed", outcome.closed))
    if outcome.timed_out:
        found.append(("no-answer", "no answer (or no ping answer) within "
                      f"{ANSWER_TIMEOUT:.0f} s"))
    return found


def _signature(kind: str, detail: str, stanza: etree._Element) -> str:
    if kind == "traceback":
        return detail.split("|")[0]
    return f"{_shape(stanza)}"


def _shape(stanza: etree._Element) -> str:
    """The stanza's kind, its addressee's kind and its payload elements."""
    to = stanza.get("to") or "-"
    local, _, rest = to.rpartition("@")
    domain, _, resource = rest.partition("/")
    where = ("user" if local else "") + ("@" if local else "") + (
        domain.split(".", 1)[0] if "." in domain else domain) + ("/res" if resource else "")
    parts = [f"{{{etree.QName(child).namespace}}}{etree.QName(child).localname}"
             for child in stanza if isinstance(child.tag, str)]
    return f"{etree.QName(stanza).localname} type={stanza.get('type')} to={where} " \
           f"{' '.join(parts[:2])}"


async def _minimise(attacker: Attacker, stanza: etree._Element, kind: str, detail: str,
                    budget: Budget, tries: int = 80) -> etree._Element:
    """Drop attributes, text and elements one by one while the same problem comes back."""
    if kind == "no-answer":
        return stanza
    left = [tries]

    async def still(candidate: etree._Element) -> bool:
        if left[0] <= 0 or budget.overdue():
            return False
        left[0] -= 1
        got = problems(await attacker.run(candidate))
        return any(k == kind and (kind != "traceback" or d.split("|")[0] == detail.split("|")[0])
                   for k, d in got)

    current = stanza
    changed = True
    while changed and left[0] > 0:
        changed = False
        for path, op in _reductions(current):
            candidate = copy.deepcopy(current)
            if not _apply(candidate, path, op):
                continue
            if await still(candidate):
                current = candidate
                changed = True
                break
    return current


def _reductions(stanza: etree._Element) -> list[tuple[list[int], tuple[str, str]]]:
    out: list[tuple[list[int], tuple[str, str]]] = []

    def walk(el: etree._Element, path: list[int]) -> None:
        if path:
            out.append((path, ("drop", "")))
        for name, value in el.attrib.items():
            if not path and name in ("to", "type", "id"):
                continue
            out.append((path, ("attr", name)))
            if len(value) > 8:
                out.append((path, ("shorten", name)))
        if el.text:
            out.append((path, ("text", "")))
        for i, child in enumerate(el):
            if isinstance(child.tag, str):
                walk(child, [*path, i])

    walk(stanza, [])
    return out


def _apply(stanza: etree._Element, path: list[int], op: tuple[str, str]) -> bool:
    el = stanza
    for i in path:
        if i >= len(el):
            return False
        el = el[i]
    what, name = op
    if what == "drop":
        parent = el.getparent()
        if parent is None:
            return False
        parent.remove(el)
    elif what == "attr":
        el.attrib.pop(name, None)
    elif what == "text":
        el.text = None
    elif what == "shorten":
        value = el.get(name, "")
        el.set(name, value[:max(1, len(value) // 8)])
    return True


def _canonical(reply: etree._Element | None) -> bytes:
    if reply is None:
        return b"none"
    reply = copy.deepcopy(reply)
    for name in ("id", "from", "to"):
        reply.attrib.pop(name, None)
    reply.tail = None
    return etree.tostring(reply)


async def _number_check(attacker: Attacker, case: Case, outcome: Outcome) -> str | None:
    """The invalid number was answered with a result: does the server ignore it?"""
    if outcome.answer is None or outcome.answer.get("type") != "result":
        return None
    for el, name in case.hostile_numbers:
        path = _path_of(case.stanza, el)
        if path is None or el.get(name) not in NUMBERS_HOSTILE:
            continue
        valid = copy.deepcopy(case.stanza)
        absent = copy.deepcopy(case.stanza)
        _at(valid, path).set(name, "1")
        _at(absent, path).attrib.pop(name, None)
        with_one = await attacker.run(valid)
        without = await attacker.run(absent)
        again = await attacker.run(case.stanza)
        hostile = _canonical(again.answer)
        if _canonical(with_one.answer) != hostile and hostile == _canonical(without.answer) \
                and _canonical(outcome.answer) == hostile:
            return f"{etree.QName(el).localname}@{name}={el.get(name)!r}"
    return None


def _path_of(root: etree._Element, el: etree._Element) -> list[int] | None:
    path = []
    while el is not root:
        parent = el.getparent()
        if parent is None:
            return None
        path.insert(0, parent.index(el))
        el = parent
    return path


def _at(root: etree._Element, path: list[int]) -> etree._Element:
    for i in path:
        root = root[i]
    return root


_PUBSUB = "http://jabber.org/protocol/pubsub"


async def seed_state(attacker: Attacker) -> None:
    """Something for max_items and friends to count: three items in node 'fuzz' of alice's PEP
    and of the pubsub service (again after a case deleted or purged them), a room alice is in."""
    stanzas = [f"<iq xmlns='{CLIENT}' type='set' to='pubsub.a.test'><pubsub xmlns='{_PUBSUB}'>"
               "<create node='fuzz'/></pubsub></iq>"]
    for to in ("pubsub.a.test", None):
        for n in (1, 2, 3):
            address = f" to='{to}'" if to else ""
            stanzas.append(f"<iq xmlns='{CLIENT}' type='set'{address}><pubsub xmlns='{_PUBSUB}'>"
                           f"<publish node='fuzz'><item id='item{n}'><entry xmlns='urn:fuzz'>"
                           f"{n}</entry></item></publish></pubsub></iq>")
    stanzas.append(f"<presence xmlns='{CLIENT}' to='fuzzroom@muc.a.test/Fuzz'>"
                   "<x xmlns='http://jabber.org/protocol/muc'/></presence>")
    for xml in stanzas:
        await attacker.run(etree.fromstring(xml))


async def fuzz_stanzas(rng: random.Random, budget: Budget, report: Report, tmp: Path) -> None:
    running = await target.start(tmp)
    try:
        with target.LogWatch() as watch:
            targets = Targets(running)
            attacker = Attacker(running, watch)
            await attacker.connect()
            ids = itertools.count()
            while budget.more():
                if budget.used % 500 == 1:
                    await seed_state(attacker)
                case = make_case(rng, targets, ids)
                report.count("stanzas")
                outcome = await attacker.run(case.stanza)
                for kind, detail in problems(outcome):
                    signature = _signature(kind, detail, case.stanza)
                    key = f"stanzas|{kind}|{signature}"
                    if key in report.findings:
                        continue
                    small = await _minimise(attacker, case.stanza, kind, detail, budget)
                    report.add(Finding("stanzas", kind, signature,
                                       etree.tostring(small).decode(),
                                       detail.partition("|")[2] or detail))
                if not problems(outcome) and case.hostile_numbers and not budget.overdue() \
                        and etree.QName(case.stanza).localname == "iq":
                    ignored = await _number_check(attacker, case, outcome)
                    if ignored is not None:
                        report.add(Finding("stanzas", "invalid-number-ignored",
                                           f"{_shape(case.stanza)} {ignored.split('=')[0]}",
                                           etree.tostring(case.stanza).decode(),
                                           f"{ignored}: the same result as without it, "
                                           "while '1' changes the result"))
            # the server still answers, on a new connection too
            await attacker.close()
            final = await attacker.run(etree.fromstring(
                f"<iq xmlns='{CLIENT}' type='get' to='a.test'><ping xmlns='{ns.PING}'/></iq>"))
            if final.timed_out or final.answer is None or final.answer.get("type") != "result":
                report.add(Finding("stanzas", "server-unresponsive", "final ping",
                                   "<ping/> after the run", str(final)))
            await attacker.close()
    finally:
        await target.stop(running)
