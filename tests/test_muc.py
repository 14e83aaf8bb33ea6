"""Multi-User Chat (XEP-0045) at muc.<domain>: raw clients where status codes and the wire
matter, slixmpp's xep_0045, a restart for persistent rooms, and an occupant from another
server (two servers in this process)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import slixmpp
from lxml import etree

from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient, condition
from tests.test_service_hosts import two_in_process

MUC = "http://jabber.org/protocol/muc"
USER = MUC + "#user"
ROOM = "room@muc.a.test"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
ON = "[muc]\nenabled = true\n"


def codes(stanza: etree._Element) -> set[str]:
    return {s.get("code", "") for s in stanza.iter(f"{{{USER}}}status")}


def item(stanza: etree._Element) -> etree._Element:
    found = stanza.find(f"{{{USER}}}x/{{{USER}}}item")
    assert found is not None, etree.tostring(stanza)
    return found


def body(stanza: etree._Element) -> str | None:
    return stanza.findtext(f"{{{CLIENT}}}body")


async def until(client: RawClient, match: object, timeout: float = 5.0) -> list[etree._Element]:
    """Stanzas up to and including the first for which match(stanza) is true."""
    seen = []
    while True:
        stanza = await client.next(timeout)
        seen.append(stanza)
        if match(stanza):  # type: ignore[operator]
            return seen


def is_subject(stanza: etree._Element) -> bool:
    return stanza.tag == f"{{{CLIENT}}}message" and \
        stanza.find(f"{{{CLIENT}}}subject") is not None and body(stanza) is None


async def join(client: RawClient, nick: str, room: str = ROOM,
               extra: str = "") -> list[etree._Element]:
    """Joins; everything up to the subject message that ends the join (XEP-0045 §7.2.15)."""
    await client.send(f"<presence to='{room}/{nick}'><x xmlns='{MUC}'>{extra}</x></presence>")
    return await until(client, is_subject)


def self_presence(stanzas: list[etree._Element]) -> etree._Element:
    return next(s for s in stanzas if s.tag == f"{{{CLIENT}}}presence" and "110" in codes(s))


async def submit(client: RawClient, fields: dict[str, str], room: str = ROOM) -> etree._Element:
    values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return await client.ask(
        f"<iq type='set' to='{room}' id='cfg'><query xmlns='{MUC}#owner'>"
        f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
        f"<value>{MUC}#roomconfig</value></field>{values}</x></query></iq>", skip_others=True)


async def next_presence_from(client: RawClient, sender: str) -> etree._Element:
    while True:
        stanza = await client.next_of("presence")
        if stanza.get("from") == sender:
            return stanza


async def next_message(client: RawClient) -> etree._Element:
    return await client.next_of("message")


@pytest.fixture
async def muc(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, ON)
    try:
        for user in ("alice", "bob", "carol", "dave"):
            await running.add_user(f"{user}@a.test")
        yield running
    finally:
        await stop_server(running)


# -- priority 1: rooms ----------------------------------------------------------------------------

async def room_of_two(muc: RunningServer) -> tuple[RawClient, RawClient, RawClient]:
    """Alice creates ROOM (an instant room), Bob joins; Carol is logged in, not in the room.
    Each client has read everything the joins sent it."""
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    carol = await muc.raw_login("carol@a.test", resource="pc")
    await join(alice, "Alice")
    done = await alice.ask(f"<iq type='set' to='{ROOM}' id='inst'><query xmlns='{MUC}#owner'>"
                           "<x xmlns='jabber:x:data' type='submit'/></query></iq>")
    assert done.get("type") == "result"
    await join(bob, "Bob")
    await next_presence_from(alice, f"{ROOM}/Bob")
    return alice, bob, carol


async def test_create_and_join(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    carol = await muc.raw_login("carol@a.test", resource="pc")
    # The first to join creates the room and owns it (status 201, XEP-0045 §10.1.1).
    got = await join(alice, "Alice")
    mine = self_presence(got)
    assert mine.get("from") == f"{ROOM}/Alice" and mine.get("to") == "alice@a.test/pc"
    assert codes(mine) == {"110", "201"}  # no 170 for the MAM archive (XEP-0045 §7.2.12)
    assert (item(mine).get("affiliation"), item(mine).get("role")) == ("owner", "moderator")
    subject = got[-1]
    assert subject.get("from") == ROOM and subject.findtext(f"{{{CLIENT}}}subject") == ""
    # Instant room: the owner accepts the default configuration.
    done = await alice.ask(f"<iq type='set' to='{ROOM}' id='inst'><query xmlns='{MUC}#owner'>"
                           "<x xmlns='jabber:x:data' type='submit'/></query></iq>")
    assert done.get("type") == "result"
    # Bob joins: he gets Alice's presence first, then his own (110, no 201), then the subject.
    got = await join(bob, "Bob")
    presences = [s for s in got if s.tag == f"{{{CLIENT}}}presence"]
    assert [p.get("from") for p in presences] == [f"{ROOM}/Alice", f"{ROOM}/Bob"]
    assert codes(presences[1]) == {"110"}
    assert item(presences[0]).get("jid") is None  # semi-anonymous: only moderators see jids
    assert (item(presences[1]).get("affiliation"), item(presences[1]).get("role")) == (
        "none", "participant")
    seen = await next_presence_from(alice, f"{ROOM}/Bob")
    assert item(seen).get("jid") == "bob@a.test/pc"  # Alice moderates: she sees Bob's jid
    assert "110" not in codes(seen)
    # A nick in use: 409 conflict (§7.2.9).
    await carol.send(f"<presence to='{ROOM}/Bob'><x xmlns='{MUC}'/></presence>")
    refused = await carol.next_of("presence")
    assert refused.get("from") == f"{ROOM}/Bob" and condition(refused) == "conflict"


async def test_groupchat_and_private_messages(muc: RunningServer) -> None:
    alice, bob, carol = await room_of_two(muc)
    await bob.send(f"<presence to='{ROOM}/Bob'><status>here</status></presence>")
    seen = await next_presence_from(alice, f"{ROOM}/Bob")
    # Groupchat: from room/nick to every occupant, the sender too.
    await bob.send(f"<message to='{ROOM}' type='groupchat' id='g1'><body>hello all</body>"
                   "</message>")
    ids = set()
    for client in (alice, bob):
        message = await next_message(client)
        assert (message.get("from"), message.get("type"), body(message)) == (
            f"{ROOM}/Bob", "groupchat", "hello all")
        assert message.get("id") == "g1"
        # XEP-0359 stanza id by the room, XEP-0421 occupant id (the one of Bob's presence)
        stanza_id = message.find("{urn:xmpp:sid:0}stanza-id")
        assert stanza_id is not None and stanza_id.get("by") == ROOM
        ids.add(stanza_id.get("id"))
        occupant = message.find("{urn:xmpp:occupant-id:0}occupant-id")
        assert occupant is not None
        announced = seen.find("{urn:xmpp:occupant-id:0}occupant-id")
        assert announced is not None and occupant.get("id") == announced.get("id")
    assert len(ids) == 1
    # Not an occupant: not-acceptable (§7.4).
    await carol.send(f"<message to='{ROOM}' type='groupchat' id='g2'><body>let me in</body>"
                     "</message>")
    refused = await next_message(carol)
    assert condition(refused) == "not-acceptable"
    # A private message between occupants, from the sender's occupant JID.
    await alice.send(f"<message to='{ROOM}/Bob' type='chat' id='p1'><body>psst</body></message>")
    private = await next_message(bob)
    assert (private.get("from"), private.get("type"), body(private)) == (
        f"{ROOM}/Alice", "chat", "psst")
    assert private.find(f"{{{USER}}}x") is not None
    await alice.send(f"<message to='{ROOM}/Nobody' type='chat' id='p2'><body>?</body></message>")
    assert condition(await next_message(alice)) == "item-not-found"


async def test_subject_and_history(muc: RunningServer) -> None:
    alice, bob, carol = await room_of_two(muc)
    # Subject: a message with only <subject/>; one with a body too is just a message.
    await alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Plans</subject></message>")
    for client in (alice, bob):
        message = await next_message(client)
        assert message.findtext(f"{{{CLIENT}}}subject") == "Plans"
    await alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Not this</subject>"
                     "<body>but a message</body></message>")
    for client in (alice, bob):
        assert body(await next_message(client)) == "but a message"
    # A participant may not change the subject by default.
    await bob.send(f"<message to='{ROOM}' type='groupchat' id='s'><subject>Mine</subject>"
                   "</message>")
    assert condition(await next_message(bob)) == "forbidden"
    # Carol joins with history limited to one stanza: it comes with <delay/>, then the subject.
    got = await join(carol, "Carol", extra="<history maxstanzas='1'/>")
    history = [s for s in got if s.tag == f"{{{CLIENT}}}message" and body(s) is not None]
    assert [body(m) for m in history] == ["but a message"]
    delay = history[0].find("{urn:xmpp:delay}delay")
    assert delay is not None and delay.get("from") == ROOM and delay.get("stamp")
    assert got[-1].findtext(f"{{{CLIENT}}}subject") == "Plans"
    assert got[-1].get("from") == f"{ROOM}/Alice"
    # maxchars='0': no history. A nickname is normalised as an RFC 8266 Nickname (full-width
    # letters: NFKC): its presence comes from the normalised occupant JID, with status 210.
    dave = await muc.raw_login("dave@a.test", resource="pc")
    got = await join(dave, "\uff24ave", extra="<history maxchars='0'/>")
    assert not [s for s in got if body(s) is not None]
    mine = self_presence(got)
    assert mine.get("from") == f"{ROOM}/Dave" and "210" in codes(mine)
    await bob.send(f"<message to='{ROOM}' type='groupchat'><body>two</body></message>")
    for client in (alice, bob, carol, dave):
        assert body(await next_message(client)) == "two"


async def test_nick_change(muc: RunningServer) -> None:
    alice, bob, _carol = await room_of_two(muc)
    # Nick change (§7.6): unavailable with 303 and the new nick, then available as the new one.
    await bob.send(f"<presence to='{ROOM}/Robert'/>")
    gone = await next_presence_from(alice, f"{ROOM}/Bob")
    assert gone.get("type") == "unavailable" and codes(gone) == {"303"}
    assert item(gone).get("nick") == "Robert"
    back = await next_presence_from(alice, f"{ROOM}/Robert")
    assert back.get("type") is None
    own = await next_presence_from(bob, f"{ROOM}/Bob")
    assert codes(own) == {"303", "110"}
    await bob.send(f"<message to='{ROOM}' type='groupchat'><body>renamed</body></message>")
    assert (await next_message(alice)).get("from") == f"{ROOM}/Robert"


async def test_self_ping_and_relayed_iqs(muc: RunningServer) -> None:
    alice, bob, _carol = await room_of_two(muc)
    # XEP-0410 self-ping: joined answers result.
    pong = await bob.ask(f"<iq type='get' to='{ROOM}/Bob' id='sp'>"
                         "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
    assert pong.get("type") == "result"
    # An iq to another occupant is relayed to its session, and the answer comes back
    # (XEP-0045 §7.5: the real JIDs stay hidden).
    await alice.send(f"<iq type='get' to='{ROOM}/Bob' id='vc'><vCard xmlns='vcard-temp'/>"
                     "</iq>")
    relayed = await bob.next_of("iq")
    assert relayed.get("from") == f"{ROOM}/Alice" and relayed.get("id") != "vc"
    await bob.send(f"<iq type='result' to='{ROOM}/Alice' id='{relayed.get('id')}'>"
                   "<vCard xmlns='vcard-temp'><FN>Bob</FN></vCard></iq>")
    answer = await alice.next_of("iq")
    assert (answer.get("from"), answer.get("id"), answer.get("type")) == (
        f"{ROOM}/Bob", "vc", "result")
    assert answer.findtext("{vcard-temp}vCard/{vcard-temp}FN") == "Bob"


async def test_leave(muc: RunningServer) -> None:
    alice, _bob, carol = await room_of_two(muc)
    await join(carol, "Carol")
    await next_presence_from(alice, f"{ROOM}/Carol")
    # Leave: everyone gets the unavailable presence, the leaver with 110.
    await carol.send(f"<presence to='{ROOM}/Carol' type='unavailable'><status>bye</status>"
                     "</presence>")
    left = await next_presence_from(alice, f"{ROOM}/Carol")
    assert left.get("type") == "unavailable" and item(left).get("role") == "none"
    assert left.findtext(f"{{{CLIENT}}}status") == "bye"
    own = await next_presence_from(carol, f"{ROOM}/Carol")
    assert own.get("type") == "unavailable" and "110" in codes(own)
    # XEP-0410 self-ping after leaving: not-acceptable; so is a message to the room.
    pong = await carol.ask(f"<iq type='get' to='{ROOM}/Carol' id='sp2'>"
                           "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
    assert condition(pong) == "not-acceptable"
    await carol.send(f"<message to='{ROOM}' type='groupchat' id='g3'><body>x</body></message>")
    assert condition(await next_message(carol)) == "not-acceptable"


async def test_discovery_and_unknown_rooms(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    info = await alice.ask("<iq type='get' to='muc.a.test' id='i1'>"
                           f"<query xmlns='{DISCO_INFO}'/></iq>")
    identity = info.find(f".//{{{DISCO_INFO}}}identity")
    assert identity is not None
    assert (identity.get("category"), identity.get("type")) == ("conference", "text")
    assert MUC in {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    # The user domain lists the service.
    items = await alice.ask(f"<iq type='get' to='a.test' id='i0'><query xmlns='{DISCO_ITEMS}'/>"
                            "</iq>")
    assert "muc.a.test" in [i.get("jid") for i in items.iter(f"{{{DISCO_ITEMS}}}item")]
    # No such room: item-not-found for disco and messages.
    missing = await alice.ask(f"<iq type='get' to='nowhere@muc.a.test' id='i2'>"
                              f"<query xmlns='{DISCO_INFO}'/></iq>")
    assert condition(missing) == "item-not-found"
    await alice.send("<message to='nowhere@muc.a.test' type='groupchat' id='m'><body>x</body>"
                     "</message>")
    assert condition(await next_message(alice)) == "item-not-found"
    # A presence without a nickname: jid-malformed.
    await alice.send(f"<presence to='{ROOM}'><x xmlns='{MUC}'/></presence>")
    assert condition(await alice.next_of("presence")) == "jid-malformed"
    await join(alice, "Alice")
    await join(alice, "Alice", room="hidden@muc.a.test")
    assert (await submit(alice, {"muc#roomconfig_publicroom": "0",
                                 "muc#roomconfig_roomname": "Hidden"},
                         room="hidden@muc.a.test")).get("type") == "result"
    await submit(alice, {"muc#roomconfig_roomname": "The Room",
                         "muc#roomconfig_roomdesc": "A place"})
    info = await alice.ask(f"<iq type='get' to='{ROOM}' id='i3'><query xmlns='{DISCO_INFO}'/>"
                           "</iq>", skip_others=True)
    identity = info.find(f".//{{{DISCO_INFO}}}identity")
    assert identity is not None and identity.get("name") == "The Room"
    features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    assert {MUC, "muc_temporary", "muc_public", "muc_open", "muc_unmoderated",
            "muc_unsecured", "muc_semianonymous"} <= features
    fields = {f.get("var"): f.findtext("{jabber:x:data}value")
              for f in info.iter("{jabber:x:data}field")}
    assert fields["FORM_TYPE"] == MUC + "#roominfo"
    assert fields["muc#roominfo_occupants"] == "1"
    assert fields["muc#roominfo_description"] == "A place"
    # The service's disco#items: public rooms only.
    items = await alice.ask(f"<iq type='get' to='muc.a.test' id='i4'>"
                            f"<query xmlns='{DISCO_ITEMS}'/></iq>", skip_others=True)
    listed = [(i.get("jid"), i.get("name")) for i in items.iter(f"{{{DISCO_ITEMS}}}item")]
    assert listed == [(ROOM, "The Room")]


async def test_a_closed_stream_leaves_its_rooms(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    await join(alice, "Alice")
    await join(bob, "Bob")
    await next_presence_from(alice, f"{ROOM}/Bob")
    await bob.close()
    gone = await next_presence_from(alice, f"{ROOM}/Bob")
    assert gone.get("type") == "unavailable"
    # The last occupant leaves a temporary room: it is gone.
    await alice.send(f"<presence to='{ROOM}/Alice' type='unavailable'/>")
    await next_presence_from(alice, f"{ROOM}/Alice")
    missing = await alice.ask(f"<iq type='get' to='{ROOM}' id='i'><query xmlns='{DISCO_INFO}'/>"
                              "</iq>", skip_others=True)
    assert condition(missing) == "item-not-found"


async def test_slixmpp_joins_and_talks(muc: RunningServer) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    alice = await muc.client("alice@a.test", plugins=("xep_0045",))
    bob = await muc.client("bob@a.test", plugins=("xep_0045",))
    room = slixmpp.JID(ROOM)
    presence, subject, _occupants, _history = await asyncio.wait_for(
        alice.plugin["xep_0045"].join_muc_wait(room, "Alice"), 10)
    assert presence["muc"]["affiliation"] == "owner"
    assert {110, 201} <= set(presence["muc"]["status_codes"])
    assert subject["from"] == room and subject["type"] == "groupchat"
    await asyncio.wait_for(bob.plugin["xep_0045"].join_muc_wait(room, "Bob"), 10)
    received: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
    alice.add_event_handler("groupchat_message", received.put_nowait)
    bob.send_message(mto=room, mbody="hi from slixmpp", mtype="groupchat")
    got = await asyncio.wait_for(received.get(), 10)
    assert str(got["from"]) == f"{ROOM}/Bob" and got["body"] == "hi from slixmpp"
    assert set(alice.plugin["xep_0045"].get_roster(room)) == {"Alice", "Bob"}


# -- priority 2: configuration, persistence, destroy ---------------------------------------------

async def test_password_members_only_and_max_users(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    carol = await muc.raw_login("carol@a.test", resource="pc")
    await join(alice, "Alice")
    form = await alice.ask(f"<iq type='get' to='{ROOM}' id='f'><query xmlns='{MUC}#owner'/>"
                           "</iq>", skip_others=True)
    fields = {f.get("var") for f in form.iter("{jabber:x:data}field")}
    assert {"muc#roomconfig_roomsecret", "muc#roomconfig_membersonly",
            "muc#roomconfig_persistentroom", "muc#roomconfig_whois"} <= fields
    # Only owners configure.
    await join(bob, "Bob")
    refused = await bob.ask(f"<iq type='get' to='{ROOM}' id='f2'><query xmlns='{MUC}#owner'/>"
                            "</iq>", skip_others=True)
    assert condition(refused) == "forbidden"
    await bob.send(f"<presence to='{ROOM}/Bob' type='unavailable'/>")
    await next_presence_from(bob, f"{ROOM}/Bob")
    reply = await submit(alice, {"muc#roomconfig_passwordprotectedroom": "1",
                                 "muc#roomconfig_roomsecret": "s3cret"})
    assert reply.get("type") == "result"
    await bob.send(f"<presence to='{ROOM}/Bob'><x xmlns='{MUC}'/></presence>")
    assert condition(await bob.next_of("presence")) == "not-authorized"
    got = await join(bob, "Bob", extra="<password>s3cret</password>")
    assert self_presence(got).get("type") is None
    # Max users: 2 occupants, Carol is one too many (503).
    await submit(alice, {"muc#roomconfig_maxusers": "2",
                         "muc#roomconfig_passwordprotectedroom": "0"})
    await carol.send(f"<presence to='{ROOM}/Carol'><x xmlns='{MUC}'/></presence>")
    assert condition(await carol.next_of("presence")) == "service-unavailable"
    # Members only: Bob (no affiliation) is removed (322), Carol may not join (407).
    await submit(alice, {"muc#roomconfig_maxusers": "0", "muc#roomconfig_membersonly": "1"})
    removed = await next_presence_from(bob, f"{ROOM}/Bob")
    assert removed.get("type") == "unavailable" and {"110", "322"} <= codes(removed)
    await carol.send(f"<presence to='{ROOM}/Carol'><x xmlns='{MUC}'/></presence>")
    assert condition(await carol.next_of("presence")) == "registration-required"
    # Made a member, she may. Alice, in the room, hears of it (Carol is not there).
    await alice.send(f"<iq type='set' to='{ROOM}' id='m'><query xmlns='{MUC}#admin'>"
                     "<item affiliation='member' jid='carol@a.test'/></query></iq>")
    got = await until(alice, lambda s: s.tag == f"{{{CLIENT}}}iq")
    assert got[-1].get("type") == "result"
    notice = next(s for s in got if s.tag == f"{{{CLIENT}}}message"
                  and s.find(f"{{{USER}}}x/{{{USER}}}item") is not None)
    assert notice.get("from") == ROOM
    assert (item(notice).get("jid"), item(notice).get("affiliation")) == (
        "carol@a.test", "member")
    got = await join(carol, "Carol")
    assert item(self_presence(got)).get("affiliation") == "member"
    # Members only: a member who loses the affiliation is removed (321).
    await alice.ask(f"<iq type='set' to='{ROOM}' id='m2'><query xmlns='{MUC}#admin'>"
                    "<item affiliation='none' jid='carol@a.test'/></query></iq>",
                    skip_others=True)
    removed = await next_presence_from(carol, f"{ROOM}/Carol")
    assert removed.get("type") == "unavailable" and {"110", "321"} <= codes(removed)
    await alice.ask(f"<iq type='set' to='{ROOM}' id='m3'><query xmlns='{MUC}#admin'>"
                    "<item affiliation='member' jid='carol@a.test'/></query></iq>",
                    skip_others=True)
    await join(carol, "Carol")
    # Non-anonymous: status 100 on join, and everyone sees jids.
    await submit(alice, {"muc#roomconfig_whois": "anyone"})
    change = await until(carol, lambda s: s.tag == f"{{{CLIENT}}}message")
    assert {"104", "172"} <= codes(change[-1])
    await carol.send(f"<presence to='{ROOM}/Carol' type='unavailable'/>")
    await next_presence_from(carol, f"{ROOM}/Carol")
    got = await join(carol, "Carol")
    assert "100" in codes(self_presence(got))
    owner = next(s for s in got if s.get("from") == f"{ROOM}/Alice")
    assert item(owner).get("jid") == "alice@a.test/pc"


async def test_persistent_room_survives_a_restart(tmp_path: Path) -> None:
    running = await start_server(tmp_path, ON)
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        alice = await running.raw_login("alice@a.test", resource="pc")
        await join(alice, "Alice")
        reply = await submit(alice, {"muc#roomconfig_persistentroom": "1",
                                     "muc#roomconfig_roomname": "Kept",
                                     "muc#roomconfig_membersonly": "1"})
        assert reply.get("type") == "result"
        await alice.ask(f"<iq type='set' to='{ROOM}' id='m'><query xmlns='{MUC}#admin'>"
                        "<item affiliation='member' jid='bob@a.test'/>"
                        "<item affiliation='outcast' jid='eve@b.test'/></query></iq>",
                        skip_others=True)
        await alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Still here</subject>"
                         "</message>")
        await next_message(alice)
        await alice.send(f"<presence to='{ROOM}/Alice' type='unavailable'/>")
        await next_presence_from(alice, f"{ROOM}/Alice")
    finally:
        await stop_server(running)
    running = await start_server(tmp_path, ON)
    try:
        bob = await running.raw_login("bob@a.test", resource="pc")
        info = await bob.ask(f"<iq type='get' to='{ROOM}' id='i'><query xmlns='{DISCO_INFO}'/>"
                             "</iq>")
        features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
        assert {"muc_persistent", "muc_membersonly"} <= features
        got = await join(bob, "Bob")  # a member: admitted, not the room's creator
        mine = self_presence(got)
        assert codes(mine) == {"110"} and item(mine).get("affiliation") == "member"
        assert got[-1].findtext(f"{{{CLIENT}}}subject") == "Still here"
        alice = await running.raw_login("alice@a.test", resource="pc")
        owners = await alice.ask(f"<iq type='get' to='{ROOM}' id='o'><query xmlns='{MUC}#admin'>"
                                 "<item affiliation='outcast'/></query></iq>")
        assert [i.get("jid") for i in owners.iter(f"{{{MUC}#admin}}item")] == ["eve@b.test"]
    finally:
        await stop_server(running)


async def test_destroy_with_reason_and_venue(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    await join(alice, "Alice")
    await submit(alice, {"muc#roomconfig_persistentroom": "1"})
    await join(bob, "Bob")
    refused = await bob.ask(f"<iq type='set' to='{ROOM}' id='d0'><query xmlns='{MUC}#owner'>"
                            "<destroy/></query></iq>", skip_others=True)
    assert condition(refused) == "forbidden"
    done = await alice.ask(f"<iq type='set' to='{ROOM}' id='d'><query xmlns='{MUC}#owner'>"
                           "<destroy jid='new@muc.a.test'><reason>moved</reason></destroy>"
                           "</query></iq>", skip_others=True)
    assert done.get("type") == "result"
    gone = await next_presence_from(bob, f"{ROOM}/Bob")
    assert gone.get("type") == "unavailable"
    destroy = gone.find(f"{{{USER}}}x/{{{USER}}}destroy")
    assert destroy is not None and destroy.get("jid") == "new@muc.a.test"
    assert destroy.findtext(f"{{{USER}}}reason") == "moved"
    missing = await bob.ask(f"<iq type='get' to='{ROOM}' id='i'><query xmlns='{DISCO_INFO}'/>"
                            "</iq>", skip_others=True)
    assert condition(missing) == "item-not-found"
    assert await muc.server.storage.muc_rooms.load("muc.a.test") == []  # type: ignore[attr-defined]


# -- priority 3: affiliations and roles ----------------------------------------------------------

async def test_kick_ban_voice_and_lists(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    carol = await muc.raw_login("carol@a.test", resource="pc")
    await join(alice, "Alice")
    await join(bob, "Bob")
    await join(carol, "Carol")

    async def admin(client: RawClient, items: str, type_: str = "set") -> etree._Element:
        return await client.ask(f"<iq type='{type_}' to='{ROOM}' id='a'>"
                                f"<query xmlns='{MUC}#admin'>{items}</query></iq>",
                                skip_others=True)

    # A participant may not kick.
    assert condition(await admin(bob, "<item nick='Carol' role='none'/>")) == "forbidden"
    # Kick (307): Carol goes, with the reason and the actor.
    assert (await admin(alice, "<item nick='Carol' role='none'><reason>calm down</reason>"
                        "</item>")).get("type") == "result"
    kicked = await next_presence_from(carol, f"{ROOM}/Carol")
    assert kicked.get("type") == "unavailable" and codes(kicked) == {"307", "110"}
    assert item(kicked).findtext(f"{{{USER}}}reason") == "calm down"
    seen = await next_presence_from(bob, f"{ROOM}/Carol")
    assert codes(seen) == {"307"}
    # Voice: in a moderated room newcomers are visitors; a moderator gives voice.
    await submit(alice, {"muc#roomconfig_moderatedroom": "1"})
    got = await join(carol, "Carol")
    assert item(self_presence(got)).get("role") == "visitor"
    await carol.send(f"<message to='{ROOM}' type='groupchat' id='v'><body>hear me</body>"
                     "</message>")
    assert condition(await next_message(carol)) == "forbidden"
    await admin(alice, "<item nick='Carol' role='participant'/>")
    voiced = await next_presence_from(carol, f"{ROOM}/Carol")
    assert item(voiced).get("role") == "participant"
    await carol.send(f"<message to='{ROOM}' type='groupchat'><body>now I can</body></message>")
    assert body(await next_message(alice)) == "now I can"
    # Ban (301): Carol is removed and may not come back (403).
    await admin(alice, "<item affiliation='outcast' jid='carol@a.test'><reason>spam</reason>"
                "</item>")
    banned = await until(carol, lambda s: s.get("from") == f"{ROOM}/Carol"
                         and s.get("type") == "unavailable")
    assert {"301", "110"} <= codes(banned[-1])
    await carol.send(f"<presence to='{ROOM}/Carol2'><x xmlns='{MUC}'/></presence>")
    assert condition(await carol.next_of("presence")) == "forbidden"
    # Lists: admins and owners read them; a participant may not.
    await admin(alice, "<item affiliation='admin' jid='bob@a.test'/>")
    promoted = await next_presence_from(bob, f"{ROOM}/Bob")
    assert (item(promoted).get("affiliation"), item(promoted).get("role")) == (
        "admin", "moderator")
    outcasts = await admin(bob, "<item affiliation='outcast'/>", "get")
    listed = [(i.get("jid"), i.get("affiliation")) for i in outcasts.iter(f"{{{MUC}#admin}}item")]
    assert listed == [("carol@a.test", "outcast")]
    owners = await admin(alice, "<item affiliation='owner'/>", "get")
    assert [i.get("jid") for i in owners.iter(f"{{{MUC}#admin}}item")] == ["alice@a.test"]
    # An admin may not touch owners; the last owner may not step down.
    refused = await admin(bob, "<item affiliation='none' jid='alice@a.test'/>")
    assert condition(refused) == "not-allowed"
    refused = await admin(alice, "<item affiliation='member' jid='alice@a.test'/>")
    assert condition(refused) == "conflict"
    dave = await muc.raw_login("dave@a.test", resource="pc")
    refused = await admin(dave, "<item affiliation='member'/>", "get")
    assert condition(refused) == "forbidden"


# -- federation: an occupant from another server -------------------------------------------------

async def test_an_occupant_from_another_server(tmp_path: Path) -> None:
    room = "lounge@muc.two.test"
    async with two_in_process(tmp_path, one_extra=ON, two_extra=ON) as (one, two):
        await one.add_user("alice@one.test")
        await two.add_user("bob@two.test")
        bob = await two.raw_login("bob@two.test", resource="pc")
        alice = await one.raw_login("alice@one.test", resource="pc")
        await join(bob, "Bob", room=room)
        # Alice, of one.test, joins over federation.
        await alice.send(f"<presence to='{room}/Alice'><x xmlns='{MUC}'/></presence>")
        got = await until(alice, is_subject, timeout=30)
        mine = self_presence(got)
        assert mine.get("from") == f"{room}/Alice" and mine.get("to") == "alice@one.test/pc"
        seen = await next_presence_from(bob, f"{room}/Alice")
        assert item(seen).get("jid") == "alice@one.test/pc"
        await alice.send(f"<message to='{room}' type='groupchat'><body>from afar</body>"
                         "</message>")
        for client in (alice, bob):
            message = await next_message(client)
            assert (message.get("from"), body(message)) == (f"{room}/Alice", "from afar")
        await bob.send(f"<message to='{room}' type='groupchat'><body>welcome</body></message>")
        for client in (bob, alice):
            assert body(await next_message(client)) == "welcome"
        await alice.send(f"<presence to='{room}/Alice' type='unavailable'/>")
        gone = await next_presence_from(bob, f"{room}/Alice")
        assert gone.get("type") == "unavailable"


# -- settings ------------------------------------------------------------------------------------

async def test_room_creation_can_be_restricted(tmp_path: Path) -> None:
    running = await start_server(tmp_path, ON + 'restrict_room_creation = "admins"\n',
                                 top='admins = ["alice@a.test"]')
    try:
        await running.add_user("alice@a.test")
        await running.add_user("bob@a.test")
        bob = await running.raw_login("bob@a.test", resource="pc")
        await bob.send(f"<presence to='{ROOM}/Bob'><x xmlns='{MUC}'/></presence>")
        assert condition(await bob.next_of("presence")) == "not-allowed"
        alice = await running.raw_login("alice@a.test", resource="pc")
        assert codes(self_presence(await join(alice, "Alice"))) == {"110", "201"}
        assert "110" in codes(self_presence(await join(bob, "Bob")))  # joining is not creating
    finally:
        await stop_server(running)


async def test_muc_can_be_off(tmp_path: Path) -> None:
    from server.config import ConfigErrors, load_config
    running = await start_server(tmp_path, "[muc]\nenabled = false\n")
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test", resource="pc")
        # Not listed by the domain (XEP-0030 items), and nothing answers at muc.a.test: a
        # join gets an error, not a room.
        items = await alice.ask(f"<iq type='get' to='a.test' id='it'>"
                                f"<query xmlns='{DISCO_ITEMS}'/></iq>")
        assert items.get("type") == "result"
        assert "muc.a.test" not in {i.get("jid") for i in items.iter(f"{{{DISCO_ITEMS}}}item")}
        await alice.send(f"<presence to='{ROOM}/Alice'><x xmlns='{MUC}'/></presence>")
        refused = await alice.next_of("presence")
        assert refused.get("type") == "error" and refused.find(f"{{{USER}}}x") is None
        info = await alice.ask(f"<iq type='get' to='muc.a.test' id='in'>"
                               f"<query xmlns='{DISCO_INFO}'/></iq>")
        assert info.get("type") == "error"
    finally:
        await stop_server(running)
    bad = tmp_path / "bad.toml"
    bad.write_text('[muc]\nrestrict_room_creation = "everyone"\n')
    with pytest.raises(ConfigErrors) as caught:
        load_config(bad)
    assert "restrict_room_creation" in str(caught.value)


# -- invitations ---------------------------------------------------------------------------------

async def test_mediated_and_direct_invitations(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    await bob.send("<presence/>")
    await join(alice, "Alice")
    await submit(alice, {"muc#roomconfig_membersonly": "1",
                         "muc#roomconfig_passwordprotectedroom": "1",
                         "muc#roomconfig_roomsecret": "pw"})
    # Mediated (XEP-0045 §7.8.2): the room passes it on, with the password; in a members-only
    # room the invitee becomes a member.
    await alice.send(f"<message to='{ROOM}'><x xmlns='{USER}'><invite to='bob@a.test'>"
                     "<reason>join us</reason></invite></x></message>")
    invitation = await next_message(bob)
    assert invitation.get("from") == ROOM
    invite = invitation.find(f"{{{USER}}}x/{{{USER}}}invite")
    # from Alice's occupant JID: the room is semi-anonymous
    assert invite is not None and invite.get("from") == f"{ROOM}/Alice"
    assert invite.findtext(f"{{{USER}}}reason") == "join us"
    assert invitation.findtext(f"{{{USER}}}x/{{{USER}}}password") == "pw"
    got = await join(bob, "Bob", extra="<password>pw</password>")
    assert item(self_presence(got)).get("affiliation") == "member"
    # A decline goes back to the inviter, from the room.
    carol = await muc.raw_login("carol@a.test", resource="pc")
    await carol.send(f"<message to='{ROOM}'><x xmlns='{USER}'><decline to='alice@a.test/pc'>"
                     "<reason>busy</reason></decline></x></message>")
    declined = await next_message(alice)
    decline = declined.find(f"{{{USER}}}x/{{{USER}}}decline")
    assert declined.get("from") == ROOM and decline is not None
    assert decline.get("from") == "carol@a.test"
    # Direct (XEP-0249): an ordinary message from user to user, passed through untouched.
    await alice.send(f"<message to='carol@a.test/pc'><x xmlns='jabber:x:conference' "
                     f"jid='{ROOM}' password='pw' reason='come'/></message>")
    direct = await next_message(carol)
    x = direct.find("{jabber:x:conference}x")
    assert x is not None and x.get("jid") == ROOM and x.get("password") == "pw"


# -- the room archive (XEP-0313 on the room JID) -------------------------------------------------

async def test_room_archive(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    await join(alice, "Alice")
    ids = []
    for text in ("one", "two", "three"):
        await alice.send(f"<message to='{ROOM}' type='groupchat'><body>{text}</body></message>")
        live = await next_message(alice)
        stanza_id = live.find("{urn:xmpp:sid:0}stanza-id")
        assert stanza_id is not None
        ids.append(stanza_id.get("id"))
    info = await alice.ask(f"<iq type='get' to='{ROOM}' id='i'><query xmlns='{DISCO_INFO}'/>"
                           "</iq>")
    assert "urn:xmpp:mam:2" in {f.get("var") for f in info.iter(f"{{{DISCO_INFO}}}feature")}
    form = await alice.ask(f"<iq type='get' to='{ROOM}' id='f'><query xmlns='urn:xmpp:mam:2'/>"
                           "</iq>")
    assert "with" in {f.get("var") for f in form.iter("{jabber:x:data}field")}
    # Someone who was not there pages through it: the last two, oldest first.
    await join(bob, "Bob", extra="<history maxstanzas='0'/>")
    await bob.send(f"<iq type='set' to='{ROOM}' id='q'><query xmlns='urn:xmpp:mam:2' "
                   "queryid='x'><set xmlns='http://jabber.org/protocol/rsm'><max>2</max>"
                   "<before/></set></query></iq>")
    results = await until(bob, lambda s: s.tag == f"{{{CLIENT}}}iq")
    fin = results[-1]
    assert fin.get("type") == "result"
    forwarded = [m for m in results if m.find("{urn:xmpp:mam:2}result") is not None]
    assert [m.get("from") for m in forwarded] == [ROOM, ROOM]
    got = [(m.find("{urn:xmpp:mam:2}result").get("id"),
            m.findtext(f".//{{{CLIENT}}}message/{{{CLIENT}}}body")) for m in forwarded]
    assert got == [(ids[1], "two"), (ids[2], "three")]  # the archive id is the stanza id
    original = forwarded[0].find(f".//{{{CLIENT}}}message")
    assert original is not None and original.get("from") == f"{ROOM}/Alice"
    # Switched off: no archive.
    await submit(alice, {"muc#roomconfig_enablearchiving": "0"})
    refused = await bob.ask(f"<iq type='set' to='{ROOM}' id='q2'>"
                            "<query xmlns='urn:xmpp:mam:2'/></iq>", skip_others=True)
    assert condition(refused) == "feature-not-implemented"


async def test_status_changes_and_two_sessions_of_one_occupant(muc: RunningServer) -> None:
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    phone = await muc.raw_login("bob@a.test", resource="phone")
    await join(alice, "Alice")
    await join(bob, "Bob")
    await next_presence_from(alice, f"{ROOM}/Bob")
    # A new show/status: everyone gets it, with the occupant's item.
    await bob.send(f"<presence to='{ROOM}/Bob'><show>away</show><status>lunch</status>"
                   "</presence>")
    away = await next_presence_from(alice, f"{ROOM}/Bob")
    assert away.findtext(f"{{{CLIENT}}}show") == "away"
    assert away.findtext(f"{{{CLIENT}}}status") == "lunch"
    assert item(away).get("role") == "participant"
    # A probe from an occupant: the current presence of the one probed.
    await alice.send(f"<presence to='{ROOM}/Bob' type='probe'/>")
    probed = await next_presence_from(alice, f"{ROOM}/Bob")
    assert probed.findtext(f"{{{CLIENT}}}show") == "away"
    # A second session of Bob under his nick joins quietly: it gets the room, Alice nothing.
    got = await join(phone, "Bob")
    assert "110" in codes(self_presence(got))
    await alice.send(f"<message to='{ROOM}' type='groupchat'><body>both?</body></message>")
    for client in (alice, bob, phone):
        assert body(await next_message(client)) == "both?"
    # The phone leaves: Bob is still there for Alice.
    await phone.send(f"<presence to='{ROOM}/Bob' type='unavailable'/>")
    gone = await next_presence_from(phone, f"{ROOM}/Bob")
    assert gone.get("type") == "unavailable" and "110" in codes(gone)
    await bob.send(f"<message to='{ROOM}' type='groupchat'><body>still here</body></message>")
    message = await next_message(alice)
    assert (message.get("from"), body(message)) == (f"{ROOM}/Bob", "still here")


async def test_slixmpp_configures_invites_members_and_kicks(muc: RunningServer) -> None:
    """The flow of slixmpp's own integration tests (itests/test_muc.py)."""
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    one = await muc.client("alice@a.test", plugins=("xep_0045",))
    two = await muc.client("bob@a.test", plugins=("xep_0045",))
    room = slixmpp.JID("setup@muc.a.test")
    one.plugin["xep_0045"].join_muc(room, "client1")
    presence = await asyncio.wait_for(one.wait_until(f"muc::{room}::got_online"), 10)
    assert presence["muc"]["affiliation"] == "owner"
    config = await asyncio.wait_for(one.plugin["xep_0045"].get_room_config(room), 10)
    values = config.get_values()
    values["muc#roomconfig_persistentroom"] = False
    values["muc#roomconfig_membersonly"] = True
    config["values"] = values
    config.reply()
    await asyncio.wait_for(one.plugin["xep_0045"].set_room_config(room, config), 10)
    await asyncio.wait_for(one.plugin["xep_0045"].send_affiliation_list(
        room, [(two.boundjid.bare, "member")]), 10)
    two.plugin["xep_0045"].join_muc(room, "client2")
    await asyncio.wait_for(two.wait_until(f"muc::{room}::got_online"), 10)
    members = await asyncio.wait_for(
        one.plugin["xep_0045"].get_affiliation_list(room, "member"), 10)
    assert [str(j) for j in members] == ["bob@a.test"]
    # Leave with a status; then a kick.
    one.plugin["xep_0045"].leave_muc(room, "client1", "boooring")
    gone = await asyncio.wait_for(two.wait_until(f"muc::{room}::got_offline"), 10)
    assert (gone["type"], gone["status"]) == ("unavailable", "boooring")
    one.plugin["xep_0045"].join_muc(room, "client1")
    await asyncio.wait_for(one.wait_until(f"muc::{room}::got_online"), 10)
    await asyncio.wait_for(asyncio.gather(
        one.wait_until(f"muc::{room}::got_offline"),
        one.plugin["xep_0045"].set_role(room, "client2", "none")), 10)


