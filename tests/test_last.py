"""Last Activity (XEP-0012), over real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from slixmpp import JID as SlixJID

from server.jid import JID
from tests.conftest import RunningServer, start_server, stop_server
from tests.rawclient import condition

LAST = "jabber:iq:last"
QUERY = f"{{{LAST}}}query"






def last_query(to: str | None, id_: str = "l") -> str:
    attr = f" to='{to}'" if to else ""
    return f"<iq type='get' id='{id_}'{attr}><query xmlns='{LAST}'/></iq>"


async def logged_out(running: RunningServer, user: str) -> tuple[int, str]:
    """Wait (bounded) for the logout record written in the background."""
    for _ in range(100):
        record = await running.server.storage.last_activity.get(user, "a.test")
        if record is not None:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"no last activity recorded for {user}")


def allow(running: RunningServer, allowed: set[str], seen: list[Any]) -> None:
    """Answer access/may-see-presence ahead of any other handler (as a roster would)."""
    def may_see(presentity: JID, requester: JID) -> bool:
        seen.append((str(presentity), str(requester)))
        return str(requester.bare) in allowed
    running.server.hooks.add("access/may-see-presence", may_see, 10_000)


async def test_server_uptime(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    alice = await server.client("alice@a.test", plugins=("xep_0012",))
    reply = await alice.plugin["xep_0012"].get_last_activity(SlixJID("a.test"))
    seconds = reply["last_activity"]["seconds"]
    assert isinstance(seconds, int) and 0 <= seconds < 60
    assert not reply["last_activity"]["status"]  # XEP-0012 §5: no text for a server
    server.server.modules["last"].started -= 3600  # as if started an hour ago
    reply = await alice.plugin["xep_0012"].get_last_activity(SlixJID("a.test"))
    assert 3600 <= reply["last_activity"]["seconds"] < 3660


async def test_logout_time_and_status(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    seen: list[Any] = []
    allow(server, {"alice@a.test"}, seen)
    alice = await server.raw_login("alice@a.test")
    # Never logged out yet, not online.
    reply = await alice.ask(last_query("bob@a.test", "never"), skip_others=True)
    assert condition(reply) == "item-not-found"
    assert seen == [("bob@a.test", "alice@a.test/raw")]

    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    reply = await bob.ask(last_query(None, "self"), skip_others=True)  # own account, available: 0
    assert reply.get("type") == "result"
    assert reply.find(QUERY).get("seconds") == "0"
    reply = await alice.ask(last_query("bob@a.test", "online"), skip_others=True)
    query = reply.find(QUERY)
    assert query is not None and query.get("seconds") == "0" and not query.text

    before = int(time.time())
    await bob.send("<presence type='unavailable'><status>Heading Home</status></presence>")
    await bob.close()
    logout, status = await logged_out(server, "bob")
    assert before <= logout <= int(time.time()) and status == "Heading Home"

    reply = await alice.ask(last_query("bob@a.test", "offline"), skip_others=True)
    assert reply.get("type") == "result" and reply.get("from") == "bob@a.test"
    query = reply.find(QUERY)
    assert query is not None and query.text == "Heading Home"
    assert 0 <= int(query.get("seconds", "-1")) <= 5

    # Pretend the logout was long ago: seconds count from the stored time.
    await server.server.storage.last_activity.set("bob", "a.test", logout - 903, "Gone")
    reply = await alice.ask(last_query("bob@a.test", "old"), skip_others=True)
    query = reply.find(QUERY)
    assert query is not None and query.text == "Gone"
    assert 903 <= int(query.get("seconds", "-1")) <= 910
    await alice.close()


async def test_forbidden_and_unknown(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("carol@a.test")
    seen: list[Any] = []
    allow(server, set(), seen)
    carol = await server.raw_login("carol@a.test")
    await carol.send("<presence/>")
    alice = await server.raw_login("alice@a.test")
    # XEP-0012 §3: not allowed to see carol's presence, online or not.
    reply = await alice.ask(last_query("carol@a.test", "f"), skip_others=True)
    assert condition(reply) == "forbidden"
    assert seen == [("carol@a.test", "alice@a.test/raw")]
    reply = await alice.ask(last_query("nobody@a.test", "u"), skip_others=True)
    assert condition(reply) == "service-unavailable"
    reply = await alice.ask("<iq type='get' id='d' to='a.test'>"
                             "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>", skip_others=True)
    features = {f.get("var") for f in reply.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert LAST in features
    await alice.close()
    await carol.close()


async def test_no_access_answer_means_only_the_account_itself(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    # As if no module answered access/may-see-presence.
    monkeypatch.delitem(server.server.hooks._chains, "access/may-see-presence", raising=False)
    bob = await server.raw_login("bob@a.test")
    await bob.send("<presence/>")
    alice = await server.raw_login("alice@a.test")
    reply = await alice.ask(last_query("bob@a.test"), skip_others=True)
    assert condition(reply) == "forbidden"
    reply = await bob.ask(last_query("bob@a.test"), skip_others=True)
    assert reply.find(QUERY).get("seconds") == "0"
    await alice.close()
    await bob.close()


async def test_shutdown_records_logout_of_online_accounts(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        await running.add_user("bob@a.test")
        bob = await running.raw_login("bob@a.test")
        await bob.send("<presence/>")
        reply = await bob.ask(last_query(None), skip_others=True)
        assert reply.find(QUERY).get("seconds") == "0"
    finally:
        await stop_server(running)
    running = await start_server(tmp_path)
    try:
        bob = await running.raw_login("bob@a.test")  # no available presence: offline answer
        reply = await bob.ask(last_query("bob@a.test"), skip_others=True)
        assert reply.get("type") == "result", etree.tostring(reply)
        assert 0 <= int(reply.find(QUERY).get("seconds", "-1")) <= 10
        await bob.close()
    finally:
        await stop_server(running)
