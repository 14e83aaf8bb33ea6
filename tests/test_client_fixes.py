"""Fixes found by real clients (issue 9 item 7), over real sockets: an empty <show/>
(go-sendxmpp), the unavailable presence echoed to the sending resource (RFC 6121 §4.5.2),
last activity recorded when the last available resource goes (XEP-0012, as Prosody), and a
roster set answered before its pushes (RFC 6121 §2.3.2)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from typing import Any

import pytest
from lxml import etree

from server.jid import JID
from tests.conftest import PASSWORD, RunningServer, on_ci, stop_server
from tests.rawclient import CLIENT, condition, sync

MESSAGE = f"{{{CLIENT}}}message"
PRESENCE = f"{{{CLIENT}}}presence"
IQ = f"{{{CLIENT}}}iq"
SHOW = f"{{{CLIENT}}}show"
STATUS = f"{{{CLIENT}}}status"
PRIORITY = f"{{{CLIENT}}}priority"
ROSTER = "jabber:iq:roster"
LAST = "jabber:iq:last"
LAST_QUERY = f"{{{LAST}}}query"
GO_SENDXMPP = shutil.which("go-sendxmpp")


def presences(stanzas: list[etree._Element], type_: str | None = None,
              from_: str | None = None) -> list[etree._Element]:
    return [el for el in stanzas if el.tag == PRESENCE and el.get("type") == type_
            and (from_ is None or el.get("from") == from_)]


def bodies(stanzas: list[etree._Element]) -> list[str | None]:
    return [el.findtext(f"{{{CLIENT}}}body") for el in stanzas if el.tag == MESSAGE]


def last_query(to: str | None, id_: str) -> str:
    attr = f" to='{to}'" if to else ""
    return f"<iq type='get' id='{id_}'{attr}><query xmlns='{LAST}'/></iq>"


def allow_all(running: RunningServer) -> None:
    """Everyone may see everyone's presence (instead of setting up subscriptions)."""
    def may_see(_presentity: JID, _requester: JID) -> bool:
        return True
    running.server.hooks.add("access/may-see-presence", may_see, 10_000)


# -- liberal <show/> and <priority/> (go-sendxmpp / go-xmpp) ----------------------------------

