"""Message Archive Management (XEP-0313) with XEP-0359 stanza ids, over real sockets: what is
archived (both directions, offline messages once, hints), every query form, RSM paging both
ways, form discovery, metadata, preferences, errors, purge, retention, account deletion."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import slixmpp
from lxml import etree

from server.modules.mam import Mam, parse_stamp, stamp
from server.storage.archive import ArchiveEntry
from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient, condition, sync

MAM2 = "urn:xmpp:mam:2"
MAM1 = "urn:xmpp:mam:1"
RSM = "http://jabber.org/protocol/rsm"
SID = "urn:xmpp:sid:0"
FORWARD = "urn:xmpp:forward:0"
XDATA = "jabber:x:data"
MESSAGE = f"{{{CLIENT}}}message"
IQ = f"{{{CLIENT}}}iq"
BODY = f"{{{CLIENT}}}body"
STANZA_ID = f"{{{SID}}}stanza-id"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, "[mam]\nmax_page = 20\nexpire_after = \"30d\"\n")
    for user in ("alice", "bob", "carol"):
        await running.add_user(f"{user}@a.test")
    try:
        yield running
    finally:
        await stop_server(running)


def mam(running: RunningServer) -> Mam:
    module = running.server.modules["mam"]
    assert isinstance(module, Mam)
    return module


async def online(running: RunningServer, jid: str, resource: str = "raw") -> RawClient:
    client = await running.raw_login(jid, resource)
    await client.send("<presence/>")
    await sync(client, "online")
    return client


async def chat(sender: RawClient, to: str, body: str, extra: str = "", type_: str = "chat",
               ident: str = "") -> None:
    ident_attr = f" id='{ident}'" if ident else ""
    await sender.send(f"<message to='{to}' type='{type_}'{ident_attr}><body>{body}</body>"
                      f"{extra}</message>")


def form(fields: dict[str, str | list[str]], xmlns: str = MAM2) -> str:
    out = [f"<x xmlns='{XDATA}' type='submit'><field var='FORM_TYPE' type='hidden'>"
           f"<value>{xmlns}</value></field>"]
    for var, value in fields.items():
        values = value if isinstance(value, list) else [value]
        out.append(f"<field var='{var}'>" + "".join(f"<value>{v}</value>" for v in values)
                   + "</field>")
    return "".join(out) + "</x>"


def rsm(max_: int | None = None, after: str | None = None, before: str | None = None) -> str:
    parts = []
    if max_ is not None:
        parts.append(f"<max>{max_}</max>")
    if after is not None:
        parts.append(f"<after>{after}</after>")
    if before is not None:
        parts.append(f"<before>{before}</before>" if before else "<before/>")
    return f"<set xmlns='{RSM}'>{''.join(parts)}</set>"


class Answer:
    def __init__(self, results: list[etree._Element], iq: etree._Element, xmlns: str) -> None:
        self.results = results
        self.iq = iq
        self.xmlns = xmlns

    @property
    def ids(self) -> list[str]:
        return [r.find(f"{{{self.xmlns}}}result").get("id") for r in self.results]

    @property
    def bodies(self) -> list[str]:
        return [forwarded(r).findtext(BODY) for r in self.results]

    @property
    def fin(self) -> etree._Element:
        fin = self.iq.find(f"{{{self.xmlns}}}fin")
        assert fin is not None, etree.tostring(self.iq)
        return fin

    @property
    def complete(self) -> bool:
        return self.fin.get("complete") in ("true", "1")

    def rsm(self, name: str) -> str | None:
        return self.fin.findtext(f"{{{RSM}}}set/{{{RSM}}}{name}")


def forwarded(result_message: etree._Element) -> etree._Element:
    message = result_message.find(f".//{{{FORWARD}}}forwarded/{MESSAGE}")
    assert message is not None, etree.tostring(result_message)
    return message


def delay_stamp(result_message: etree._Element) -> str:
    delay = result_message.find(f".//{{{FORWARD}}}forwarded/{{urn:xmpp:delay}}delay")
    assert delay is not None
    return delay.get("stamp", "")


_counter = iter(range(1, 1_000_000))


async def query(client: RawClient, body: str = "", *, xmlns: str = MAM2,
                queryid: str | None = "q", to: str | None = None,
                expect_error: bool = False) -> Answer:
    ident = f"mq{next(_counter)}"
    qid = f" queryid='{queryid}'" if queryid else ""
    to_attr = f" to='{to}'" if to else ""
    await client.send(f"<iq type='set' id='{ident}'{to_attr}><query xmlns='{xmlns}'{qid}>"
                      f"{body}</query></iq>")
    results = []
    while True:
        el = await client.next()
        if el.tag == IQ and el.get("id") == ident:
            break
        if el.tag == MESSAGE and el.find(f"{{{xmlns}}}result") is not None:
            result = el.find(f"{{{xmlns}}}result")
            assert result.get("queryid") == queryid
            assert el.get("to") == client.jid  # type: ignore[attr-defined]
            results.append(el)
    if expect_error:
        assert el.get("type") == "error", etree.tostring(el)
    else:
        assert el.get("type") == "result", etree.tostring(el)
    return Answer(results, el, xmlns)


async def conversation(running: RunningServer, count: int) -> tuple[RawClient, RawClient]:
    """alice and bob online; alice sent bob messages m0..m{count-1}, archived on both sides."""
    alice = await online(running, "alice@a.test")
    bob = await online(running, "bob@a.test")
    for i in range(count):
        await chat(alice, "bob@a.test", f"m{i}")
    await sync(alice)
    got = [el for el in await sync(bob) if el.tag == MESSAGE]
    assert [m.findtext(BODY) for m in got] == [f"m{i}" for i in range(count)]
    return alice, bob


# -- archiving and stanza ids ---------------------------------------------------------------------


async def test_both_sides_archived_with_the_delivered_stanza_id(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    bob = await online(server, "bob@a.test")
    await chat(alice, "bob@a.test", "hello", "<origin-id xmlns='urn:xmpp:sid:0' id='o-1'/>",
               ident="c1")
    received = await bob.next_of("message")
    ids = [(s.get("by"), s.get("id")) for s in received.findall(STANZA_ID)]
    assert len(ids) == 1 and ids[0][0] == "bob@a.test"
    assert received.find(f"{{{SID}}}origin-id").get("id") == "o-1"  # kept

    bob_archive = await query(bob)
    assert bob_archive.ids == [ids[0][1]]
    assert bob_archive.bodies == ["hello"]
    inner = forwarded(bob_archive.results[0])
    assert inner.get("from") == "alice@a.test/raw" and inner.get("to") == "bob@a.test"
    assert inner.get("id") == "c1"
    assert bob_archive.complete
    assert bob_archive.rsm("first") == bob_archive.rsm("last") == ids[0][1]
    assert bob_archive.rsm("count") == "1"
    assert bob_archive.fin.get("queryid") == "q"

    alice_archive = await query(alice)
    assert alice_archive.bodies == ["hello"]
    assert alice_archive.ids != bob_archive.ids  # each archive has its own ids
    assert forwarded(alice_archive.results[0]).get("to") == "bob@a.test"
    # The reply goes into both archives too.
    await chat(bob, "alice@a.test/raw", "hi yourself")
    reply = await alice.next_of("message")
    assert reply.find(STANZA_ID).get("by") == "alice@a.test"
    assert (await query(alice)).bodies == ["hello", "hi yourself"]
    assert (await query(bob)).bodies == ["hello", "hi yourself"]
    assert (await query(alice)).ids[1] == reply.find(STANZA_ID).get("id")


async def test_offline_message_archived_once_with_the_same_id(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    await chat(alice, "bob@a.test", "while you were away")
    await sync(alice)
    assert await server.server.storage.offline.count("bob", "a.test") == 1
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    offline = next(el for el in await sync(bob, "online") if el.tag == MESSAGE)
    assert offline.find("{urn:xmpp:delay}delay") is not None
    stanza_id = offline.find(STANZA_ID)
    assert stanza_id is not None and stanza_id.get("by") == "bob@a.test"
    archived = await query(bob)
    assert archived.ids == [stanza_id.get("id")]  # once, and the same id
    assert archived.bodies == ["while you were away"]


async def test_what_is_archived(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    bob = await online(server, "bob@a.test")
    hints = "urn:xmpp:hints"
    await chat(alice, "bob@a.test", "a chat")
    await chat(alice, "bob@a.test", "a normal one", type_="normal")
    await chat(alice, "bob@a.test", "a headline", type_="headline")
    await chat(alice, "bob@a.test", "not stored", f"<no-store xmlns='{hints}'/>")
    await chat(alice, "bob@a.test", "not stored either", f"<no-permanent-store xmlns='{hints}'/>")
    await alice.send("<message to='bob@a.test' type='chat'>"
                     "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>")
    await alice.send("<message to='bob@a.test' type='chat'><received xmlns='urn:xmpp:receipts' "
                     "id='x'/></message>")
    await alice.send("<message to='bob@a.test' type='chat' id='omemo1'>"
                     "<encrypted xmlns='eu.siacs.conversations.axolotl'><header sid='1'/>"
                     "<payload>AAAA</payload></encrypted></message>")
    await alice.send("<message to='bob@a.test' type='chat' id='omemo2'>"
                     "<encrypted xmlns='urn:xmpp:omemo:2'><header sid='1'/>"
                     "<payload>BBBB</payload></encrypted></message>")
    await alice.send(f"<message to='bob@a.test' type='chat' id='hinted'><store xmlns='{hints}'/>"
                     "<x xmlns='urn:example:custom'/></message>")
    await alice.send("<message to='bob@a.test' type='chat' id='invite'>"
                     "<x xmlns='jabber:x:conference' jid='room@muc.a.test'/></message>")
    await alice.send("<message to='bob@a.test' id='call'>"
                     "<propose xmlns='urn:xmpp:jingle-message:0' id='j1'>"
                     "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
                     "</message>")
    await alice.send("<message to='bob@a.test' type='chat'><body>with a hint not to</body>"
                     "<no-store xmlns='urn:xmpp:hints'/><store xmlns='urn:xmpp:hints'/></message>")
    await alice.send("<message to='bob@a.test' type='error' id='err'><body>an error</body>"
                     "<error type='cancel'><item-not-found "
                     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
    await sync(alice)
    delivered = [el for el in await sync(bob) if el.tag == MESSAGE]
    with_id = [m.get("id") or m.findtext(BODY) for m in delivered
               if m.find(STANZA_ID) is not None]
    kept = ["a chat", "a normal one", "omemo1", "omemo2", "hinted", "invite", "call"]
    assert with_id == kept
    for answer in (await query(bob), await query(alice)):
        inner = [forwarded(r) for r in answer.results]
        assert [m.get("id") or m.findtext(BODY) for m in inner] == kept
    encrypted = forwarded((await query(bob)).results[2])
    assert encrypted.findtext("{eu.siacs.conversations.axolotl}encrypted/"
                              "{eu.siacs.conversations.axolotl}payload") == "AAAA"


async def test_a_claimed_stanza_id_is_stripped(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    bob = await online(server, "bob@a.test")
    await chat(alice, "bob@a.test", "forged",
               f"<stanza-id xmlns='{SID}' by='bob@a.test' id='forged'/>"
               f"<stanza-id xmlns='{SID}' by='alice@a.test' id='forged-too'/>"
               f"<stanza-id xmlns='{SID}' by='room@muc.example' id='theirs'/>")
    received = await bob.next_of("message")
    ids = {(s.get("by"), s.get("id")) for s in received.findall(STANZA_ID)}
    archived = (await query(bob)).ids
    assert ids == {("bob@a.test", archived[0]), ("room@muc.example", "theirs")}
    alice_copy = forwarded((await query(alice)).results[0])
    assert {s.get("by") for s in alice_copy.findall(STANZA_ID)} == {"room@muc.example"}


async def test_a_message_to_oneself_is_archived_once(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    await chat(alice, "alice@a.test", "note to self")
    received = await alice.next_of("message")
    archived = await query(alice)
    assert archived.ids == [received.find(STANZA_ID).get("id")]


async def test_to_a_missing_account_only_the_senders_copy(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    await chat(alice, "nobody@a.test", "anyone there?")
    bounce = await alice.next_of("message")
    assert condition(bounce) == "service-unavailable"
    assert (await query(alice)).bodies == ["anyone there?"]
    assert "nobody@a.test" not in await mam(server).store.owners()


async def test_group_commit_batches_concurrent_senders(server: RunningServer) -> None:
    senders = [await online(server, "alice@a.test", f"r{i}") for i in range(4)]
    bob = await online(server, "bob@a.test")
    module = mam(server)
    batches = module.writer.batches
    for round_ in range(10):
        await asyncio.gather(*(chat(s, "bob@a.test", f"{round_}-{i}")
                               for i, s in enumerate(senders)))
    for s in senders:
        await sync(s)
    received = [el for el in await sync(bob) if el.tag == MESSAGE]
    assert len(received) == 40
    ids = [m.find(STANZA_ID).get("id") for m in received]
    assert len(set(ids)) == 40
    answer = await query(bob, rsm(max_=20))
    assert answer.rsm("count") == "40"
    # 40 messages from 4 streams: fewer transactions than messages (each holds both copies).
    assert module.writer.batches - batches < 40


async def test_group_commit_lingers_until_a_query_needs_the_archive(
        server: RunningServer) -> None:
    """Messages wait in memory for the batch after them (bigger batches: fewer index pages
    written per row); an archive query (like a stream management <a/>) ends the wait, so what
    was delivered before it is in the answer."""
    alice = await online(server, "alice@a.test")
    bob = await online(server, "bob@a.test")
    module = mam(server)
    store = module.store
    await chat(alice, "bob@a.test", "first")
    await sync(alice)
    assert (await query(bob)).bodies == ["first"]  # both archives exist now
    module.writer.linger = 30.0  # longer than the test: only the query can end the wait
    await chat(alice, "bob@a.test", "lingering")
    await sync(alice)
    delivered = [el for el in await sync(bob) if el.tag == MESSAGE]
    assert [m.findtext(f"{{{CLIENT}}}body") for m in delivered] == ["lingering"]
    assert delivered[0].find(STANZA_ID) is not None  # its id goes out before the write
    assert await store.count("bob@a.test") == 1  # not written yet: waiting for company
    assert (await query(bob)).bodies == ["first", "lingering"]
    assert await store.count("alice@a.test") == 2


# -- queries --------------------------------------------------------------------------------------


async def test_form_discovery(server: RunningServer) -> None:
    alice = await server.raw_login("alice@a.test")
    for xmlns in (MAM2, MAM1):
        reply = await alice.ask(f"<iq type='get' id='f'><query xmlns='{xmlns}'/></iq>")
        assert reply.get("type") == "result"
        x = reply.find(f"{{{xmlns}}}query/{{{XDATA}}}x")
        assert x is not None and x.get("type") == "form"
        fields = {f.get("var"): f.get("type") for f in x.iterfind(f"{{{XDATA}}}field")}
        assert fields["FORM_TYPE"] == "hidden"
        assert x.find(f"{{{XDATA}}}field/{{{XDATA}}}value").text == xmlns
        assert fields["with"] == "jid-single"
        assert fields["start"] == fields["end"] == "text-single"
        if xmlns == MAM2:
            assert fields["before-id"] == fields["after-id"] == "text-single"
            assert fields["ids"] == "list-multi"


async def test_features_on_the_server(server: RunningServer) -> None:
    alice = await server.raw_login("alice@a.test")
    reply = await alice.ask("<iq type='get' id='d' to='a.test'>"
                            "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    features = {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert {MAM2, MAM1, f"{MAM2}#extended", SID} <= features


async def test_features_on_the_own_account(server: RunningServer) -> None:
    alice = await server.raw_login("alice@a.test")
    disco = "http://jabber.org/protocol/disco#info"
    for to in (" to='alice@a.test'", ""):
        reply = await alice.ask(f"<iq type='get' id='d'{to}><query xmlns='{disco}'/></iq>")
        features = {f.get("var") for f in reply.iter(f"{{{disco}}}feature")}
        assert {MAM2, MAM1, f"{MAM2}#extended", SID} <= features, to
    # Not on someone else's account: their archive is not ours to query.
    reply = await alice.ask(f"<iq type='get' id='d' to='bob@a.test'><query xmlns='{disco}'/></iq>")
    assert MAM2 not in {f.get("var") for f in reply.iter(f"{{{disco}}}feature")}


async def test_with_filter_bare_and_full(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    bob1 = await online(server, "bob@a.test", "one")
    bob2 = await online(server, "bob@a.test", "two")
    carol = await online(server, "carol@a.test")
    await chat(bob1, "alice@a.test", "from bob one")
    await sync(bob1)
    await chat(bob2, "alice@a.test", "from bob two")
    await sync(bob2)
    await chat(carol, "alice@a.test", "from carol")
    await sync(carol)
    await chat(alice, "bob@a.test/two", "to bob two")
    await sync(alice)
    assert (await query(alice, form({"with": "bob@a.test"}))).bodies == \
        ["from bob one", "from bob two", "to bob two"]
    assert (await query(alice, form({"with": "bob@a.test/two"}))).bodies == \
        ["from bob two", "to bob two"]
    assert (await query(alice, form({"with": "bob@a.test/one"}))).bodies == ["from bob one"]
    assert (await query(alice, form({"with": "carol@a.test"}))).bodies == ["from carol"]
    assert (await query(alice, form({"with": "nobody@a.test"}))).bodies == []
    assert (await query(alice, form({"with": "BOB@A.TEST"}))).rsm("count") == "3"  # JIDprep
    answer = await query(alice, form({"with": "not a jid@"}), expect_error=True)
    assert condition(answer.iq) == "jid-malformed"


async def test_start_and_end(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 5)
    everything = await query(alice)
    stamps = [delay_stamp(r) for r in everything.results]
    assert stamps == sorted(stamps) and len(set(stamps)) == 5
    assert parse_stamp(stamps[0]) < parse_stamp(stamps[1])
    assert (await query(alice, form({"start": stamps[1]}))).bodies == ["m1", "m2", "m3", "m4"]
    assert (await query(alice, form({"end": stamps[2]}))).bodies == ["m0", "m1", "m2"]
    assert (await query(alice, form({"start": stamps[1], "end": stamps[3],
                                     "with": "bob@a.test"}))).bodies == ["m1", "m2", "m3"]
    assert (await query(alice, form({"start": "2000-01-01T00:00:00Z",
                                     "end": "2000-01-02T00:00:00+01:00"}))).bodies == []
    answer = await query(alice, form({"start": "yesterday"}), expect_error=True)
    assert condition(answer.iq) == "bad-request"


async def test_paging_forward(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 7)
    page = await query(alice, rsm(max_=3))
    assert page.bodies == ["m0", "m1", "m2"]
    assert not page.complete
    assert page.rsm("count") == "7"
    first = page.fin.find(f"{{{RSM}}}set/{{{RSM}}}first")
    assert first.text == page.ids[0] and first.get("index") == "0"
    assert page.rsm("last") == page.ids[-1]
    page2 = await query(alice, rsm(max_=3, after=page.rsm("last")))
    assert page2.bodies == ["m3", "m4", "m5"] and not page2.complete
    page3 = await query(alice, rsm(max_=3, after=page2.rsm("last")))
    assert page3.bodies == ["m6"] and page3.complete
    assert page3.rsm("count") == "7"
    # After the very last one: an empty, complete page.
    empty = await query(alice, rsm(max_=3, after=page3.rsm("last")))
    assert empty.bodies == [] and empty.complete and empty.rsm("first") is None


async def test_paging_backward(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 7)
    page = await query(alice, rsm(max_=3, before=""))
    assert page.bodies == ["m4", "m5", "m6"]  # the last page, in chronological order
    assert not page.complete
    first = page.fin.find(f"{{{RSM}}}set/{{{RSM}}}first")
    # No index going backward: slixmpp would take index 4 + 3 items == count 7 as the end.
    assert first.text == page.ids[0] and first.get("index") is None
    page2 = await query(alice, rsm(max_=3, before=page.rsm("first")))
    assert page2.bodies == ["m1", "m2", "m3"] and not page2.complete
    page3 = await query(alice, rsm(max_=3, before=page2.rsm("first")))
    assert page3.bodies == ["m0"] and page3.complete
    # Backward with a filter, as clients sync one conversation.
    page = await query(alice, form({"with": "bob@a.test"}) + rsm(max_=2, before=""))
    assert page.bodies == ["m5", "m6"]


async def test_flip_page(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 5)
    flipped = await query(alice, rsm(max_=3, before="") + "<flip-page/>")
    assert flipped.bodies == ["m4", "m3", "m2"]
    forward = await query(alice, rsm(max_=3) + "<flip-page/>")
    assert forward.bodies == ["m2", "m1", "m0"]
    assert not forward.complete
    everything = await query(alice, "<flip-page/>")
    assert everything.bodies == ["m4", "m3", "m2", "m1", "m0"] and everything.complete


async def test_after_id_before_id_and_ids(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 6)
    ids = (await query(alice)).ids
    assert (await query(alice, form({"after-id": ids[1]}))).bodies == ["m2", "m3", "m4", "m5"]
    assert (await query(alice, form({"before-id": ids[2]}))).bodies == ["m0", "m1"]
    between = await query(alice, form({"after-id": ids[0], "before-id": ids[4]}))
    assert between.bodies == ["m1", "m2", "m3"]
    assert between.rsm("count") == "3"
    # RSM within the filtered set.
    page = await query(alice, form({"after-id": ids[0], "before-id": ids[5]}) + rsm(max_=2))
    assert page.bodies == ["m1", "m2"] and not page.complete
    page = await query(alice, form({"after-id": ids[0], "before-id": ids[5]})
                       + rsm(max_=2, after=page.rsm("last")))
    assert page.bodies == ["m3", "m4"] and page.complete
    # ids (urn:xmpp:mam:2#extended): exactly those, in archive order.
    picked = await query(alice, form({"ids": [ids[4], ids[1]]}))
    assert picked.bodies == ["m1", "m4"] and picked.ids == [ids[1], ids[4]]


async def test_unknown_ids_are_item_not_found(server: RunningServer) -> None:
    alice, bob = await conversation(server, 2)
    bobs_id = (await query(bob)).ids[0]
    for body in (rsm(max_=5, after="999999"), rsm(max_=5, before="nope"),
                 form({"after-id": "12345678"}), form({"before-id": "x"}),
                 form({"ids": ["999999"]}),
                 rsm(after=bobs_id)):  # bob's id is not in alice's archive
        answer = await query(alice, body, expect_error=True)
        assert condition(answer.iq) == "item-not-found", body


async def test_page_size_limit_and_counting(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 3)
    too_many = await query(alice, rsm(max_=21), expect_error=True)  # [mam] max_page = 20
    assert condition(too_many.iq) == "policy-violation"
    assert (await query(alice, rsm(max_=20))).bodies == ["m0", "m1", "m2"]
    count_only = await query(alice, rsm(max_=0))
    assert count_only.results == [] and count_only.rsm("count") == "3"
    assert not count_only.complete
    bad = await query(alice, rsm() .replace("</set>", "<max>many</max></set>"),
                      expect_error=True)
    assert condition(bad.iq) == "bad-request"
    many_ids = await query(alice, form({"ids": [str(n) for n in range(1, 22)]}),
                           expect_error=True)
    assert condition(many_ids.iq) == "policy-violation"
    unknown = await query(alice, form({"fulltext": "hello"}), expect_error=True)
    assert condition(unknown.iq) == "bad-request"


async def test_mam1_namespace(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 2)
    answer = await query(alice, form({"with": "bob@a.test"}, MAM1) + rsm(max_=1), xmlns=MAM1)
    assert answer.bodies == ["m0"] and not answer.complete
    assert answer.rsm("count") == "2"
    rest = await query(alice, rsm(max_=1, after=answer.rsm("last")), xmlns=MAM1)
    assert rest.bodies == ["m1"] and rest.complete


async def test_query_without_queryid_and_to_own_bare_jid(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 1)
    answer = await query(alice, queryid=None, to="alice@a.test")
    assert answer.bodies == ["m0"]
    assert answer.results[0].get("from") == "alice@a.test"
    assert answer.fin.get("queryid") is None


async def test_another_accounts_archive_is_forbidden(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 1)
    answer = await query(alice, to="bob@a.test", expect_error=True)
    assert answer.results == [] and condition(answer.iq) == "forbidden"
    for payload in (f"<prefs xmlns='{MAM2}'/>", f"<metadata xmlns='{MAM2}'/>"):
        reply = await alice.ask(f"<iq type='get' id='o' to='bob@a.test'>{payload}</iq>")
        assert condition(reply) == "forbidden"


async def test_metadata(server: RunningServer) -> None:
    alice = await server.raw_login("alice@a.test")
    reply = await alice.ask(f"<iq type='get' id='m1'><metadata xmlns='{MAM2}'/></iq>")
    meta = reply.find(f"{{{MAM2}}}metadata")
    assert reply.get("type") == "result" and meta is not None and len(meta) == 0
    await alice.close()
    alice, _bob = await conversation(server, 3)
    everything = await query(alice)
    reply = await alice.ask(f"<iq type='get' id='m2'><metadata xmlns='{MAM2}'/></iq>")
    start = reply.find(f"{{{MAM2}}}metadata/{{{MAM2}}}start")
    end = reply.find(f"{{{MAM2}}}metadata/{{{MAM2}}}end")
    assert start.get("id") == everything.ids[0]
    assert end.get("id") == everything.ids[-1]
    assert start.get("timestamp") == delay_stamp(everything.results[0])
    assert end.get("timestamp") == delay_stamp(everything.results[-1])


# -- preferences ----------------------------------------------------------------------------------


async def test_prefs_get_set_and_jidprep(server: RunningServer) -> None:
    alice = await server.raw_login("alice@a.test")
    reply = await alice.ask(f"<iq type='get' id='p1'><prefs xmlns='{MAM2}'/></iq>")
    prefs = reply.find(f"{{{MAM2}}}prefs")
    assert prefs.get("default") == "always"
    assert prefs.find(f"{{{MAM2}}}always") is not None
    assert prefs.find(f"{{{MAM2}}}never") is not None
    reply = await alice.ask(
        f"<iq type='set' id='p2'><prefs xmlns='{MAM2}' default='roster'>"
        "<always><jid>JULIET@MONTAGUE.LIT</jid></always>"
        "<never><jid>MONTAGUE@MONTAGUE.LIT</jid></never></prefs></iq>")
    prefs = reply.find(f"{{{MAM2}}}prefs")
    assert prefs.get("default") == "roster"
    assert prefs.findtext(f"{{{MAM2}}}always/{{{MAM2}}}jid") == "juliet@montague.lit"
    assert prefs.findtext(f"{{{MAM2}}}never/{{{MAM2}}}jid") == "montague@montague.lit"
    # Stored: a new login (and a new server process reading the store) sees them.
    mam(server)._prefs.clear()
    again = await alice.ask(f"<iq type='get' id='p3'><prefs xmlns='{MAM1}'/></iq>")
    prefs = again.find(f"{{{MAM1}}}prefs")
    assert prefs.get("default") == "roster"
    assert prefs.findtext(f"{{{MAM1}}}always/{{{MAM1}}}jid") == "juliet@montague.lit"
    bad = await alice.ask(f"<iq type='set' id='p4'><prefs xmlns='{MAM2}' default='sometimes'/>"
                          "</iq>")
    assert condition(bad) == "bad-request"


async def test_prefs_decide_what_is_archived(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    bob = await online(server, "bob@a.test")
    carol = await online(server, "carol@a.test")
    reply = await alice.ask(
        f"<iq type='set' id='p'><prefs xmlns='{MAM2}' default='never'>"
        "<always><jid>carol@a.test</jid></always><never/></prefs></iq>", skip_others=True)
    assert reply.get("type") == "result"
    await chat(bob, "alice@a.test", "from bob")
    await chat(carol, "alice@a.test", "from carol")
    await sync(bob)
    await sync(carol)
    got = [m for m in await sync(alice) if m.tag == MESSAGE]
    # Not archived for alice: no stanza-id of hers; bob's own copy is still archived.
    assert [m.find(STANZA_ID) is not None for m in got] == [False, True]
    assert (await query(alice)).bodies == ["from carol"]
    assert (await query(bob)).bodies == ["from bob"]
    # "roster": only contacts in the roster.
    await alice.ask(f"<iq type='set' id='p2'><prefs xmlns='{MAM2}' default='roster'/></iq>",
                    skip_others=True)
    await alice.ask("<iq type='set' id='r'><query xmlns='jabber:iq:roster'>"
                    "<item jid='bob@a.test'/></query></iq>", skip_others=True)
    await chat(bob, "alice@a.test", "bob is a contact")
    await chat(carol, "alice@a.test", "carol is not")
    await sync(bob)
    await sync(carol)
    await sync(alice)
    assert (await query(alice)).bodies == ["from carol", "bob is a contact"]


# -- deleting -------------------------------------------------------------------------------------


async def test_purge(server: RunningServer) -> None:
    alice = await online(server, "alice@a.test")
    await chat(alice, "bob@a.test", "to bob")
    await chat(alice, "carol@a.test", "to carol")
    await sync(alice)
    reply = await alice.ask("<iq type='set' id='p1'><purge xmlns='urn:presenced:mam:purge:0' "
                            "with='bob@a.test'/></iq>")
    assert reply.get("type") == "result"
    assert (await query(alice)).bodies == ["to carol"]
    reply = await alice.ask("<iq type='set' id='p2'><purge xmlns='urn:presenced:mam:purge:0'/>"
                            "</iq>")
    assert reply.get("type") == "result"
    assert (await query(alice)).bodies == []
    assert (await query(await server.raw_login("bob@a.test", "b"))).bodies == ["to bob"]
    forbidden = await alice.ask("<iq type='set' id='p3' to='bob@a.test'>"
                                "<purge xmlns='urn:presenced:mam:purge:0'/></iq>")
    assert condition(forbidden) == "forbidden"


async def test_retention_job(server: RunningServer) -> None:
    alice, _bob = await conversation(server, 3)
    module = mam(server)
    store = module.store
    now = (await query(alice)).results
    newest = parse_stamp(delay_stamp(now[-1]))
    day = 86400 * 1_000_000
    # Plus 1200 old messages, written straight to the store (more than one batch).
    old = newest - 40 * day
    await store.append([ArchiveEntry("alice@a.test", "carol@a.test", "", True, old + i,
                                     b"<message xmlns='jabber:client'><body>old</body>"
                                     b"</message>") for i in range(1200)])
    assert (await query(alice, rsm(max_=0))).rsm("count") == "1203"
    assert await module.expire(now=newest) == 1200  # [mam] expire_after = "30d"
    assert (await query(alice)).bodies == ["m0", "m1", "m2"]
    assert await module.expire(now=newest + 31 * day) == 6  # alice's 3 and bob's 3
    assert (await query(alice)).bodies == []


async def test_archive_goes_with_the_account(server: RunningServer) -> None:
    alice, bob = await conversation(server, 3)
    assert len((await query(bob)).ids) == 3
    await bob.close()
    accounts = server.server.storage.accounts
    await accounts.delete("bob", "a.test")
    archive = mam(server).store
    assert "bob@a.test" not in await archive.owners()
    await server.add_user("bob@a.test")
    # Messages to the new account are archived (the old owner row is gone).
    await chat(alice, "bob@a.test", "welcome back")
    await sync(alice)
    bob = await server.raw_login("bob@a.test")
    assert (await query(bob)).bodies == ["welcome back"]


# -- clients --------------------------------------------------------------------------------------


async def test_slixmpp_retrieve_reverse(server: RunningServer) -> None:
    """What slixmpp's own integration test (itests/test_mam.py) does."""
    one = await server.client("alice@a.test", plugins=("xep_0313", "xep_0059"))
    two = await server.client("bob@a.test", plugins=("xep_0313", "xep_0059"))
    got: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
    one.add_event_handler("message", got.put_nowait)
    two.add_event_handler("message", got.put_nowait)
    one.make_message(mto=two.boundjid, mbody="coucou").send()
    await asyncio.wait_for(got.get(), 5)
    two.make_message(mto=one.boundjid, mbody="coucou coucou 42").send()
    await asyncio.wait_for(got.get(), 5)
    retrieve = one.plugin["xep_0313"].retrieve(with_jid=slixmpp.JID("bob@a.test"), iterator=True,
                                        reverse=True, rsm={"max": 2})
    bodies = []
    async for page in retrieve:
        for msg in page["mam"]["results"]:
            bodies.append(msg["mam_result"]["forwarded"]["stanza"]["body"])
        if len(bodies) >= 2:
            break
    assert bodies == ["coucou", "coucou coucou 42"]


def test_stamps_round_trip() -> None:
    assert stamp(0) == "1970-01-01T00:00:00.000000Z"
    assert parse_stamp(stamp(1_764_624_281_123_456)) == 1_764_624_281_123_456
    assert parse_stamp("1970-01-01T01:00:00+01:00") == 0
    assert parse_stamp("2026-12-01T21:24:41Z") == parse_stamp("2026-12-01T21:24:41.000Z")


def test_settings(tmp_path: Path) -> None:
    from server.config import ConfigErrors, load_config
    from tests.conftest import write_config
    config = load_config(write_config(tmp_path, "[mam]\nexpire_after = \"2w\"\n"))
    assert config.modules["mam"].expire_after == 14 * 86400
    assert config.modules["mam"].default == "always" and config.modules["mam"].max_page == 250
    assert load_config(write_config(tmp_path, "")).modules["mam"].expire_after is None
    path = write_config(tmp_path, "[mam]\nexpire_after = \"1 year\"\ndefault = \"sometimes\"\n"
                                  "max_page = 0\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    text = str(caught.value)
    assert "[mam] expire_after" in text and "[mam] default" in text and "[mam] max_page" in text
