"""Multi-User Chat, the rest of the core (issue 14): limits, voice requests (XEP-0045 §7.13,
§8.6), moderation tombstones in the room archive (XEP-0425 §6), blocking of room stanzas
(XEP-0191 through the user filter chain), rooms that survive `kill -9` (both backends),
serialise-once fan-out, presence broadcast by role, and wire details as Prosody's scansion
scripts expect them. Raw clients over real sockets."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from server.app import Server
from server.config import load_config
from server.jid import JID
from server.module import Module, Stanza, hook
from server.sessions import Session
from tests.conftest import RunningServer, start_server, stop_server, write_config
from tests.rawclient import CLIENT, RawClient, condition
from tests.test_muc import (
    MUC,
    ROOM,
    body,
    codes,
    item,
    join,
    next_message,
    next_presence_from,
    self_presence,
    submit,
)
from tests.test_persistence import configure, kill_9, login, start

USER = MUC + "#user"
XDATA = "jabber:x:data"
REQUEST = MUC + "#request"
MAM = "urn:xmpp:mam:2"
RETRACT = "urn:xmpp:message-retract:1"
MODERATE = "urn:xmpp:message-moderate:1"
BLOCKING = "urn:xmpp:blocking"


def error_type(stanza: etree._Element) -> str | None:
    error = stanza.find(f"{{{CLIENT}}}error")
    return error.get("type") if error is not None else None


async def users(running: RunningServer, *names: str) -> list[RawClient]:
    clients = []
    for name in names:
        await running.add_user(f"{name}@a.test")
        clients.append(await running.raw_login(f"{name}@a.test", resource="pc"))
    return clients


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, "[muc]\nmax_rooms_per_user = 2\nmax_occupants = 3\n"
                                           "message_rate = 1\nmessage_burst = 3\n")
    try:
        yield running
    finally:
        await stop_server(running)


# -- limits ([muc] max_rooms_per_user, max_occupants, message_rate, message_burst) ---------------

async def test_rooms_per_user(limited: RunningServer) -> None:
    alice, bob = await users(limited, "alice", "bob")
    await join(alice, "Alice", "one@muc.a.test")
    await join(alice, "Alice", "two@muc.a.test")
    # A third room would make three rooms she owns: refused, with a wait-type error.
    await alice.send("<presence to='three@muc.a.test/Alice'><x xmlns='" + MUC + "'/></presence>")
    refused = await alice.next_of("presence")
    assert refused.get("from") == "three@muc.a.test/Alice" and refused.get("type") == "error"
    assert (condition(refused), error_type(refused)) == ("resource-constraint", "wait")
    # Joining a room someone else made is no creation: fine.
    await join(bob, "Bob", "bobs@muc.a.test")
    assert codes(self_presence(await join(alice, "Alice", "bobs@muc.a.test"))) == {"110"}
    # Once she leaves one of hers (a temporary room: it goes), she may make another.
    await alice.send("<presence to='two@muc.a.test/Alice' type='unavailable'/>")
    await next_presence_from(alice, "two@muc.a.test/Alice")
    assert "201" in codes(self_presence(await join(alice, "Alice", "three@muc.a.test")))


async def test_occupants_per_room(limited: RunningServer) -> None:
    alice, bob, carol, dave = await users(limited, "alice", "bob", "carol", "dave")
    await join(alice, "Alice")
    # The room may lower the service's limit, not raise it: maxusers 50 is kept as 3.
    assert (await submit(alice, {"muc#roomconfig_maxusers": "50"})).get("type") == "result"
    form = await alice.ask(f"<iq type='get' to='{ROOM}' id='f'><query xmlns='{MUC}#owner'/></iq>",
                           skip_others=True)
    maxusers = form.find(f".//{{{XDATA}}}field[@var='muc#roomconfig_maxusers']")
    assert maxusers is not None and maxusers.findtext(f"{{{XDATA}}}value") == "3"
    await join(bob, "Bob")
    await join(carol, "Carol")
    # XEP-0045 §7.2.10: a full room answers service-unavailable.
    await dave.send(f"<presence to='{ROOM}/Dave'><x xmlns='{MUC}'/></presence>")
    refused = await dave.next_of("presence")
    assert refused.get("type") == "error" and condition(refused) == "service-unavailable"
    # Lowered by the room to 2 (three inside): Carol leaves, Dave still may not join.
    assert (await submit(alice, {"muc#roomconfig_maxusers": "2"})).get("type") == "result"
    await carol.send(f"<presence to='{ROOM}/Carol' type='unavailable'/>")
    await next_presence_from(carol, f"{ROOM}/Carol")
    await dave.send(f"<presence to='{ROOM}/Dave'><x xmlns='{MUC}'/></presence>")
    assert condition(await dave.next_of("presence")) == "service-unavailable"
    # Back to the service's limit: room for Dave.
    assert (await submit(alice, {"muc#roomconfig_maxusers": "0"})).get("type") == "result"
    assert codes(self_presence(await join(dave, "Dave"))) == {"110"}


async def test_message_rate_per_occupant(limited: RunningServer) -> None:
    alice, bob = await users(limited, "alice", "bob")
    await join(alice, "Alice")
    await join(bob, "Bob")
    await next_presence_from(alice, f"{ROOM}/Bob")
    for n in range(4):
        await bob.send(f"<message to='{ROOM}' type='groupchat' id='m{n}'><body>{n}</body>"
                       "</message>")
    # A burst of three goes through; the fourth is refused to Bob, never silently dropped.
    assert [body(await next_message(alice)) for _ in range(3)] == ["0", "1", "2"]
    got = [await next_message(bob) for _ in range(4)]
    assert [body(m) for m in got[:3]] == ["0", "1", "2"]
    assert (got[3].get("id"), got[3].get("type")) == ("m3", "error")
    assert (condition(got[3]), error_type(got[3])) == ("resource-constraint", "wait")
    # Private messages count too; a second later (rate 1/s) one more may go.
    await bob.send(f"<message to='{ROOM}/Alice' type='chat' id='p'><body>psst</body></message>")
    assert condition(await next_message(bob)) == "resource-constraint"
    await asyncio.sleep(1.1)
    await bob.send(f"<message to='{ROOM}' type='groupchat' id='m4'><body>4</body></message>")
    assert body(await next_message(alice)) == "4"
    # Alice has her own bucket.
    await alice.send(f"<message to='{ROOM}' type='groupchat'><body>mine</body></message>")
    assert body(await next_message(bob)) == "4" and body(await next_message(bob)) == "mine"


# -- voice requests (XEP-0045 §7.13, §8.6) -------------------------------------------------------

def request_form(fields: dict[str, str], type_: str = "submit") -> str:
    values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (f"<x xmlns='{XDATA}' type='{type_}'><field var='FORM_TYPE'><value>{REQUEST}</value>"
            f"</field>{values}</x>")


async def test_voice_request_and_approval(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        alice, bob, carol = await users(running, "alice", "bob", "carol")
        await join(alice, "Alice")
        assert (await submit(alice, {"muc#roomconfig_moderatedroom": "1"})).get("type") == "result"
        # In a moderated room a newcomer without affiliation is a visitor and may not speak.
        assert item(self_presence(await join(bob, "Bob"))).get("role") == "visitor"
        await join(carol, "Carol")
        await bob.send(f"<message to='{ROOM}' type='groupchat' id='v'><body>hi</body></message>")
        assert condition(await next_message(bob)) == "forbidden"
        # §7.13: Bob asks for voice; the moderator (Alice) gets the §8.6 form, Carol nothing.
        await bob.send(f"<message to='{ROOM}' id='ask'>"
                       f"{request_form({'muc#role': 'participant'})}</message>")
        form_message = await next_message(alice)
        assert form_message.get("from") == ROOM
        form = form_message.find(f"{{{XDATA}}}x")
        assert form is not None and form.get("type") == "form"
        fields = {f.get("var"): f.findtext(f"{{{XDATA}}}value")
                  for f in form.iter(f"{{{XDATA}}}field")}
        assert fields == {"FORM_TYPE": REQUEST, "muc#role": "participant",
                          "muc#jid": "bob@a.test/pc", "muc#roomnick": "Bob",
                          "muc#request_allow": "false"}
        # Only moderators decide: Carol's approval is refused.
        approval = request_form({"muc#role": "participant", "muc#jid": "bob@a.test/pc",
                                 "muc#roomnick": "Bob", "muc#request_allow": "true"})
        await carol.send(f"<message to='{ROOM}' id='c'>{approval}</message>")
        assert condition(await next_message(carol)) == "forbidden"
        # Alice approves: Bob's role is participant, in the presence everyone gets.
        await alice.send(f"<message to='{ROOM}' id='ok'>{approval}</message>")
        for client in (alice, bob, carol):
            granted = await next_presence_from(client, f"{ROOM}/Bob")
            assert item(granted).get("role") == "participant"
        await bob.send(f"<message to='{ROOM}' type='groupchat'><body>now I may</body></message>")
        assert body(await next_message(alice)) == "now I may"
        # Bob, a participant now, asks for nothing: the moderators hear nothing of it.
        await bob.send(f"<message to='{ROOM}'>{request_form({'muc#role': 'participant'})}"
                       "</message>")
        await bob.send(f"<message to='{ROOM}' type='groupchat'><body>after</body></message>")
        assert body(await next_message(alice)) == "after"
    finally:
        await stop_server(running)


# -- moderation tombstones (XEP-0425 §6) in the room archive --------------------------------------

async def archive_page(client: RawClient, room: str = ROOM) -> list[etree._Element]:
    """The whole room archive, as the forwarded messages, oldest first."""
    await client.send(f"<iq type='set' to='{room}' id='mam'><query xmlns='{MAM}' queryid='q'/>"
                      "</iq>")
    results = []
    while True:
        stanza = await client.next()
        if stanza.tag == f"{{{CLIENT}}}iq" and stanza.get("id") == "mam":
            assert stanza.get("type") == "result"
            return results
        result = stanza.find(f"{{{MAM}}}result")
        if result is not None:
            forwarded = result.find(f".//{{{CLIENT}}}message")
            assert forwarded is not None
            forwarded.set("archive-id", result.get("id", ""))
            results.append(forwarded)


async def test_moderated_message_leaves_a_tombstone(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        alice, bob = await users(running, "alice", "bob")
        await join(alice, "Alice")
        await submit(alice, {"muc#roomconfig_persistentroom": "1"})
        await join(bob, "Bob")
        for text in ("before", "buy potions at evil.example", "after"):
            await bob.send(f"<message to='{ROOM}' type='groupchat' id='{text[:3]}'>"
                           f"<body>{text}</body></message>")
        live = [await next_message(alice) for _ in range(3)]
        sid = live[1].find("{urn:xmpp:sid:0}stanza-id")
        author = live[1].find("{urn:xmpp:occupant-id:0}occupant-id")
        assert sid is not None and author is not None
        reply = await alice.ask(
            f"<iq type='set' to='{ROOM}' id='mod'><moderate xmlns='{MODERATE}' "
            f"id='{sid.get('id')}'><retract xmlns='{RETRACT}'/><reason>spam</reason>"
            "</moderate></iq>", skip_others=True)
        assert reply.get("type") == "result"
        # Moderating it again: there is nothing left to moderate.
        again = await alice.ask(
            f"<iq type='set' to='{ROOM}' id='mod2'><moderate xmlns='{MODERATE}' "
            f"id='{sid.get('id')}'><retract xmlns='{RETRACT}'/></moderate></iq>",
            skip_others=True)
        assert condition(again) == "item-not-found"
        # An id the room never gave (the fuzzer's find: internal-server-error before).
        unknown = await alice.ask(
            f"<iq type='set' to='{ROOM}' id='mod3'><moderate xmlns='{MODERATE}' "
            f"id='fuzz'><retract xmlns='{RETRACT}'/></moderate></iq>", skip_others=True)
        assert condition(unknown) == "item-not-found"
    finally:
        await stop_server(running)
    running = await start_server(tmp_path)  # the tombstone is in the database
    try:
        bob = await running.raw_login("bob@a.test", resource="pc")
        await join(bob, "Bob", extra="<history maxstanzas='0'/>")
        archived = await archive_page(bob)
        assert [m.get("archive-id") for m in archived[:3]] == [
            m.find("{urn:xmpp:sid:0}stanza-id").get("id") for m in live]  # type: ignore[union-attr]
        assert [body(m) for m in archived] == ["before", None, "after", None]
        tomb = archived[1]
        # In place of the original: its sender and id, the author's occupant id, and
        # <retracted/> with the <moderated/> (by, the moderator's occupant id) and the reason;
        # nothing of the body.
        assert (tomb.get("from"), tomb.get("id"), tomb.get("type")) == (
            f"{ROOM}/Bob", "buy", "groupchat")
        assert b"potions" not in etree.tostring(tomb)
        occupant = tomb.find("{urn:xmpp:occupant-id:0}occupant-id")
        assert occupant is not None and occupant.get("id") == author.get("id")
        retracted = tomb.find(f"{{{RETRACT}}}retracted")
        assert retracted is not None and retracted.get("stamp")
        moderated = retracted.find(f"{{{MODERATE}}}moderated")
        assert moderated is not None and moderated.get("by") == f"{ROOM}/Alice"
        moderator = moderated.find("{urn:xmpp:occupant-id:0}occupant-id")
        assert moderator is not None and moderator.get("id") not in (None, author.get("id"))
        assert retracted.findtext(f"{{{RETRACT}}}reason") == "spam"
        # The retraction itself is archived after the messages (XEP-0424 §5.1).
        retract = archived[3].find(f"{{{RETRACT}}}retract")
        assert retract is not None and retract.get("id") == sid.get("id")
    finally:
        await stop_server(running)


# -- room stanzas go through the user filter chain (XEP-0191 blocking) ----------------------------

async def block(client: RawClient, jid: str) -> None:
    reply = await client.ask(f"<iq type='set' id='b'><block xmlns='{BLOCKING}'>"
                             f"<item jid='{jid}'/></block></iq>", skip_others=True)
    assert reply.get("type") == "result"


async def test_blocked_room_and_occupant(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        alice, bob, carol = await users(running, "alice", "bob", "carol")
        await join(alice, "Alice")
        await join(bob, "Bob")
        await join(carol, "Carol")
        await next_presence_from(bob, f"{ROOM}/Carol")
        # Carol blocks Bob's occupant JID: his messages do not reach her, Alice's do.
        await block(carol, f"{ROOM}/Bob")
        await bob.send(f"<message to='{ROOM}' type='groupchat'><body>from bob</body></message>")
        await alice.send(f"<message to='{ROOM}' type='groupchat'><body>from alice</body>"
                         "</message>")
        assert body(await next_message(carol)) == "from alice"
        # ... nor does his presence (a status change), or his private message.
        await bob.send(f"<presence to='{ROOM}/Bob'><show>away</show></presence>")
        await bob.send(f"<message to='{ROOM}/Carol' type='chat'><body>psst</body></message>")
        await alice.send(f"<presence to='{ROOM}/Alice'><show>dnd</show></presence>")
        seen = await next_presence_from(carol, f"{ROOM}/Alice")
        assert seen.findtext(f"{{{CLIENT}}}show") == "dnd"
        await alice.send(f"<message to='{ROOM}' type='groupchat'><body>marker</body></message>")
        assert body(await next_message(carol)) == "marker"
        # Blocking the room: nothing from it any more (the others still hear each other).
        await block(carol, ROOM)
        await alice.send(f"<message to='{ROOM}' type='groupchat'><body>unseen</body></message>")
        assert "unseen" in [body(await next_message(bob)) for _ in range(4)]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(carol.next(), 0.5)
    finally:
        await stop_server(running)


# -- persistent rooms survive kill -9, on both backends --------------------------------------------

def storage_table(backend: str, request: pytest.FixtureRequest) -> str:
    """The [storage] table of a `presenced serve` config for this backend ("" for SQLite)."""
    if backend != "postgresql":
        return ""
    dsn = request.getfixturevalue("pg_dsn")
    return f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n'


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_persistent_room_survives_kill_9(tmp_path: Path, backend: str,
                                               request: pytest.FixtureRequest) -> None:
    config, port = configure(tmp_path, ("alice", "bob"), storage_table(backend, request))
    proc = start(config, tmp_path)
    try:
        alice = await login(port, "alice", "pc")
        bob = await login(port, "bob", "pc")
        await join(alice, "Alice")
        reply = await submit(alice, {"muc#roomconfig_persistentroom": "1",
                                     "muc#roomconfig_roomname": "Durable",
                                     "muc#roomconfig_membersonly": "1"})
        assert reply.get("type") == "result"
        reply = await alice.ask(
            f"<iq type='set' to='{ROOM}' id='aff'><query xmlns='{MUC}#admin'>"
            "<item affiliation='admin' jid='carol@a.test'/>"
            "<item affiliation='outcast' jid='eve@b.test'><reason>spam</reason></item>"
            "</query></iq>", skip_others=True)
        assert reply.get("type") == "result"
        # Bob is not a member: he may not register yet. Alice makes him one; he registers.
        reply = await alice.ask(
            f"<iq type='set' to='{ROOM}' id='mem'><query xmlns='{MUC}#admin'>"
            "<item affiliation='member' jid='bob@a.test'/></query></iq>", skip_others=True)
        assert reply.get("type") == "result"
        reply = await bob.ask(
            f"<iq type='set' to='{ROOM}' id='reg'><query xmlns='jabber:iq:register'>"
            f"<x xmlns='{XDATA}' type='submit'><field var='FORM_TYPE'><value>{MUC}#register"
            "</value></field><field var='muc#register_roomnick'><value>Bobby</value></field>"
            "</x></query></iq>", skip_others=True)
        assert reply.get("type") == "result"
        await alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Kept</subject>"
                         "</message>")
        # Answered after the subject was handled (and stored: per-stream order).
        pong = await alice.ask(f"<iq type='get' to='{ROOM}' id='p'>"
                               "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
        assert pong.get("type") == "result"
    finally:
        kill_9(proc)
    proc = start(config, tmp_path)
    try:
        bob = await login(port, "bob", "pc")
        nick = await bob.ask(f"<iq type='get' to='{ROOM}' id='n'><query "
                             "xmlns='http://jabber.org/protocol/disco#info' "
                             "node='x-roomuser-item'/></iq>")
        identity = nick.find(".//{http://jabber.org/protocol/disco#info}identity")
        assert identity is not None and identity.get("name") == "Bobby"
        got = await join(bob, "Bobby")
        mine = self_presence(got)
        assert item(mine).get("affiliation") == "member"
        assert got[-1].findtext(f"{{{CLIENT}}}subject") == "Kept"
        alice = await login(port, "alice", "pc")
        lists = {}
        for affiliation in ("owner", "admin", "member", "outcast"):
            reply = await alice.ask(f"<iq type='get' to='{ROOM}' id='l'><query "
                                    f"xmlns='{MUC}#admin'><item affiliation='{affiliation}'/>"
                                    "</query></iq>", skip_others=True)
            lists[affiliation] = [i.get("jid") for i in reply.iter(f"{{{MUC}#admin}}item")]
        assert lists == {"owner": ["alice@a.test"], "admin": ["carol@a.test"],
                         "member": ["bob@a.test"], "outcast": ["eve@b.test"]}
        info = await alice.ask(f"<iq type='get' to='{ROOM}' id='i'><query "
                               "xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
        assert identity is not None and identity.get("name") == "Durable"
        # Still members only.
        assert "muc_membersonly" in {f.get("var") for f in info.iter(
            "{http://jabber.org/protocol/disco#info}feature")}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


# -- serialised once (DESIGN.md rule 3) -----------------------------------------------------------

def test_addressed_copies_are_serialised_once() -> None:
    from server.xml import ns
    from server.xml.writer import addressed_copies, serialize
    template = etree.fromstring(
        f"<message xmlns='{CLIENT}' type='groupchat' from='{ROOM}/Bob'><body>hi &amp; bye"
        "</body></message>".encode())
    recipients = ["alice@a.test/pc", "carol@a.test/a&b'\"c", "dave@b.test/x"]
    copies = addressed_copies(template, recipients)
    assert [c.get("to") for c in copies] == recipients  # ordinary elements, addressed
    wire = [etree.fromstring(serialize(c, ns.CLIENT)) for c in copies]
    for got, to in zip(wire, recipients, strict=True):
        assert (got.get("to"), got.get("from"), got.findtext(f"{{{CLIENT}}}body")) == (
            to, f"{ROOM}/Bob", "hi & bye")
    # A copy changed after it was made (a filter adding a child) is serialised as it is now.
    again = addressed_copies(template, ["alice@a.test/pc"])[0]
    etree.SubElement(again, "{urn:xmpp:delay}delay", stamp="2026-01-01T00:00:00Z")
    assert b"urn:xmpp:delay" in serialize(again, ns.CLIENT)
    # For a server stream the namespace is jabber:server, as for any stanza.
    remote = addressed_copies(template, ["dave@b.test/x"])[0]
    assert etree.fromstring(serialize(remote, ns.SERVER)).tag == "{jabber:server}message"


# -- details as Prosody's scansion scripts have them (where XEP-0045 leaves them open) -----------

async def test_wire_details_matching_prosody(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        alice, bob, carol = await users(running, "alice", "bob", "carol")
        mine = self_presence(await join(alice, "Alice"))
        # The status codes, the item, then 110; the owner sees her own JID.
        x = mine.find(f"{{{USER}}}x")
        assert x is not None
        assert [(etree.QName(c).localname, c.get("code")) for c in x] == [
            ("status", "201"), ("item", None), ("status", "110")]
        assert item(mine).get("jid") == "alice@a.test/pc"
        # Errors come 'by' the room.
        await bob.send(f"<message to='{ROOM}' type='groupchat' id='e'><body>x</body></message>")
        refused = await next_message(bob)
        error = refused.find(f"{{{CLIENT}}}error")
        assert error is not None and error.get("by") == ROOM
        # A mediated invitation keeps its id, comes from the inviter's occupant JID in a
        # semi-anonymous room, with a body and XEP-0249's element for other clients.
        await bob.send("<presence/>")  # available: a message to his bare JID reaches him
        await alice.send(f"<message to='{ROOM}' id='inv'><x xmlns='{USER}'>"
                         "<invite to='bob@a.test'/></x></message>")
        invitation = await next_message(bob)
        invite = invitation.find(f"{{{USER}}}x/{{{USER}}}invite")
        assert invitation.get("id") == "inv" and invite is not None
        assert invite.get("from") == f"{ROOM}/Alice"
        assert body(invitation) == f"{ROOM}/Alice invited you to the room {ROOM}"
        direct = invitation.find("{jabber:x:conference}x")
        assert direct is not None and direct.get("jid") == ROOM
        # Probes: an occupant gets another's presence (no 110 for its own), a stranger an error.
        await join(bob, "Bob")
        await alice.send(f"<presence to='{ROOM}/Bob' type='probe'/>")
        probed = await next_presence_from(alice, f"{ROOM}/Bob")
        assert probed.get("type") is None and "110" not in codes(probed)
        await carol.send(f"<presence to='{ROOM}/Bob' type='probe'/>")
        assert condition(await carol.next_of("presence")) == "not-acceptable"
        # A join from a session already in: the room again (presences, history, subject).
        again = await join(bob, "Bob")
        assert [p.get("from") for p in again if p.tag == f"{{{CLIENT}}}presence"] == [
            f"{ROOM}/Alice", f"{ROOM}/Bob"]
        # Unavailable to the room's bare JID: leaving all the same.
        await bob.send(f"<presence to='{ROOM}' type='unavailable'/>")
        gone = await next_presence_from(bob, f"{ROOM}/Bob")
        assert gone.get("type") == "unavailable" and "110" in codes(gone)
        # Destroyed: each occupant gets its own presence, <destroy/> first, its item, 110.
        await alice.send(f"<iq type='set' to='{ROOM}' id='d'><query xmlns='{MUC}#owner'>"
                         "<destroy><reason>bye</reason></destroy></query></iq>")
        got = {}
        while len(got) < 2:
            stanza = await alice.next()
            got[etree.QName(stanza).localname] = stanza
        assert got["iq"].get("type") == "result"
        x = got["presence"].find(f"{{{USER}}}x")
        assert x is not None and got["presence"].get("type") == "unavailable"
        assert [etree.QName(c).localname for c in x] == ["destroy", "item", "status"]
        assert (item(got["presence"]).get("affiliation"), item(got["presence"]).get("jid"),
                codes(got["presence"])) == ("owner", "alice@a.test/pc", {"110"})
        assert x.findtext(f"{{{USER}}}destroy/{{{USER}}}reason") == "bye"
    finally:
        await stop_server(running)


async def test_presence_broadcast_by_role(tmp_path: Path) -> None:
    """XEP-0045 §15.5.3 muc#roomconfig_presencebroadcast: only moderators' presence is
    broadcast; a participant's can still be probed."""
    running = await start_server(tmp_path)
    try:
        alice, bob = await users(running, "alice", "bob")
        await join(alice, "Alice")
        assert (await submit(alice, {"muc#roomconfig_presencebroadcast": "moderator"})).get(
            "type") == "result"
        got = await join(bob, "Bob")
        # Bob gets Alice's presence (a moderator) and his own; Alice does not get Bob's.
        assert [p.get("from") for p in got if p.tag == f"{{{CLIENT}}}presence"] == [
            f"{ROOM}/Alice", f"{ROOM}/Bob"]
        await alice.send(f"<iq type='get' to='{ROOM}' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
        seen = []
        while (stanza := await alice.next()).get("id") != "p":
            seen.append(stanza.get("from"))
        assert f"{ROOM}/Bob" not in seen  # Bob's join reached the others before this answer
        await alice.send(f"<presence to='{ROOM}/Bob' type='probe'/>")
        probed = await alice.next_of("presence")
        assert probed.get("from") == f"{ROOM}/Bob" and item(probed).get("role") == "participant"
        form = await alice.ask(f"<iq type='get' to='{ROOM}' id='f'><query xmlns='{MUC}#owner'/>"
                               "</iq>", skip_others=True)
        field = form.find(f".//{{{XDATA}}}field[@var='muc#roomconfig_presencebroadcast']")
        assert field is not None and [v.text for v in field.iter(f"{{{XDATA}}}value")
                                      if v.getparent() is field] == ["moderator"]
    finally:
        await stop_server(running)


class _SlowPresenceFilter(Module):
    """A user filter that has to wait (as one reading storage does) for presence from rooms."""

    name = "slow-presence-filter"

    @hook("filter/user", priority=300)
    def slow(self, stanza: Stanza, _origin: Session | None, _to: JID) -> Any:
        if stanza.tag != f"{{{CLIENT}}}presence" or "@muc." not in stanza.get("from", ""):
            return None

        async def later() -> None:
            await asyncio.sleep(0.05)
        return later()


async def test_room_stanzas_keep_their_order_behind_a_waiting_filter(tmp_path: Path) -> None:
    """XEP-0045 §7.2.3/§7.2.16: occupants' presence, self-presence, history, then the subject.
    A filter that waits on the presences must not let the messages overtake them."""
    path = write_config(tmp_path)
    running = RunningServer(Server(load_config(path), extra_modules=(_SlowPresenceFilter,)),
                            tmp_path / "data", path)
    await running.server.start()
    try:
        alice, bob = await users(running, "alice", "bob")
        await join(alice, "Alice", "order@muc.a.test")
        await alice.send("<message to='order@muc.a.test' type='groupchat'><body>hi</body>"
                         "</message>")
        await next_message(alice)
        got = await join(bob, "Bob", "order@muc.a.test")
        kinds = [etree.QName(s).localname for s in got]
        assert kinds == ["presence", "presence", "message", "message"], kinds
        assert "110" in codes(got[1])
    finally:
        await stop_server(running)
