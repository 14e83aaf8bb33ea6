"""Client State Indication (XEP-0352) over real sockets: what an inactive client's session holds
(presence updates, only the latest per contact; chat states; room chatter), what goes out at
once and flushes the rest first (a message with a body, an iq, a mention), <active/>, the
bounded buffer, stream management's counting of held stanzas, and slixmpp's xep_0352."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import slixmpp
from lxml import etree

from server.jid import JID
from server.modules.csi import ClientState, important
from server.modules.stream_management import SMState
from server.sessions import Session
from server.xml import ns
from tests.conftest import RunningServer, start_server, stop_server
from tests.process import free_ports
from tests.rawclient import CLIENT, RawClient, sync
from tests.test_service_hosts import SECRET, raw_component

CSI = "urn:xmpp:csi:0"
INACTIVE = f"<inactive xmlns='{CSI}'/>"
ACTIVE = f"<active xmlns='{CSI}'/>"
CHATSTATES = "http://jabber.org/protocol/chatstates"


async def make_server(tmp_path: Path, extra: str = "", **options: object) -> RunningServer:
    running = await start_server(tmp_path, extra, **options)  # type: ignore[arg-type]
    for user in ("alice", "bob", "carol"):
        await running.add_user(f"{user}@a.test")
    return running


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningServer]:
    server = await make_server(tmp_path, "[csi]\nmax_held = 5\n")
    yield server
    await stop_server(server)


async def login(running: RunningServer, jid: str, resource: str) -> RawClient:
    client = await running.raw_login(jid, resource)
    await client.send("<presence/>")
    await sync(client)
    return client


def session_of(running: RunningServer, jid: str) -> Session:
    session = running.server.sessions.get(JID.parse(jid))
    assert session is not None
    return session


def held(running: RunningServer, jid: str) -> int:
    csi = running.server.module(ClientState)
    assert csi is not None
    return csi.held(session_of(running, jid))


async def until_held(running: RunningServer, jid: str, count: int) -> None:
    for _ in range(200):
        if held(running, jid) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{jid} holds {held(running, jid)} stanzas, not {count}")


def describe(el: etree._Element) -> str:
    """presence:<from>:<show> | chatstate:<from>:<state> | message:<from>:<body> | iq:<id>"""
    kind = etree.QName(el).localname
    sender = (el.get("from") or "").partition("/")[0]
    if kind == "presence":
        return f"presence:{sender}:{el.findtext(f'{{{CLIENT}}}show') or el.get('type', '')}"
    if kind == "message":
        body = el.findtext(f"{{{CLIENT}}}body")
        if body is not None:
            return f"message:{sender}:{body}"
        states = [etree.QName(c).localname for c in el if etree.QName(c).namespace == CHATSTATES]
        return f"chatstate:{sender}:{','.join(states)}"
    return f"{kind}:{el.get('id')}"


async def receive(client: RawClient, count: int) -> list[str]:
    return [describe(await client.next()) for _ in range(count)]


def presence(to: str, show: str) -> str:
    return f"<presence to='{to}'><show>{show}</show></presence>"


def chat_state(to: str, state: str) -> str:
    return f"<message to='{to}' type='chat'><{state} xmlns='{CHATSTATES}'/></message>"


async def test_inactive_holds_until_a_message_with_a_body(running: RunningServer) -> None:
    alice = await running.raw()
    await alice.authenticate("a.test", "alice", "secret-password")
    features = await alice.open("a.test")
    assert features.find(f"{{{CSI}}}csi") is not None  # XEP-0352 §2: a stream feature
    await alice.close()
    alice = await login(running, "alice@a.test", "phone")
    bob = await login(running, "bob@a.test", "pc")
    carol = await login(running, "carol@a.test", "pc")
    phone = "alice@a.test/phone"
    await alice.send(INACTIVE)
    await sync(alice)  # an iq's answer is important: it flushes (nothing is held yet)
    await bob.send(presence(phone, "away"))
    await carol.send(presence(phone, "chat"))
    await bob.send(chat_state(phone, "composing"))
    await bob.send(presence(phone, "dnd"))  # replaces bob's "away", and moves behind
    await until_held(running, phone, 3)
    # A message with a body must go out now: everything held goes first, in order.
    await bob.send(f"<message to='{phone}' type='chat'><body>wake up</body></message>")
    got = [await alice.next() for _ in range(4)]
    assert [describe(el) for el in got] == [
        "presence:carol@a.test:chat", "chatstate:bob@a.test:composing",
        "presence:bob@a.test:dnd", "message:bob@a.test:wake up"]
    # What was held says since when (XEP-0203, as Prosody's mod_csi_simple does).
    delays = [el.find("{urn:xmpp:delay}delay") for el in got]
    assert all(d is not None and d.get("from") == "alice@a.test" and d.get("stamp")
               for d in delays[:3])
    assert delays[3] is None
    # Still inactive: held again; <active/> delivers what is held, then nothing waits.
    await bob.send(chat_state(phone, "paused"))
    await carol.send(presence(phone, "xa"))
    await until_held(running, phone, 2)
    await alice.send(ACTIVE)
    assert await receive(alice, 2) == ["chatstate:bob@a.test:paused", "presence:carol@a.test:xa"]
    await bob.send(chat_state(phone, "active"))
    assert await receive(alice, 1) == ["chatstate:bob@a.test:active"]
    assert held(running, phone) == 0


async def test_iq_and_subscription_requests_are_important(running: RunningServer) -> None:
    alice = await login(running, "alice@a.test", "phone")
    bob = await login(running, "bob@a.test", "pc")
    phone = "alice@a.test/phone"
    await alice.send(INACTIVE)
    await sync(alice)
    await bob.send(presence(phone, "away"))
    await until_held(running, phone, 1)
    await bob.send(f"<iq type='get' id='v1' to='{phone}'><query xmlns='jabber:iq:version'/></iq>")
    assert await receive(alice, 2) == ["presence:bob@a.test:away", "iq:v1"]
    await bob.send(chat_state(phone, "composing"))
    await until_held(running, phone, 1)
    await bob.send("<presence to='alice@a.test' type='subscribe'/>")
    got = [await alice.next() for _ in range(2)]
    assert describe(got[0]) == "chatstate:bob@a.test:composing"
    assert got[1].get("type") == "subscribe", etree.tostring(got[1])


async def test_a_full_buffer_goes_out(running: RunningServer,
                                      caplog: pytest.LogCaptureFixture) -> None:
    alice = await login(running, "alice@a.test", "phone")
    bob = await login(running, "bob@a.test", "pc")
    phone = "alice@a.test/phone"
    await alice.send(INACTIVE)
    await sync(alice)
    states = ["composing", "paused", "active", "inactive"]
    for state in states:
        await bob.send(chat_state(phone, state))
    await until_held(running, phone, 4)  # max_held = 5
    await bob.send(chat_state(phone, "gone"))
    assert await receive(alice, 5) == [f"chatstate:bob@a.test:{s}" for s in [*states, "gone"]]
    assert held(running, phone) == 0
    # Held stanzas of a session that ends are dropped with it: not delivered to the account's
    # other resource, not bounced to the sender, and the server goes on.
    pc = await login(running, "alice@a.test", "pc")  # its presence to phone is held too
    await bob.send(chat_state(phone, "composing"))
    await until_held(running, phone, 2)
    caplog.set_level("INFO", logger="presenced.csi")
    await alice.close()
    for _ in range(200):
        if running.server.sessions.get(JID.parse(phone)) is None:
            break
        await asyncio.sleep(0.01)
    assert running.server.sessions.get(JID.parse(phone)) is None
    assert "event=csi-dropped jid=alice@a.test/phone count=2" in caplog.text
    assert [describe(el) for el in await sync(bob) if el.tag != f"{{{CLIENT}}}presence"] == []
    assert [describe(el) for el in await sync(pc) if el.tag != f"{{{CLIENT}}}presence"] == []
    await bob.send("<message to='alice@a.test/pc' type='chat'><body>still here</body></message>")
    assert describe(await pc.next_of("message")) == "message:bob@a.test:still here"


async def test_stream_management_counts_held_stanzas_when_delivered(
        running: RunningServer) -> None:
    from tests.test_stream_management import SM, sm_login
    alice, _ = await sm_login(running, "alice@a.test", "phone")
    bob = await login(running, "bob@a.test", "pc")
    phone = "alice@a.test/phone"
    await alice.send(INACTIVE)
    await bob.send(presence(phone, "away"))
    await bob.send(presence(phone, "dnd"))
    await bob.send(chat_state(phone, "composing"))
    await until_held(running, phone, 2)
    outbox = session_of(running, phone).outbox
    assert isinstance(outbox, SMState) and len(outbox.queue) == 0
    await alice.send(ACTIVE)
    assert await receive(alice, 2) == ["presence:bob@a.test:dnd",
                                       "chatstate:bob@a.test:composing"]
    assert len(outbox.queue) == 2
    # Acknowledging exactly what was delivered is right (one more would end the stream).
    await alice.send(f"<a xmlns='{SM}' h='2'/><r xmlns='{SM}'/>")
    answer = await alice.next()
    assert answer.tag == f"{{{SM}}}a", etree.tostring(answer)
    assert len(outbox.queue) == 0


async def test_a_mention_in_a_room_is_important(tmp_path: Path) -> None:
    (port,) = free_ports(1, "127.0.0.1")
    running = await make_server(
        tmp_path, f'[components]\n"muc.a.test" = {{ secret = "{SECRET}" }}\n',
        listen_extra=f'component = ["127.0.0.1:{port}"]')
    try:
        room, _ = await raw_component(running.address("component")[1], "muc.a.test")
        await room.next()  # <handshake/>
        alice = await login(running, "alice@a.test", "phone")
        phone = "alice@a.test/phone"
        # Joining as "Alice": the server notes the nickname.
        await alice.send("<presence to='room@muc.a.test/Alice'>"
                         "<x xmlns='http://jabber.org/protocol/muc'/></presence>")
        join = await room.next()
        assert join.get("to") == "room@muc.a.test/Alice"
        await alice.send(INACTIVE)
        await sync(alice)

        def groupchat(sender: str, body: str) -> str:
            return (f"<message xmlns='jabber:component:accept' from='room@muc.a.test/{sender}' "
                    f"to='{phone}' type='groupchat'><body>{body}</body></message>")
        await room.send(groupchat("bob", "chatter"))
        await room.send(groupchat("carol", "more chatter"))
        await until_held(running, phone, 2)
        await room.send(groupchat("bob", "hey Alice, look"))
        assert await receive(alice, 3) == [
            "message:room@muc.a.test:chatter", "message:room@muc.a.test:more chatter",
            "message:room@muc.a.test:hey Alice, look"]
    finally:
        await stop_server(running)


def test_what_is_important() -> None:
    def el(xml: str) -> etree._Element:
        return etree.fromstring(re.sub(r"^<(\w+)", rf"<\1 xmlns='{ns.CLIENT}'", xml))
    rooms = {"room@muc.example": "Al"}
    cases = [
        ("<presence/>", False),
        ("<presence type='unavailable'/>", False),
        ("<presence type='subscribe'/>", True),
        ("<presence type='error'/>", True),
        ("<iq type='get' id='1'/>", True),
        ("<message type='chat'><body>hi</body></message>", True),
        ("<message type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/>"
         "</message>", False),
        ("<message><event xmlns='http://jabber.org/protocol/pubsub#event'/></message>", False),
        ("<message type='headline'><body>news</body></message>", False),
        ("<message type='error'/>", True),
        ("<message><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>", True),
        ("<message from='room@muc.example/b' type='groupchat'><body>x</body></message>", False),
        ("<message from='room@muc.example/b' type='groupchat'><body>Al: x</body></message>",
         True),
        ("<message from='room@muc.example' type='groupchat'><subject>s</subject></message>",
         True),
        # A carbon is as important as what it carries.
        ("<message><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
         f"<message xmlns='{ns.CLIENT}'><body>b</body></message></forwarded></received>"
         "</message>", True),
        ("<message><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
         f"<message xmlns='{ns.CLIENT}'><gone xmlns='http://jabber.org/protocol/chatstates'/>"
         "</message></forwarded></sent></message>", False),
    ]
    for xml, expected in cases:
        assert important(el(xml), rooms) is expected, xml


async def test_slixmpp_client_state(running: RunningServer) -> None:
    alice = await running.client("alice@a.test", resource="phone",
                                 plugins=("xep_0352", "xep_0085"))
    bob = await running.client("bob@a.test", resource="pc", plugins=("xep_0085",))
    assert alice.plugin["xep_0352"].enabled
    events: asyncio.Queue[str] = asyncio.Queue()

    def state(msg: slixmpp.Message) -> None:
        events.put_nowait(f"state:{msg['chat_state']}")

    def message(msg: slixmpp.Message) -> None:
        if msg["body"]:
            events.put_nowait(f"body:{msg['body']}")
    alice.add_event_handler("chatstate", state)
    alice.add_event_handler("message", message)
    alice.plugin["xep_0352"].send_inactive()
    phone = "alice@a.test/phone"
    for _ in range(200):
        if session_of(running, phone).gate is not None:
            break
        await asyncio.sleep(0.01)
    msg = bob.make_message(mto=slixmpp.JID(phone), mtype="chat")
    msg["chat_state"] = "composing"
    msg.send()
    await until_held(running, phone, 1)
    assert events.empty()
    bob.send_message(mto=slixmpp.JID(phone), mbody="hello", mtype="chat")
    assert await asyncio.wait_for(events.get(), 5) == "state:composing"
    assert await asyncio.wait_for(events.get(), 5) == "body:hello"
