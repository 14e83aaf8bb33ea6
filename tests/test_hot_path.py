"""The 1:1 message path's shortcuts keep behaviour, over real sockets: filters marked with
`stanza_kinds` see only their kinds (the rest of the chain sees everything, a filter added
later too); with archiving off ("never", the benchmark's setting) a claimed stanza-id is still
stripped and a preference change still takes effect; sessions carry the parse cache's JIDs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from server.app import Server
from server.config import load_config
from server.events import stanza_kinds
from server.jid import JID
from server.module import Module, Stanza, hook
from server.sessions import Session
from server.xml import stanza as st
from tests.conftest import RunningServer, start_server, stop_server, write_config
from tests.rawclient import RawClient
from tests.test_mam import MAM2, MESSAGE, SID, STANZA_ID, chat, online, query, sync

NO_ARCHIVE = '[mam]\ndefault = "never"\n'


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, RawClient, RawClient]]:
    """Archiving off, alice and bob online."""
    running = await start_server(tmp_path, NO_ARCHIVE)
    try:
        for user in ("alice", "bob"):
            await running.add_user(f"{user}@a.test")
        yield running, await online(running, "alice@a.test"), await online(running, "bob@a.test")
    finally:
        await stop_server(running)


class Probe(Module):
    """Two filters: one for presence only, one for everything."""

    name = "probe"

    def __init__(self, server: Server, config: Any) -> None:
        super().__init__(server, config)
        self.seen: list[tuple[str, str, str | None]] = []  # (filter, stanza kind, id)

    def _note(self, name: str, stanza: Stanza) -> None:
        self.seen.append((name, etree.QName(stanza).localname, stanza.get("id")))

    @hook("filter/user", priority=50)
    @stanza_kinds(st.PRESENCE)
    def presence_only(self, stanza: Stanza, _origin: Session | None, _to: JID) -> None:
        self._note("presence-only", stanza)

    @hook("filter/user", priority=40)
    def every(self, stanza: Stanza, _origin: Session | None, _to: JID) -> None:
        self._note("every", stanza)


async def test_filters_see_only_their_stanza_kinds(tmp_path: Path) -> None:
    server = Server(load_config(write_config(tmp_path, NO_ARCHIVE)), extra_modules=(Probe,))
    await server.start()
    running = RunningServer(server, tmp_path / "data", tmp_path / "presenced.toml")
    try:
        probe = server.modules["probe"]
        assert isinstance(probe, Probe)
        for user in ("alice", "bob"):
            await running.add_user(f"{user}@a.test")
        alice = await online(running, "alice@a.test")
        bob = await online(running, "bob@a.test")
        await alice.send("<message to='bob@a.test/raw' type='chat' id='m1'><body>1</body>"
                         "</message>")
        await alice.send("<presence to='bob@a.test/raw' id='p1'/>")
        await alice.send("<iq to='bob@a.test/raw' type='get' id='q1'>"
                         "<ping xmlns='urn:xmpp:ping'/></iq>")
        await sync(alice)  # all three routed (a stream's stanzas are handled in order)
        got = [(el.tag, el.get("id")) for el in await sync(bob)]
        assert got == [(MESSAGE, "m1"), (st.PRESENCE, "p1"), (st.IQ, "q1")]
        # (Directed presence passes the chain twice: outbound, then inbound processing.)
        def filters(ident: str) -> set[tuple[str, str]]:
            return {(name, kind) for name, kind, i in probe.seen if i == ident}
        assert filters("m1") == {("every", "message")}
        assert filters("p1") == {("presence-only", "presence"), ("every", "presence")}
        assert filters("q1") == {("every", "iq")}
        # The whole chain (as the MUC runs it) still holds the marked filter.
        whole = server.hooks.chain("filter/user")
        assert probe.presence_only in whole
        assert probe.presence_only not in server.hooks.chain("filter/user", st.MESSAGE)
        # A filter added once messages have been routed is in their chain from then on.
        late: list[str | None] = []
        server.hooks.add("filter/user", lambda s, _o, _t: late.append(s.get("id")), 45)
        await alice.send("<message to='bob@a.test/raw' type='chat' id='m2'><body>2</body>"
                         "</message>")
        await sync(alice)
        assert [el.get("id") for el in await sync(bob)] == ["m2"]
        assert "m2" in late
    finally:
        await stop_server(running)


async def test_with_archiving_off_a_claimed_stanza_id_is_still_stripped(
        pair: tuple[RunningServer, RawClient, RawClient]) -> None:
    _running, alice, bob = pair
    await chat(alice, "bob@a.test", "first")  # the preferences of both are cached after it
    await chat(alice, "bob@a.test", "forged",
               f"<stanza-id xmlns='{SID}' by='bob@a.test' id='forged'/>"
               f"<stanza-id xmlns='{SID}' by='alice@a.test' id='forged-too'/>"
               f"<stanza-id xmlns='{SID}' by='room@muc.example' id='theirs'/>")
    await chat(alice, "bob@a.test", "short", f"<stanza-id xmlns='{SID}' by='bob@a.test' id='f'/>")
    # A lone child is looked at another way than several.
    await alice.send(f"<message to='bob@a.test/raw' type='chat' id='lone'>"
                     f"<stanza-id xmlns='{SID}' by='bob@a.test' id='f'/></message>")
    await sync(alice)
    got = [m for m in await sync(bob) if m.tag == MESSAGE]
    assert [m.findtext(st.BODY) for m in got] == ["first", "forged", "short", None]
    assert got[0].find(STANZA_ID) is None  # nothing archived: no id of ours
    assert [(s.get("by"), s.get("id")) for s in got[1].findall(STANZA_ID)] == [
        ("room@muc.example", "theirs")]
    assert got[2].find(STANZA_ID) is None
    assert got[3].get("id") == "lone" and len(got[3]) == 0
    assert (await query(bob)).bodies == []


async def test_with_archiving_off_a_preference_change_takes_effect(
        pair: tuple[RunningServer, RawClient, RawClient]) -> None:
    _running, alice, bob = pair

    async def bob_says(body: str) -> etree._Element:
        await chat(bob, "alice@a.test", body)
        await sync(bob)
        got = [m for m in await sync(alice) if m.tag == MESSAGE]
        assert [m.findtext(st.BODY) for m in got] == [body]
        return got[0]

    async def prefs(inner: str) -> None:
        reply = await alice.ask(f"<iq type='set' id='p'><prefs xmlns='{MAM2}' "
                                f"default='never'>{inner}</prefs></iq>", skip_others=True)
        assert reply.get("type") == "result"

    assert (await bob_says("one")).find(STANZA_ID) is None
    await prefs("<always><jid>bob@a.test</jid></always>")
    stamped = (await bob_says("two")).find(STANZA_ID)
    assert stamped is not None and stamped.get("by") == "alice@a.test"
    await prefs("")
    assert (await bob_says("three")).find(STANZA_ID) is None
    assert (await query(alice)).bodies == ["two"]


async def test_sessions_carry_the_parse_caches_jids(tmp_path: Path) -> None:
    running = await start_server(tmp_path, NO_ARCHIVE)
    try:
        await running.add_user("alice@a.test")
        await running.raw_login("alice@a.test")
        bare = JID.parse("alice@a.test")
        [session] = running.server.sessions.resources(bare)
        # What the router parses out of a 'to' is then the very key of the directory.
        assert session.jid.bare is bare
        assert JID.parse("alice@a.test/raw").bare is session.jid.bare
    finally:
        await stop_server(running)
