"""Watcher information, fetch records and the poller limit (RFC 2778 §2.2), and the XEP-0050
command that shows them: the pure fetch log, then real clients over sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import slixmpp
import xmlschema
from lxml import etree

from server.jid import JID
from server.presence.watchers import FetchLog, watchers_of
from server.storage.base import RosterItem
from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient
from tests.test_presence import next_presence, roster_of, subscribe_both

WATCHERS_NS = "urn:presenced:watchers:0"
WATCHER = f"{{{WATCHERS_NS}}}watcher"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
IQ = f"{{{CLIENT}}}iq"
PRESENCE = f"{{{CLIENT}}}presence"
SCHEMA = xmlschema.XMLSchema(str(Path(__file__).parent.parent / "schemas" / "watchers.xsd"))

ALICE = JID.parse("alice@a.test")
EVE = JID.parse("eve@b.test/phone")


# -- the fetch log (pure) -------------------------------------------------------------------------

def test_rate_limit_counts_a_sliding_minute() -> None:
    log = FetchLog(3)
    for t in (0.0, 1.0, 2.0):
        assert not log.over_limit(ALICE, EVE, t)
        log.record(ALICE, EVE, False, t)
    assert log.over_limit(ALICE, EVE, 3.0)        # a 4th within the minute is too many
    assert log.over_limit(ALICE, EVE.bare, 59.0)  # per bare JID: other resources count too
    assert not log.over_limit(ALICE, EVE, 60.5)   # the first one has left the window
    assert not log.over_limit(JID.parse("bob@a.test"), EVE, 3.0)


def test_refused_fetches_keep_a_poller_over_the_limit() -> None:
    log = FetchLog(2)
    log.record(ALICE, EVE, True, 0.0)
    log.record(ALICE, EVE, True, 10.0)
    for t in range(20, 200, 20):  # polls every 20 s: always 2 in the last minute
        assert log.over_limit(ALICE, EVE, float(t))
        record = log.record(ALICE, EVE, False, float(t), refused_for_rate=True)
    assert record.count == 11 and record.over_limit == 9 and not record.allowed
    assert len(record.recent) <= 3  # bounded by the limit, not by the number of fetches
    assert record.first == 0.0 and record.last == 180.0


def test_memory_is_bounded() -> None:
    log = FetchLog(6, max_watchers=3, max_presentities=2, retention=100.0)
    for i in range(5):
        log.record(ALICE, JID.parse(f"w{i}@b.test"), False, float(i))
    assert [str(j) for j in log.records(ALICE, 5.0)] == ["w2@b.test", "w3@b.test", "w4@b.test"]
    # A fetch makes a watcher the most recent one again.
    log.record(ALICE, JID.parse("w2@b.test"), False, 6.0)
    log.record(ALICE, JID.parse("w5@b.test"), False, 7.0)
    assert [str(j) for j in log.records(ALICE, 7.0)] == ["w4@b.test", "w2@b.test", "w5@b.test"]
    # Old entries go; so does a presentity nobody fetched for the retention time.
    assert [str(j) for j in log.records(ALICE, 105.0)] == ["w2@b.test", "w5@b.test"]
    assert log.records(ALICE, 200.0) == {} and len(log) == 0
    for name in ("p1", "p2", "p3"):
        log.record(JID.parse(f"{name}@a.test"), EVE, True, 300.0)
    assert log.records(JID.parse("p1@a.test"), 300.0) == {}
    assert len(log) == 2
    with pytest.raises(ValueError):
        FetchLog(0)


def test_watchers_of_merges_roster_and_fetches() -> None:
    log = FetchLog(1)
    log.record(ALICE, JID.parse("bob@a.test/pc"), True, 5.0)
    log.record(ALICE, EVE, False, 6.0)
    log.record(ALICE, JID.parse("poll@b.test"), False, 7.0)
    log.record(ALICE, JID.parse("poll@b.test"), False, 8.0, refused_for_rate=True)
    items = [RosterItem(contact="bob@a.test", subscription="both"),
             RosterItem(contact="carol@a.test", subscription="none", pending_in=True),
             RosterItem(contact="dan@a.test", subscription="from"),
             RosterItem(contact="to-only@a.test", subscription="to")]
    rows = watchers_of(items, log.records(ALICE, 9.0), lambda jid: str(jid) == "dan@a.test")
    got = {r.jid: (r.kind, r.status, r.count, r.first, r.last) for r in rows}
    assert got == {
        "bob@a.test": ("subscriber", "active", 1, 5.0, 5.0),
        "carol@a.test": ("pending", "pending", 0, None, None),
        "dan@a.test": ("subscriber", "refused", 0, None, None),
        "eve@b.test": ("fetcher", "refused", 1, 6.0, 6.0),
        "poll@b.test": ("poller", "refused", 2, 7.0, 8.0),
    }
    assert [r.jid for r in rows] == sorted(got)


# -- over the wire -------------------------------------------------------------------------------

async def watchers_iq(client: RawClient, to: str | None = None) -> etree._Element:
    target = f" to='{to}'" if to else ""
    await client.send(f"<iq type='get' id='w1'{target}><watchers xmlns='{WATCHERS_NS}'/></iq>")
    while True:
        el = await client.next()
        if el.tag == IQ and el.get("id") == "w1":
            return el
        if el.tag == IQ and el.get("type") == "set":  # roster pushes
            await client.send(f"<iq type='result' id='{el.get('id')}'/>")


def rows_of(reply: etree._Element) -> dict[str, dict[str, str]]:
    assert reply.get("type") == "result", etree.tostring(reply)
    payload = reply[0]
    # The reply validates against the published schema.
    SCHEMA.validate(etree.tostring(payload).decode())
    return {w.get("jid"): dict(w.attrib) for w in payload.iter(WATCHER)}


async def probe(client: RawClient, to: str) -> etree._Element:
    await client.send(f"<presence to='{to}' type='probe'/>")
    while True:
        el = await client.next()
        if el.tag == PRESENCE and el.get("from", "").startswith(to):
            return el


async def test_watcher_list_shows_subscribers_pending_and_fetchers(server: RunningServer) -> None:
    for user in ("alice", "bob", "carol", "dave"):
        await server.add_user(f"{user}@a.test")
    await server.add_user("erin@b.test")
    alice = await server.raw_login("alice@a.test", resource="pc")
    bob = await server.raw_login("bob@a.test")
    carol = await server.raw_login("carol@a.test")
    dave = await server.raw_login("dave@a.test")
    erin = await server.raw_login("erin@b.test")
    await roster_of(alice)
    await alice.send("<presence/>")
    await next_presence(alice, None, "alice@a.test/pc")
    assert rows_of(await watchers_iq(alice)) == {}
    await bob.send("<presence/>")
    await subscribe_both(server, alice, bob, "alice@a.test", "bob@a.test")
    await carol.send("<presence to='alice@a.test' type='subscribe'/>")
    await next_presence(alice, "subscribe", "carol@a.test")
    answer = await probe(dave, "alice@a.test")
    assert answer.get("type") == "unsubscribed"
    answer = await probe(erin, "alice@a.test")
    assert answer.get("type") == "unsubscribed"
    assert (await probe(bob, "alice@a.test")).get("type") is None  # a subscriber sees presence
    rows = rows_of(await watchers_iq(alice, to="alice@a.test"))
    assert set(rows) == {"bob@a.test", "carol@a.test", "dave@a.test", "erin@b.test"}
    bob_row = rows["bob@a.test"]
    assert (bob_row["kind"], bob_row["status"], bob_row["count"]) == ("subscriber", "active", "1")
    assert bob_row["first"] == bob_row["last"] and bob_row["last"].endswith("Z")
    assert rows["carol@a.test"] == {"jid": "carol@a.test", "kind": "pending",
                                    "status": "pending", "count": "0"}
    for fetcher in ("dave@a.test", "erin@b.test"):
        assert (rows[fetcher]["kind"], rows[fetcher]["status"], rows[fetcher]["count"]) == (
            "fetcher", "refused", "1")
    # Alice's own probes do not make her a watcher of herself.
    await probe(alice, "alice@a.test")
    assert "alice@a.test" not in rows_of(await watchers_iq(alice))


async def test_only_the_presentity_reads_its_watchers(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    for target in ("alice@a.test", "nobody@a.test"):
        reply = await watchers_iq(bob, to=target)
        assert reply.get("type") == "error"
        assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}forbidden") is not None
    await bob.send("<iq type='get' id='d1' to='a.test'>"
                   "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    info = await bob.next()
    features = {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert {WATCHERS_NS, "http://jabber.org/protocol/commands"} <= features


async def test_poller_over_the_limit_gets_policy_violation(tmp_path: Path) -> None:
    running = await start_server(tmp_path, """
        [presence]
        max_fetches_per_minute = 3
        """)
    try:
        await running.add_user("alice@a.test")
        await running.add_user("eve@b.test")
        await running.add_user("bob@a.test")
        alice = await running.raw_login("alice@a.test")
        await alice.send("<presence/>")
        eve = await running.raw_login("eve@b.test")
        bob = await running.raw_login("bob@a.test")
        for _ in range(3):
            assert (await probe(eve, "alice@a.test")).get("type") == "unsubscribed"
        for _ in range(2):  # over the limit, and it stays over while it keeps polling
            refused = await probe(eve, "alice@a.test")
            assert refused.get("type") == "error", etree.tostring(refused)
            assert refused.get("to") == "eve@b.test/raw"
            error = refused.find(f"{{{CLIENT}}}error")
            assert error is not None and error.get("type") == "wait"
            assert error.find(f"{{{STANZAS}}}policy-violation") is not None
        # Another watcher is not affected.
        assert (await probe(bob, "alice@a.test")).get("type") == "unsubscribed"
        rows = rows_of(await watchers_iq(alice))
        assert (rows["eve@b.test"]["kind"], rows["eve@b.test"]["status"],
                rows["eve@b.test"]["count"]) == ("poller", "refused", "5")
        assert rows["bob@a.test"]["kind"] == "fetcher"
    finally:
        await stop_server(running)


async def test_watchers_command_over_xep_0050(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    await server.add_user("eve@a.test")
    bob = await server.raw_login("bob@a.test")
    eve = await server.raw_login("eve@a.test")
    alice_raw = await server.raw_login("alice@a.test", resource="pc")
    await alice_raw.send("<presence/>")
    await next_presence(alice_raw, None, "alice@a.test/pc")
    await bob.send("<presence/>")
    await subscribe_both(server, alice_raw, bob, "alice@a.test", "bob@a.test")
    await probe(eve, "alice@a.test")
    xmpp = await server.client("alice@a.test", plugins=("xep_0030", "xep_0004", "xep_0050"))
    items = await asyncio.wait_for(xmpp.plugin["xep_0050"].get_commands("a.test"), 5)
    listed = [(i[0], i[1], i[2]) for i in items["disco_items"]["items"]]
    assert listed == [("a.test", "watchers", "Who watches my presence")]
    info = await asyncio.wait_for(
        xmpp.plugin["xep_0030"].get_info(slixmpp.JID("a.test"), node="watchers"), 5)
    assert ("automation", "command-node", None, "Who watches my presence") in \
        info["disco_info"]["identities"]
    done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    session = {"next": lambda iq, s: done.set_result(iq),
               "error": lambda iq, s: done.set_exception(AssertionError(str(iq)))}
    xmpp.plugin["xep_0050"].start_command("a.test", "watchers", session)
    iq = await asyncio.wait_for(done, 5)
    command = iq["command"]  # type: ignore[index]
    assert command["status"] == "completed" and command["node"] == "watchers"
    form = command["form"]
    assert form["type"] == "result"
    assert [f["var"] for f in form["reported"].values()] == ["jid", "kind", "count", "last"]
    rows = {item["jid"]: item for item in form["items"]}
    assert set(rows) == {"bob@a.test", "eve@a.test"}
    assert rows["bob@a.test"]["kind"] == "subscriber" and rows["bob@a.test"]["count"] == "0"
    assert rows["bob@a.test"]["last"] == ""
    assert rows["eve@a.test"]["kind"] == "fetcher" and rows["eve@a.test"]["count"] == "1"
    assert rows["eve@a.test"]["last"].endswith("Z")


async def test_commands_raw_errors(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    cmd = "http://jabber.org/protocol/commands"
    await alice.send(f"<iq type='set' id='c1' to='a.test'><command xmlns='{cmd}' "
                     "node='nope' action='execute'/></iq>")
    reply = await alice.next()
    assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}item-not-found") is not None
    await alice.send(f"<iq type='set' id='c2' to='a.test'><command xmlns='{cmd}' "
                     "node='watchers' action='prev'/></iq>")
    reply = await alice.next()
    assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}bad-request") is not None
    await alice.send(f"<iq type='set' id='c3' to='a.test'><command xmlns='{cmd}' "
                     "node='watchers' sessionid='s1' action='cancel'/></iq>")
    reply = await alice.next()
    command = reply.find(f"{{{cmd}}}command")
    assert command is not None and command.get("status") == "canceled"
    assert command.get("sessionid") == "s1"
    # Without an action, execute is meant (XEP-0050 §3.4).
    await alice.send(f"<iq type='set' id='c4' to='a.test'><command xmlns='{cmd}' "
                     "node='watchers'/></iq>")
    reply = await alice.next()
    command = reply.find(f"{{{cmd}}}command")
    assert command is not None and command.get("status") == "completed"
    assert command.find("{jabber:x:data}x") is not None
    # Any other disco node of the server is still unknown.
    await alice.send("<iq type='get' id='c5' to='a.test'><query "
                     "xmlns='http://jabber.org/protocol/disco#items' node='other'/></iq>")
    reply = await alice.next()
    assert reply.find(f"{{{CLIENT}}}error/{{{STANZAS}}}item-not-found") is not None


async def test_admins_read_any_accounts_watchers(tmp_path: Path) -> None:
    """RFC 2778 §5.1.2: the service's administrators may see watcher information too."""
    running = await start_server(tmp_path, top='admins = ["root@a.test"]')
    try:
        for user in ("root", "alice", "eve"):
            await running.add_user(f"{user}@a.test")
        eve = await running.raw_login("eve@a.test")
        await eve.send("<presence to='alice@a.test' type='probe'/>")
        await next_presence(eve, "unsubscribed")
        root = await running.raw_login("root@a.test")
        reply = await watchers_iq(root, to="alice@a.test")
        assert reply.get("type") == "result"
        assert "eve@a.test" in rows_of(reply)
        other = await watchers_iq(eve, to="alice@a.test")
        assert other.get("type") == "error"
    finally:
        await stop_server(running)