async def test_moderation_retracts_for_everyone(muc: RunningServer) -> None:
    """XEP-0425 (urn:xmpp:message-moderate:1), as slixmpp's itests/test_moderate.py uses it."""
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    plugins = ("xep_0045", "xep_0359", "xep_0425")
    one = await muc.client("alice@a.test", plugins=plugins)
    two = await muc.client("bob@a.test", plugins=plugins)
    room = slixmpp.JID("mod@muc.a.test")
    await asyncio.wait_for(one.plugin["xep_0045"].join_muc_wait(room, "client1"), 10)
    await asyncio.wait_for(two.plugin["xep_0045"].join_muc_wait(room, "client2"), 10)
    received = asyncio.ensure_future(one.wait_until("groupchat_message"))
    two.make_message(mto=room, mtype="groupchat", mbody="Coucou").send()
    message = await asyncio.wait_for(received, 10)
    stanza_id = message["stanza_id"]["id"]
    assert stanza_id and message["stanza_id"]["by"] == room
    # A participant may not moderate.
    with pytest.raises(slixmpp.exceptions.IqError):
        await asyncio.wait_for(two.plugin["xep_0425"].moderate(room, id=stanza_id), 10)
    _iq, retraction = await asyncio.wait_for(asyncio.gather(
        one.plugin["xep_0425"].moderate(room, id=stanza_id, reason="Your message is bad."),
        two.wait_until("moderated_message")), 10)
    assert retraction["retract"]["id"] == stanza_id
    assert retraction["retract"]["moderated"]["by"] == f"{room}/client1"
    assert retraction["retract"]["reason"] == "Your message is bad."
    # Gone from the history newcomers get.
    carol = await muc.raw_login("carol@a.test", resource="pc")
    got = await join(carol, "Carol", room=str(room))
    assert not [s for s in got if body(s) == "Coucou"]
    # An unknown id: item-not-found.
    with pytest.raises(slixmpp.exceptions.IqError):
        await asyncio.wait_for(one.plugin["xep_0425"].moderate(room, id="nope"), 10)