async def test_empty_show_is_no_show_and_offline_messages_arrive(server: RunningServer) -> None:
    """go-xmpp's initial presence is <show></show><status></status>: Prosody and ejabberd take
    it as no show; the account comes online and gets its offline messages."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    # Another resource, available but with a negative priority: it takes no offline messages
    # and no messages to the bare JID (RFC 6121 §4.7.2.3), but sees its own account's presence.
    other = await server.raw_login("bob@a.test", resource="desk")
    await other.send("<presence><priority>-1</priority></presence>")
    await sync(other)
    alice = await server.raw_login("alice@a.test")
    await alice.send("<message to='bob@a.test' type='chat' id='m1'><body>while away</body></message>")
    assert not [el for el in await sync(alice) if el.tag == MESSAGE]  # stored, not bounced
    bob = await server.raw_login("bob@a.test", resource="go")
    await bob.send(b"<presence xml:lang='en'><show></show><status></status></presence>\n")
    got = await sync(bob)
    assert not presences(got, "error"), [etree.tostring(el) for el in got]
    own = presences(got, None, "bob@a.test/go")
    assert own, [etree.tostring(el) for el in got]
    assert own[0].find(SHOW) is None  # an empty <show/> is not passed on
    assert bodies(got) == ["while away"]
    # Another resource of the account sees it available, without the empty <show/>.
    seen = presences(await sync(other), None, "bob@a.test/go")
    assert len(seen) == 1 and seen[0].find(SHOW) is None
    # It is available: a message to the bare JID goes to it.
    await alice.send("<message to='bob@a.test' type='chat'><body>live</body></message>")
    await sync(alice, "s1")  # alice's stream handled it (and queued it for bob) ...
    assert bodies(await sync(bob, "s2")) == ["live"]  # ... before bob's ping is answered


@pytest.mark.parametrize(("presence", "show", "priority"), [
    ("<presence><show>  away\n</show></presence>", "away", 0),
    ("<presence><show>\n</show><priority>3</priority></presence>", None, 3),
    ("<presence><show>dnd</show><priority/></presence>", "dnd", 0),
    ("<presence><priority> 5 </priority></presence>", None, 5),
])
async def test_harmless_show_and_priority_quirks(server: RunningServer, presence: str,
                                                 show: str | None, priority: int) -> None:
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send(presence)
    got = await sync(alice)
    assert not presences(got, "error"), [etree.tostring(el) for el in got]
    echo = presences(got, None, "alice@a.test/raw")
    assert len(echo) == 1, [etree.tostring(el) for el in got]
    assert echo[0].findtext(SHOW) == show
    assert len(echo[0].findall(SHOW)) == (show is not None)
    if priority == 0:
        assert echo[0].find(PRIORITY) is None or echo[0].findtext(PRIORITY, "").strip() == "0"
    session = server.server.sessions.get(JID.parse("alice@a.test/raw"))
    assert session is not None and session.priority == priority


@pytest.mark.parametrize("presence", [
    "<presence><show>busy</show></presence>",
    "<presence><priority>300</priority></presence>",
    "<presence><priority>high</priority></presence>",
])
async def test_wrong_show_or_priority_is_still_refused(server: RunningServer,
                                                       presence: str) -> None:
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send(presence)
    got = await sync(alice)
    errors = presences(got, "error")
    assert len(errors) == 1 and condition(errors[0]) == "bad-request"
    session = server.server.sessions.get(JID.parse("alice@a.test/raw"))
    assert session is not None and session.presence is None


@contextlib.asynccontextmanager
async def go_sendxmpp_listening(running: RunningServer, jid: str):  # type: ignore[no-untyped-def]
    """`go-sendxmpp -l`: logs in, sends its initial presence, prints each message it gets."""
    assert GO_SENDXMPP is not None
    host, port = running.address()
    proc = await asyncio.create_subprocess_exec(
        GO_SENDXMPP, "-u", jid, "-p", PASSWORD, "-j", f"{host}:{port}", "-n", "-l", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def printed(proc: Any, text: str, timeout: float = 15.0) -> None:
    output = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text.encode() not in output:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"go-sendxmpp did not print {text!r}; it printed {output!r}")
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), remaining)
        except TimeoutError:
            continue
        if not line:
            raise AssertionError(f"go-sendxmpp ended without printing {text!r}: {output!r}")
        output += line


@pytest.mark.skipif(GO_SENDXMPP is None and not on_ci(),
                    reason="go-sendxmpp is not installed (CI installs it)")
async def test_go_sendxmpp_listen_gets_offline_and_live_messages(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.raw_login("alice@a.test")
    await alice.send("<message to='bob@a.test' type='chat'><body>sent while offline</body></message>")
    await sync(alice)
    async with go_sendxmpp_listening(server, "bob@a.test") as proc:
        await printed(proc, "sent while offline")
        sessions = server.server.sessions.resources(JID.parse("bob@a.test"))
        assert [s.presence is not None for s in sessions] == [True]  # it came online
        await alice.send("<message to='bob@a.test' type='chat'><body>sent live</body></message>")
        await printed(proc, "sent live")
    await alice.close()


# -- RFC 6121 §4.5.2: unavailable presence echoed to the user's own resources ------------------

async def test_unavailable_presence_reaches_all_own_resources_and_the_sender(
        server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    pc = await server.raw_login("alice@a.test", resource="pc")
    phone = await server.raw_login("alice@a.test", resource="phone")
    await pc.send("<presence/>")
    await sync(pc)
    await phone.send("<presence/>")
    await sync(phone)
    await sync(pc)
    await pc.send("<presence type='unavailable'><status>bye</status></presence>")
    own = presences(await sync(pc), "unavailable", "alice@a.test/pc")
    assert len(own) == 1 and own[0].findtext(STATUS) == "bye"
    assert own[0].get("to") == "alice@a.test/pc"
    other = presences(await sync(phone), "unavailable", "alice@a.test/pc")
    assert len(other) == 1 and other[0].findtext(STATUS) == "bye"
    assert other[0].get("to") == "alice@a.test/phone"
    # Unavailable again while unavailable: nothing to announce.
    await pc.send("<presence type='unavailable'/>")
    assert not presences(await sync(pc, "s2"), "unavailable")
    assert not presences(await sync(phone, "s2"), "unavailable")


# -- XEP-0012: recorded when the account's last available resource goes ----------------------

async def test_last_activity_right_after_unavailable_on_the_same_connection(
        server: RunningServer) -> None:
    """Prosody's lastactivity script: unavailable with a status, then ask at once."""
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    await bob.send("<presence type='unavailable'><status>gone fishing</status></presence>")
    reply = await bob.ask(last_query(None, "own"), skip_others=True)
    assert reply.get("type") == "result", etree.tostring(reply)
    query = reply.find(LAST_QUERY)
    assert query is not None and query.get("seconds") == "0" and query.text == "gone fishing"
    reply = await bob.ask(last_query("bob@a.test", "to-self"), skip_others=True)
    query = reply.find(LAST_QUERY)
    assert query is not None and query.get("seconds") == "0" and query.text == "gone fishing"
    record = await server.server.storage.last_activity.get("bob", "a.test")
    assert record is not None and record[1] == "gone fishing"
    assert abs(record[0] - time.time()) < 5


