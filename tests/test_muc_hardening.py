"""Multi-User Chat, odd and hostile input and what users tripped on (issues 19, 20): nicknames
compared case-mapped (RFC 8266 §2.4), <history/> limits that are not numbers, join history of
persistent rooms after a restart (graceful and kill -9), a presence flood, rooms per account,
labelled forms (XEP-0045 §10.2, XEP-0004), a second session under another nickname (XEP-0045
§7.2). Raw clients over real sockets."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import RunningServer, start_server, stop_server
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
from tests.test_muc_core import storage_table, users
from tests.test_persistence import configure, kill_9, login, start

XDATA = "jabber:x:data"
DELAY = "urn:xmpp:delay"
SID = "urn:xmpp:sid:0"
REQUEST = MUC + "#request"


@pytest.fixture
async def muc(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, "[muc]\npresence_rate = 1\npresence_burst = 3\n"
                                           "max_rooms_joined = 2\n")
    try:
        yield running
    finally:
        await stop_server(running)


async def refused_join(client: RawClient, occupant: str) -> etree._Element:
    await client.send(f"<presence to='{occupant}'><x xmlns='{MUC}'/></presence>")
    refused = await client.next_of("presence")
    assert refused.get("from") == occupant and refused.get("type") == "error", \
        etree.tostring(refused)
    return refused


async def ping(client: RawClient, to: str = "a.test") -> None:
    """A marker: everything the server sent before the pong has arrived by then."""
    pong = await client.ask(f"<iq type='get' to='{to}' id='mark'>"
                            "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
    assert pong.get("type") == "result"


# -- nicknames (RFC 8266 §2.4, XEP-0045 §7.2.9) ------------------------------------------------

async def test_case_variants_of_a_nickname_conflict(muc: RunningServer) -> None:
    alice, bob, carol = await users(muc, "alice", "bob", "carol")
    await join(alice, "Alice")
    for client, nick in ((bob, "alice"), (carol, "ALICE"), (bob, "\uff21lice")):
        refused = await refused_join(client, f"{ROOM}/{nick}")
        assert condition(refused) == "conflict"
    # A registered nickname is reserved in every case too.
    await join(bob, "Bob")
    reply = await bob.ask(
        f"<iq type='set' to='{ROOM}' id='reg'><query xmlns='jabber:iq:register'>"
        f"<x xmlns='{XDATA}' type='submit'><field var='muc#register_roomnick'><value>Bobby"
        "</value></field></x></query></iq>", skip_others=True)
    assert reply.get("type") == "result"
    assert condition(await refused_join(carol, f"{ROOM}/bOBBY")) == "conflict"
    # A nick change into a case variant of someone else's nick: conflict as well.
    await join(carol, "Carol")
    await carol.send(f"<presence to='{ROOM}/aLiCe'/>")
    refused = await carol.next_of("presence")
    assert refused.get("type") == "error" and condition(refused) == "conflict"
    # A private message to a case variant reaches the occupant under the nickname.
    await bob.send(f"<message to='{ROOM}/ALICE' type='chat'><body>psst</body></message>")
    got = await next_message(alice)
    assert (got.get("from"), body(got)) == (f"{ROOM}/Bob", "psst")


# -- <history/> limits (XEP-0045 §7.2.15) ----------------------------------------------------------

@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "-1", "", "1e3"])
async def test_unreadable_history_limits_do_not_refuse_the_join(muc: RunningServer,
                                                                 value: str) -> None:
    alice, bob = await users(muc, "alice", "bob")
    await join(alice, "Alice")
    for n in range(3):
        await alice.send(f"<message to='{ROOM}' type='groupchat'><body>m{n}</body></message>")
        await next_message(alice)
    for attribute in ("maxstanzas", "maxchars", "seconds"):
        # Ignored as if not given (the room's own history), never internal-server-error.
        got = await join(bob, "Bob", extra=f"<history {attribute}='{value}'/>")
        assert codes(self_presence(got)) == {"110"}
        assert [body(s) for s in got if s.tag == f"{{{CLIENT}}}message" and body(s)] == [
            "m0", "m1", "m2"]
        await bob.send(f"<presence to='{ROOM}/Bob' type='unavailable'/>")
        await next_presence_from(bob, f"{ROOM}/Bob")


# -- join history of persistent rooms after a restart ----------------------------------------------

async def say_things(port: int) -> list[str]:
    """Alice makes a persistent room with history length 3, says five things (and changes the
    subject between them); the archive ids of what she said."""
    alice = await login(port, "alice", "pc")
    await join(alice, "Alice")
    reply = await submit(alice, {"muc#roomconfig_persistentroom": "1",
                                 "muc#roomconfig_historylength": "3"})
    assert reply.get("type") == "result"
    ids = []
    for n in range(5):
        await alice.send(f"<message to='{ROOM}' type='groupchat'><body>said {n}</body>"
                         "</message>")
        echo = await next_message(alice)
        sid = echo.find(f"{{{SID}}}stanza-id")
        assert sid is not None
        ids.append(sid.get("id", ""))
        if n == 3:
            await alice.send(f"<message to='{ROOM}' type='groupchat'><subject>Topic</subject>"
                             "</message>")
            await next_message(alice)
    await ping(alice)
    return ids


@pytest.mark.parametrize(("how", "backend"), [("graceful", "sqlite"), ("kill -9", "sqlite"),
                                              ("kill -9", "postgresql")])
async def test_history_of_a_persistent_room_after_a_restart(
        tmp_path: Path, how: str, backend: str, request: pytest.FixtureRequest) -> None:
    config, port = configure(tmp_path, ("alice", "bob"), storage_table(backend, request))
    proc = start(config, tmp_path)
    try:
        ids = await say_things(port)
    finally:
        if how == "kill -9":
            kill_9(proc)
        else:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    proc = start(config, tmp_path)
    try:
        bob = await login(port, "bob", "pc")
        got = await join(bob, "Bob")
        history = [s for s in got if s.tag == f"{{{CLIENT}}}message" and body(s)]
        # The room's history length (3), oldest first, each as it went out live: from the
        # speaker, with <delay/> by the room and the same stanza id (the archive id).
        assert [body(m) for m in history] == ["said 2", "said 3", "said 4"]
        assert [m.get("from") for m in history] == [f"{ROOM}/Alice"] * 3
        for message, archive_id in zip(history, ids[2:], strict=True):
            delay = message.find(f"{{{DELAY}}}delay")
            assert delay is not None and delay.get("from") == ROOM
            sid = message.find(f"{{{SID}}}stanza-id")
            assert sid is not None and (sid.get("id"), sid.get("by")) == (archive_id, ROOM)
        assert got[-1].findtext(f"{{{CLIENT}}}subject") == "Topic"
        # Within <history/> limits as well.
        phone_got = await join(await login(port, "alice", "phone"), "Al",
                               extra="<history maxstanzas='1'/>")
        assert [body(m) for m in phone_got if m.tag == f"{{{CLIENT}}}message" and body(m)] == [
            "said 4"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


# -- a presence flood is not broadcast -----------------------------------------------------------

@pytest.mark.parametrize("rejoin", [False, True])
async def test_a_presence_flood_is_not_broadcast(muc: RunningServer, rejoin: bool) -> None:
    alice, bob = await users(muc, "alice", "bob")
    await join(alice, "Alice")
    await join(bob, "Bob")
    await next_presence_from(alice, f"{ROOM}/Bob")
    status = "x" * 1000
    # Status updates, or join presences from the session already in (a resync each).
    x = f"<x xmlns='{MUC}'/>" if rejoin else ""
    for n in range(200):
        await bob.send(f"<presence to='{ROOM}/Bob'><status>{n} {status}</status>{x}"
                       "</presence>")
    await ping(bob)
    # Alice gets the burst (3) at once, and the latest state once the rate (1/s) allows:
    # never the two hundred.
    seen: list[str] = []
    try:
        while True:
            stanza = await asyncio.wait_for(alice.next(), 2.5)
            if stanza.tag == f"{{{CLIENT}}}presence" and stanza.get("from") == f"{ROOM}/Bob":
                seen.append((stanza.findtext(f"{{{CLIENT}}}status") or "").split()[0])
    except TimeoutError:
        pass
    assert seen[:3] == ["0", "1", "2"] and seen[-1] == "199" and len(seen) <= 5, seen
    # Bob was never told anything went wrong, and is still in the room.
    pong = await bob.ask(f"<iq type='get' to='{ROOM}/Bob' id='self'>"
                         "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
    assert pong.get("type") == "result"
    # A newcomer sees Bob's latest presence.
    carol, = await users(muc, "carol")
    got = await join(carol, "Carol")
    bobs = [s for s in got if s.get("from") == f"{ROOM}/Bob"]
    assert bobs and (bobs[0].findtext(f"{{{CLIENT}}}status") or "").startswith("199 ")


# -- rooms per account ----------------------------------------------------------------------------

async def test_rooms_joined_per_account(muc: RunningServer) -> None:
    alice, = await users(muc, "alice")
    phone = await muc.raw_login("alice@a.test", resource="phone")
    await join(alice, "Alice", "one@muc.a.test")
    await join(phone, "Alice", "two@muc.a.test")  # another session: the same account
    refused = await refused_join(alice, "three@muc.a.test/Alice")
    assert condition(refused) == "resource-constraint"
    # A room the account is in already is no more rooms.
    assert codes(self_presence(await join(phone, "Alice", "one@muc.a.test"))) == {"110"}
    await alice.send("<presence to='one@muc.a.test/Alice' type='unavailable'/>")
    await phone.send("<presence to='one@muc.a.test/Alice' type='unavailable'/>")
    await next_presence_from(phone, "one@muc.a.test/Alice")
    await ping(alice)
    assert "201" in codes(self_presence(await join(alice, "Alice", "three@muc.a.test")))


# -- labelled forms (XEP-0045 §10.2, XEP-0004 §3.2) ----------------------------------------------

def assert_labelled(form: etree._Element | None) -> list[str]:
    assert form is not None
    fields = list(form.iter(f"{{{XDATA}}}field"))
    assert fields
    for field in fields:
        if field.get("type") != "hidden":
            assert field.get("label"), etree.tostring(field)
        if field.get("type", "").startswith("list-"):
            options = field.findall(f"{{{XDATA}}}option")
            assert options and all(o.get("label") for o in options), etree.tostring(field)
    return [f.get("var", "") for f in fields]


async def test_room_forms_have_labels(muc: RunningServer) -> None:
    alice, bob = await users(muc, "alice", "bob")
    await join(alice, "Alice")
    config = await alice.ask(f"<iq type='get' to='{ROOM}' id='f'><query xmlns='{MUC}#owner'/>"
                             "</iq>", skip_others=True)
    config_vars = assert_labelled(config.find(f".//{{{XDATA}}}x"))
    assert "muc#roomconfig_whois" in config_vars
    whois = config.find(f".//{{{XDATA}}}field[@var='muc#roomconfig_whois']")
    assert whois is not None
    assert {o.get("label") for o in whois.iter(f"{{{XDATA}}}option")} == {
        "Moderators only", "Anyone"}
    register = await bob.ask(f"<iq type='get' to='{ROOM}' id='r'>"
                             "<query xmlns='jabber:iq:register'/></iq>", skip_others=True)
    assert "muc#register_roomnick" in assert_labelled(register.find(f".//{{{XDATA}}}x"))
    # The voice request form a moderator gets (XEP-0045 §8.6).
    assert (await submit(alice, {"muc#roomconfig_moderatedroom": "1"})).get("type") == "result"
    await join(bob, "Bob")
    await bob.send(f"<message to='{ROOM}'><x xmlns='{XDATA}' type='submit'><field "
                   f"var='FORM_TYPE'><value>{REQUEST}</value></field><field var='muc#role'>"
                   "<value>participant</value></field></x></message>")
    while True:
        got = await next_message(alice)
        if got.find(f"{{{XDATA}}}x") is not None:
            break
    assert "muc#request_allow" in assert_labelled(got.find(f"{{{XDATA}}}x"))


# -- a second session under another nickname (XEP-0045 §7.2) --------------------------------------

async def test_a_second_session_may_use_another_nickname(muc: RunningServer) -> None:
    alice, bob = await users(muc, "alice", "bob")
    phone = await muc.raw_login("alice@a.test", resource="phone")
    await join(alice, "Alice")
    await join(bob, "Bob")
    # Another nickname from another session: another occupant (the nickname is the user's
    # identity in the room; §7.2.9 only keeps one nickname to one bare JID).
    got = await join(phone, "AliceOnPhone")
    mine = self_presence(got)
    assert mine.get("from") == f"{ROOM}/AliceOnPhone" and codes(mine) == {"110"}
    assert item(mine).get("affiliation") == "owner"  # affiliations are the account's
    assert {s.get("from") for s in got if s.tag == f"{{{CLIENT}}}presence"} >= {
        f"{ROOM}/Alice", f"{ROOM}/Bob"}
    seen = await next_presence_from(bob, f"{ROOM}/AliceOnPhone")
    assert seen.get("type") is None
    # Each speaks under its own nickname, and each gets the room's messages.
    await phone.send(f"<message to='{ROOM}' type='groupchat'><body>from the phone</body>"
                     "</message>")
    got_bob = await next_message(bob)
    assert (got_bob.get("from"), body(got_bob)) == (f"{ROOM}/AliceOnPhone", "from the phone")
    assert body(await next_message(alice)) == "from the phone"
    assert body(await next_message(phone)) == "from the phone"  # its own echo
    # The first session leaving leaves the other occupant in.
    await alice.send(f"<presence to='{ROOM}/Alice' type='unavailable'/>")
    gone = await next_presence_from(bob, f"{ROOM}/Alice")
    assert gone.get("type") == "unavailable"
    await bob.send(f"<message to='{ROOM}' type='groupchat'><body>still there?</body></message>")
    assert body(await next_message(phone)) == "still there?"


# -- the room archive's page limit is [mam] max_page (issue 20) -----------------------------------

async def test_room_archive_pages_follow_mam_max_page(tmp_path: Path) -> None:
    running = await start_server(tmp_path, "[mam]\nmax_page = 120\n")
    try:
        alice, = await users(running, "alice")
        await join(alice, "Alice")

        async def query(limit: int) -> etree._Element:
            return await alice.ask(
                f"<iq type='set' to='{ROOM}' id='q{limit}'><query xmlns='urn:xmpp:mam:2'>"
                f"<set xmlns='http://jabber.org/protocol/rsm'><max>{limit}</max></set>"
                "</query></iq>", skip_others=True)
        assert (await query(120)).get("type") == "result"  # over the old fixed 100
        refused = await query(121)
        assert refused.get("type") == "error" and condition(refused) == "policy-violation"
    finally:
        await stop_server(running)