async def test_nickname_registration(muc: RunningServer) -> None:
    """muc#register (XEP-0045 §7.10) and the reserved nick lookup (§7.12)."""
    alice = await muc.raw_login("alice@a.test", resource="pc")
    bob = await muc.raw_login("bob@a.test", resource="pc")
    carol = await muc.raw_login("carol@a.test", resource="pc")
    await join(alice, "Alice")
    await submit(alice, {"muc#roomconfig_persistentroom": "1"})
    form = await bob.ask(f"<iq type='get' to='{ROOM}' id='r1'>"
                         "<query xmlns='jabber:iq:register'/></iq>")
    assert "muc#register_roomnick" in {f.get("var") for f in form.iter("{jabber:x:data}field")}

    async def register(client: RawClient, nick: str) -> etree._Element:
        return await client.ask(
            f"<iq type='set' to='{ROOM}' id='r2'><query xmlns='jabber:iq:register'>"
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
            f"<value>{MUC}#register</value></field><field var='muc#register_roomnick'>"
            f"<value>{nick}</value></field></x></query></iq>", skip_others=True)

    assert (await register(bob, "Bobby")).get("type") == "result"
    assert condition(await register(carol, "Bobby")) == "conflict"
    assert condition(await register(carol, "Alice")) == "conflict"  # an occupant's nick
    lookup = await bob.ask(f"<iq type='get' to='{ROOM}' id='r3'><query xmlns='{DISCO_INFO}' "
                           "node='x-roomuser-item'/></iq>", skip_others=True)
    identity = lookup.find(f".//{{{DISCO_INFO}}}identity")
    assert identity is not None and identity.get("name") == "Bobby"
    # Registered: a member; nobody else may take that nick in the room.
    await carol.send(f"<presence to='{ROOM}/Bobby'><x xmlns='{MUC}'/></presence>")
    assert condition(await carol.next_of("presence")) == "conflict"
    got = await join(bob, "Bobby")
    assert item(self_presence(got)).get("affiliation") == "member"
    stored = await muc.server.storage.muc_rooms.load("muc.a.test")  # type: ignore[attr-defined]
    assert stored[0].nicks == {"bob@a.test": "Bobby"}
    # Unregistering ends the membership.
    done = await bob.ask(f"<iq type='set' to='{ROOM}' id='r4'><query xmlns='jabber:iq:register'>"
                         "<remove/></query></iq>", skip_others=True)
    assert done.get("type") == "result"
    lookup = await bob.ask(f"<iq type='get' to='{ROOM}' id='r5'><query xmlns='{DISCO_INFO}' "
                           "node='x-roomuser-item'/></iq>", skip_others=True)
    assert lookup.get("type") == "result" and lookup.find(f".//{{{DISCO_INFO}}}identity") is None
    stored = await muc.server.storage.muc_rooms.load("muc.a.test")  # type: ignore[attr-defined]
    assert stored[0].nicks == {} and "bob@a.test" not in stored[0].affiliations