async def test_last_activity_counts_from_the_unavailable_presence(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    allow_all(server)
    alice = await server.raw_login("alice@a.test")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    await bob.send("<presence type='unavailable'><status>later</status></presence>")
    await sync(bob)
    # Stays connected; the stored time is what the answer counts from.
    await server.server.storage.last_activity.set("bob", "a.test", int(time.time()) - 600,
                                                  "later")
    reply = await alice.ask(last_query("bob@a.test", "l1"), skip_others=True)
    query = reply.find(LAST_QUERY)
    assert query is not None and query.text == "later"
    assert 600 <= int(query.get("seconds", "-1")) <= 610
    # Available again: seconds='0', no status (XEP-0012 §3).
    await bob.send("<presence/>")
    await sync(bob)
    reply = await alice.ask(last_query("bob@a.test", "l2"), skip_others=True)
    query = reply.find(LAST_QUERY)
    assert query is not None and query.get("seconds") == "0" and not query.text


async def test_last_activity_when_the_available_resource_drops_tcp(server: RunningServer) -> None:
    """The last *available* resource drops its TCP connection while another stays connected
    without presence: that is the account's last activity."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    allow_all(server)
    bot = await server.raw_login("bob@a.test", resource="bot")  # connected, never available
    pc = await server.raw_login("bob@a.test", resource="pc")
    await pc.send("<presence><status>working</status></presence>")
    await sync(pc)
    before = int(time.time())
    pc.writer.transport.abort()
    for _ in range(100):
        if server.server.sessions.get(JID.parse("bob@a.test/pc")) is None:
            break
        await asyncio.sleep(0.02)
    record = None
    for _ in range(100):
        record = await server.server.storage.last_activity.get("bob", "a.test")
        if record is not None:
            break
        await asyncio.sleep(0.02)
    assert record is not None and before <= record[0] <= int(time.time()) and record[1] == ""
    reply = await bot.ask(last_query(None, "l"), skip_others=True)
    assert reply.get("type") == "result", etree.tostring(reply)
    query = reply.find(LAST_QUERY)
    assert query is not None and 0 <= int(query.get("seconds", "-1")) <= 5 and not query.text
    alice = await server.raw_login("alice@a.test")
    reply = await alice.ask(last_query("bob@a.test", "l2"), skip_others=True)
    assert reply.get("type") == "result", etree.tostring(reply)


async def test_last_activity_not_recorded_while_another_resource_is_available(
        server: RunningServer) -> None:
    await server.add_user("bob@a.test")
    pc = await server.raw_login("bob@a.test", resource="pc")
    phone = await server.raw_login("bob@a.test", resource="phone")
    await pc.send("<presence/>")
    await phone.send("<presence/>")
    await sync(phone)
    await pc.send("<presence type='unavailable'><status>phone still on</status></presence>")
    await sync(pc)
    assert await server.server.storage.last_activity.get("bob", "a.test") is None
    reply = await pc.ask(last_query(None, "l"), skip_others=True)
    query = reply.find(LAST_QUERY)
    assert query is not None and query.get("seconds") == "0" and not query.text


# -- RFC 6121 §2.3.2: the result first, then the pushes ----------------------------------------

async def test_roster_set_and_remove_answered_before_the_push(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    pc = await server.raw_login("alice@a.test", resource="pc")
    phone = await server.raw_login("alice@a.test", resource="phone")
    for client in (pc, phone):
        reply = await client.ask(f"<iq type='get' id='g'><query xmlns='{ROSTER}'/></iq>")
        assert reply.get("type") == "result"
    await pc.send(f"<iq type='set' id='s1'><query xmlns='{ROSTER}'>"
                  "<item jid='bob@a.test' name='Bob'/></query></iq>")
    first = await pc.next()
    assert first.tag == IQ and first.get("id") == "s1" and first.get("type") == "result", \
        etree.tostring(first)
    push = await pc.next()
    assert push.tag == IQ and push.get("type") == "set", etree.tostring(push)
    item = push.find(f"{{{ROSTER}}}query/{{{ROSTER}}}item")
    assert item is not None and item.get("jid") == "bob@a.test" and item.get("name") == "Bob"
    await pc.send(f"<iq type='result' id='{push.get('id')}'/>")
    other = await phone.next()
    assert other.tag == IQ and other.get("type") == "set", etree.tostring(other)
    await phone.send(f"<iq type='result' id='{other.get('id')}'/>")
    # Removal (RFC 6121 §2.5.2): the same order.
    await pc.send(f"<iq type='set' id='s2'><query xmlns='{ROSTER}'>"
                  "<item jid='bob@a.test' subscription='remove'/></query></iq>")
    first = await pc.next()
    assert first.tag == IQ and first.get("id") == "s2" and first.get("type") == "result", \
        etree.tostring(first)
    push = await pc.next()
    item = push.find(f"{{{ROSTER}}}query/{{{ROSTER}}}item")
    assert item is not None and item.get("subscription") == "remove"
    other = await phone.next()
    item = other.find(f"{{{ROSTER}}}query/{{{ROSTER}}}item")
    assert item is not None and item.get("subscription") == "remove"


# -- issue 19 item 5: every form the server sends has labels -------------------------------------

XDATA = "jabber:x:data"


def unlabelled(form: etree._Element) -> list[str]:
    """XEP-0004 §3.2: the fields a client shows (all but hidden and fixed) and the options of
    list fields need a label (profanity shows `[field3] (null)` otherwise)."""
    missing = []
    fields = [*form.iterfind(f"{{{XDATA}}}field"),
              *form.iterfind(f"{{{XDATA}}}reported/{{{XDATA}}}field")]
    assert fields, etree.tostring(form)
    for field in fields:
        if field.get("type") in ("hidden", "fixed"):
            continue
        if not (field.get("label") or "").strip():
            missing.append(field.get("var") or "?")
        for option in field.iterfind(f"{{{XDATA}}}option"):
            if not (option.get("label") or "").strip():
                missing.append(f"{field.get('var')}/{option.findtext(f'{{{XDATA}}}value')}")
    return missing


async def test_forms_outside_rooms_and_pubsub_have_labels(tmp_path: Any) -> None:
    from tests.test_http import start_web
    running = await start_web(tmp_path, "[upload]\n")
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        forms = {}
        for xmlns in ("urn:xmpp:mam:2", "urn:xmpp:mam:1"):  # XEP-0313 §4.1.1
            reply = await alice.ask(f"<iq type='get' id='f'><query xmlns='{xmlns}'/></iq>")
            forms[xmlns] = reply.find(f"{{{xmlns}}}query/{{{XDATA}}}x")
        reply = await alice.ask(  # XEP-0050: the ad-hoc command's result
            "<iq type='set' id='c' to='a.test'><command xmlns='http://jabber.org/protocol/"
            "commands' node='watchers' action='execute'/></iq>")
        forms["adhoc"] = reply.find(f"{{http://jabber.org/protocol/commands}}command/{{{XDATA}}}x")
        reply = await alice.ask(  # XEP-0363 §3: the size limit in disco#info
            "<iq type='get' id='d' to='upload.a.test'><query "
            "xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        forms["upload"] = reply.find(f"{{http://jabber.org/protocol/disco#info}}query/{{{XDATA}}}x")
        for name, form in forms.items():
            assert form is not None, name
            assert unlabelled(form) == [], (name, etree.tostring(form))
    finally:
        await stop_server(running)
