"""MUC in a cluster (issue 22 item 4): each room on one node (rendezvous hashing, claimed in
Redis), occupants on any node, the room moved to a survivor when its node dies (kill -9).

Two nodes of a.test with a private PostgreSQL and Redis (tests/test_cluster.py's fixture);
raw clients, so that status codes and the order of what a join sends are on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from server.cluster.placement import rendezvous
from server.jid import JID
from server.modules.muc import Muc
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server, write_config
from tests.process import drain, free_port, presenced, watch_line
from tests.rawclient import CLIENT, RawClient
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_cluster import (  # noqa: F401 (the nodes fixture)
    ALICE,
    BOB,
    cluster_tables,
    eventually,
    nodes,
    raw_available,
    see_each_other,
    sees,
)
from tests.test_muc import (
    MUC,
    body,
    codes,
    item,
    join,
    next_message,
    next_presence_from,
    self_presence,
    until,
)

SERVICE = "muc.a.test"
CAROL = "carol@a.test"


def room_owned_by(node: str, names: tuple[str, ...] = ("node1", "node2")) -> str:
    """A room name the hashing gives to `node` among `names`."""
    for i in range(1000):
        name = f"room{i}@{SERVICE}"
        if rendezvous(name, names) == node:
            return name
    raise AssertionError("no room for " + node)


def rooms_of(node: RunningServer) -> set[str]:
    muc = node.server.module(Muc)
    assert muc is not None
    return {str(jid) for jid in muc.rooms}


async def claim(node: RunningServer, room: str) -> str:
    cluster = node.server.cluster
    assert cluster is not None
    value = await cluster.redis.get(f"presenced:room:{room}")
    return value.decode() if value is not None else ""


async def mirrored(node: RunningServer, room: str, nicks: set[str]) -> None:
    """The room's mirror in Redis (its owner's copy of the occupants) has these nicks."""
    cluster = node.server.cluster
    assert cluster is not None
    for _ in range(200):
        raw = await cluster.redis.get(f"presenced:room-state:{room}")
        if raw is not None and {o["n"] for o in json.loads(raw)["o"]} == nicks:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the mirror of {room} never had {nicks}")


def incarnation(node: RunningServer) -> str:
    cluster = node.server.cluster
    assert cluster is not None
    return f"{cluster.membership.name}:{cluster.membership.incarnation}"


async def instant(client: RawClient, room: str, fields: str = "") -> None:
    done = await client.ask(f"<iq type='set' to='{room}' id='inst'><query xmlns='{MUC}#owner'>"
                            f"<x xmlns='jabber:x:data' type='submit'>{fields}</x></query></iq>",
                            skip_others=True)
    assert done.get("type") == "result", etree.tostring(done)


async def test_room_with_occupants_on_both_nodes(nodes: tuple[RunningServer, RunningServer]  # noqa: F811
                                                 ) -> None:
    one, two = nodes
    room = room_owned_by("node2")
    alice = await raw_available(one, ALICE, "pc")
    bob = await raw_available(two, BOB, "pc")
    await eventually(sees(one, f"{BOB}/pc"), "node1 sees bob")
    await eventually(sees(two, f"{ALICE}/pc"), "node2 sees alice")
    # Alice, on node1, creates a room the hashing places on node2: node1 claims it for node2
    # and forwards her join there (XEP-0045 §10.1.1: 201, she owns it).
    got = await join(alice, "Alice", room)
    mine = self_presence(got)
    assert mine.get("from") == f"{room}/Alice" and codes(mine) == {"110", "201"}
    assert (item(mine).get("affiliation"), item(mine).get("role")) == ("owner", "moderator")
    assert await claim(one, room) == incarnation(two)
    assert room in rooms_of(two) and room not in rooms_of(one)
    await instant(alice, room)
    # Bob on node2 joins: Alice's presence, then his own, then the subject (§7.2.3).
    got = await join(bob, "Bob", room)
    presences = [s for s in got if s.tag == f"{{{CLIENT}}}presence"]
    assert [p.get("from") for p in presences] == [f"{room}/Alice", f"{room}/Bob"]
    assert codes(presences[1]) == {"110"}
    seen = await next_presence_from(alice, f"{room}/Bob")
    assert item(seen).get("jid") == f"{BOB}/pc"  # the moderator sees his real JID
    # Groupchat both ways, each reflected to its sender too (§7.4).
    await alice.send(f"<message to='{room}' type='groupchat' id='g1'><body>hi all</body>"
                     "</message>")
    for client in (bob, alice):
        message = await next_message(client)
        assert (message.get("from"), message.get("type"), body(message)) == (
            f"{room}/Alice", "groupchat", "hi all")
    await bob.send(f"<message to='{room}' type='groupchat' id='g2'><body>hello</body>"
                   "</message>")
    for client in (alice, bob):
        message = await next_message(client)
        assert (message.get("from"), body(message)) == (f"{room}/Bob", "hello")
    # A private message between occupants (§7.5), node1 -> owner node2 -> node2's session.
    await alice.send(f"<message to='{room}/Bob' type='chat' id='p1'><body>psst</body>"
                     "</message>")
    message = await next_message(bob)
    assert (message.get("from"), message.get("type"), body(message)) == (
        f"{room}/Alice", "chat", "psst")
    # Subject change by the moderator (§8.1): everyone gets it.
    await alice.send(f"<message to='{room}' type='groupchat' id='s1'><subject>news</subject>"
                     "</message>")
    for client in (bob, alice):
        message = await next_message(client)
        assert message.findtext(f"{{{CLIENT}}}subject") == "news"
    # Kick (§8.2): Bob, on node2, is told with 307 and 110; Alice sees him go.
    await alice.send(f"<iq type='set' to='{room}' id='k1'><query xmlns='{MUC}#admin'>"
                     "<item nick='Bob' role='none'><reason>bye</reason></item></query></iq>")
    seen = await until(alice, lambda s: s.tag == f"{{{CLIENT}}}iq")
    assert seen[-1].get("type") == "result"
    gone = next(s for s in seen if s.get("from") == f"{room}/Bob")
    assert gone.get("type") == "unavailable" and "307" in codes(gone)
    kicked = await next_presence_from(bob, f"{room}/Bob")
    assert kicked.get("type") == "unavailable" and codes(kicked) == {"307", "110"}
    # Bob is out: his groupchat message is refused by the room (not-acceptable, §7.4).
    await bob.send(f"<message to='{room}' type='groupchat' id='g3'><body>x</body></message>")
    error = await next_message(bob)
    assert error.get("type") == "error" and error.get("id") == "g3"
    # Alice leaves on node1: her session's unavailable presence reaches the owner, the
    # temporary room is gone there and its claim with it.
    await alice.send(f"<presence to='{room}/Alice' type='unavailable'/>")
    left = await next_presence_from(alice, f"{room}/Alice")
    assert left.get("type") == "unavailable" and "110" in codes(left)
    await eventually(lambda: room not in rooms_of(two), "the empty room gone")
    for _ in range(100):
        if not await claim(one, room):
            break
        await asyncio.sleep(0.05)
    assert await claim(one, room) == ""
    await alice.close()
    await bob.close()


async def test_session_closed_on_another_node_leaves_the_room(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """A session that ends on node2 leaves a room node1 owns (its directed presence is undone,
    RFC 6121 §4.6.3, through the owner)."""
    one, two = nodes
    room = room_owned_by("node1")
    alice = await raw_available(one, ALICE, "pc")
    bob = await raw_available(two, BOB, "pc")
    await join(alice, "Alice", room)
    await instant(alice, room)
    await join(bob, "Bob", room)
    await next_presence_from(alice, f"{room}/Bob")
    assert room in rooms_of(one) and room not in rooms_of(two)
    await bob.close()
    gone = await next_presence_from(alice, f"{room}/Bob")
    assert gone.get("type") == "unavailable"
    muc = one.server.module(Muc)
    assert muc is not None
    assert [o.nick for o in muc.rooms[JID.parse(room)].occupants.values()] == ["Alice"]
    await alice.close()


@contextlib.contextmanager
def subprocess_node(tmp: Path, tables: str, host: str) -> Iterator[tuple[subprocess.Popen[str],
                                                                           int]]:
    """A node as a real process (so that kill -9 is a real death); its c2s port."""
    path = write_config(tmp, tables, domains=("a.test",), host=host)
    port = free_port(host)
    path.write_text(path.read_text().replace(f'c2s = ["{host}:0"]', f'c2s = ["{host}:{port}"]'))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent),
                      os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(presenced("serve", "-c", str(path)), cwd=tmp, env=env,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        state = [0]
        for line in proc.stderr:
            watch_line(line, state)
            if "event=started" in line:
                break
        else:
            raise AssertionError(f"the node did not start: {proc.wait()}")
        drain(proc, state)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


async def test_owner_killed_room_moves_to_the_survivor(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """kill -9 of the room's node: the survivor the hashing picks takes the room over, with its
    config from the database and its history from the archive; the occupant that was on the
    dead node is removed with status 333 (XEP-0045 §9.8's 'technical reasons'), the others
    stay joined."""
    survivor = await start_server(tmp_path / "node1", cluster_tables(pg_dsn, redis_url, "node1"),
                                  domains=("a.test",), host="127.0.0.1")
    try:
        for user in (ALICE, BOB, CAROL):
            await survivor.add_user(user)
        room = room_owned_by("node2")
        with subprocess_node(tmp_path / "node2", cluster_tables(pg_dsn, redis_url, "node2"),
                             "127.0.0.2") as (victim, port):
            cluster = survivor.server.cluster
            assert cluster is not None
            await eventually(lambda: "node2" in cluster.membership.live, "node2 joined")
            alice = await raw_available(survivor, ALICE, "pc")
            bob = await RawClient.connect("127.0.0.2", port)
            await bob.login("a.test", "bob", PASSWORD, "pc")
            await bob.send("<presence/>")
            await bob.next_of("presence")
            await eventually(sees(survivor, f"{BOB}/pc"), "node1 sees bob on node2")
            await join(alice, "Alice", room)
            await instant(alice, room, "<field var='FORM_TYPE'><value>"
                          f"{MUC}#roomconfig</value></field><field var='muc#roomconfig_"
                          "persistentroom'><value>1</value></field><field var='muc#roomconfig_"
                          "roomname'><value>Kept</value></field>")
            await join(bob, "Bob", room)
            await next_presence_from(alice, f"{room}/Bob")
            assert await claim(survivor, room) == f"node2:{cluster.membership.live['node2']}"
            # A second room, on the survivor, with Bob (on node2) in it too.
            here = room_owned_by("node1")
            await join(alice, "Alice", here)
            await instant(alice, here)
            await join(bob, "Bob", here)
            await next_presence_from(alice, f"{here}/Bob")
            assert here in rooms_of(survivor)
            await bob.send(f"<message to='{room}' type='groupchat' id='h1'><body>before"
                           "</body></message>")
            assert body(await next_message(alice)) == "before"
            await mirrored(survivor, room, {"Alice", "Bob"})
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            # Within dead_after (3 s) and a heartbeat: node1 owns the room, Bob is removed.
            lost = {}
            while len(lost) < 2:
                presence = await alice.next_of("presence", 10)
                if presence.get("from") in (f"{room}/Bob", f"{here}/Bob"):
                    lost[presence.get("from")] = presence
            for presence in lost.values():
                assert presence.get("type") == "unavailable" and "333" in codes(presence)
            assert await claim(survivor, room) == incarnation(survivor)
            assert room in rooms_of(survivor)
        # Alice stayed joined without a word: she talks, the room reflects it.
        await alice.send(f"<message to='{room}' type='groupchat' id='h2'><body>after</body>"
                         "</message>")
        message = await next_message(alice)
        assert (message.get("from"), body(message)) == (f"{room}/Alice", "after")
        # Carol joins on node1: the persistent config (from the database) and the history
        # (from the archive) came back; Alice is there, Bob is not.
        carol = await raw_available(survivor, CAROL, "pc")
        got = await join(carol, "Carol", room)
        presences = [s.get("from") for s in got if s.tag == f"{{{CLIENT}}}presence"]
        assert presences == [f"{room}/Alice", f"{room}/Carol"]
        history = [body(s) for s in got if s.tag == f"{{{CLIENT}}}message" and body(s)]
        assert history == ["before", "after"]
        info = await carol.ask(f"<iq type='get' to='{room}' id='i1'><query xmlns='http://"
                               "jabber.org/protocol/disco#info'/></iq>", skip_others=True)
        features = {f.get("var") for f in info.iter(
            "{http://jabber.org/protocol/disco#info}feature")}
        assert "muc_persistent" in features
        identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
        assert identity is not None and identity.get("name") == "Kept"
        for client in (alice, carol):
            await client.close()
    finally:
        await stop_server(survivor)


def test_rendezvous_moves_only_the_rooms_of_the_node_that_went() -> None:
    """Highest random weight: removing a node moves its rooms only, spread over the others."""
    rooms = [f"r{i}@{SERVICE}" for i in range(3000)]
    three = {name: rendezvous(name, ("node1", "node2", "node3")) for name in rooms}
    counts = {node: list(three.values()).count(node) for node in ("node1", "node2", "node3")}
    assert all(800 < count < 1200 for count in counts.values()), counts
    two = {name: rendezvous(name, ("node1", "node2")) for name in rooms}
    assert all(two[name] == owner for name, owner in three.items() if owner != "node3")
    moved = [two[name] for name, owner in three.items() if owner == "node3"]
    assert 0.35 < moved.count("node1") / len(moved) < 0.65
    assert rendezvous("x", ()) is None


async def test_join_at_once_after_login_on_another_node(
        nodes: tuple[RunningServer, RunningServer], monkeypatch: pytest.MonkeyPatch  # noqa: F811
        ) -> None:
    """Bob's bind is slow to reach Redis (node2's directory writes held back here) and the
    room's node never hears of it (node1's invalidations for bob dropped): node2 sends his
    join after his directory entry (the inbox waits for the directory's earlier writes), and
    node1, finding no session for what the room answers, reads the entry in Redis (the
    router's miss lookup), so the join's presences and subject are not dropped."""
    one, two = nodes
    room = room_owned_by("node1")
    alice = await raw_available(one, ALICE, "pc")
    await join(alice, "Alice", room)
    await instant(alice, room)
    cluster, owner = two.server.cluster, one.server.cluster
    assert cluster is not None and owner is not None
    apply = cluster.directory._apply

    async def late(*args: Any) -> None:
        await asyncio.sleep(0.5)
        await apply(*args)
    monkeypatch.setattr(cluster.directory, "_apply", late)
    heard = owner.directory.invalidate
    monkeypatch.setattr(owner.directory, "invalidate",
                        lambda bare: None if bare == BOB else heard(bare))
    bob = await two.raw_login(BOB, "pc")
    got = await join(bob, "Bob", room)  # no available presence first: only the join
    assert [s.get("from") for s in got if s.tag == f"{{{CLIENT}}}presence"] == [
        f"{room}/Alice", f"{room}/Bob"]
    assert (await next_presence_from(alice, f"{room}/Bob")).get("type") is None
    assert owner.directory.rechecks == 1
    await alice.close()
    await bob.close()


async def test_fenced_owner_gives_up_its_rooms(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """node2 declared dead while running (fencing, as in test_cluster.py): its sessions end,
    the rooms it held in memory are dropped (never two owners); the room is claimed anew and
    its new owner rebuilds it from the Redis mirror, Alice still in it."""
    one, two = nodes
    room = room_owned_by("node2")
    alice = await raw_available(one, ALICE, "pc")
    bob = await raw_available(two, BOB, "pc")
    await join(alice, "Alice", room)
    await instant(alice, room)
    await join(bob, "Bob", room)
    await next_presence_from(alice, f"{room}/Bob")
    cluster = two.server.cluster
    assert cluster is not None
    first = cluster.membership.incarnation
    await cluster.redis.delete("presenced:node:node2")
    assert await bob.stream_error(10) == "system-shutdown"
    gone = await next_presence_from(alice, f"{room}/Bob")
    assert gone.get("type") == "unavailable"
    await eventually(lambda: cluster.membership.incarnation != first, "a new incarnation")
    await eventually(lambda: room not in rooms_of(two), "node2 dropped the room")
    one_cluster = one.server.cluster
    assert one_cluster is not None
    await eventually(lambda: one_cluster.membership.live.get("node2") ==
                     cluster.membership.incarnation, "node1 sees the new incarnation")
    await alice.send(f"<message to='{room}' type='groupchat' id='f1'><body>still here</body>"
                     "</message>")
    message = await next_message(alice)
    assert (message.get("from"), body(message)) == (f"{room}/Alice", "still here")
    # Whoever took it (node1 if it saw node2 dead before node2 rejoined, else node2, where
    # the hashing puts it), one live incarnation owns it and only that node has it.
    owner = await claim(one, room)
    holder, other = (one, two) if owner == incarnation(one) else (two, one)
    assert owner == incarnation(holder)
    assert room in rooms_of(holder) and room not in rooms_of(other)
    muc = holder.server.module(Muc)
    assert muc is not None
    assert [o.nick for o in muc.rooms[JID.parse(room)].occupants.values()] == ["Alice"]
    await alice.close()


async def test_stanzas_forwarded_to_an_owner_that_died_reach_the_new_owner(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """Groupchat messages node1 forwarded to the room's node (its inbox, "v" entries) that the
    node never read — frozen (SIGSTOP), then killed (SIGKILL) — are not lost with it: the
    survivor that reaps the dead node hands them to the room's new owner (itself here), which
    sends them to the occupants in the order they were sent, then goes on with new ones."""
    survivor = await start_server(tmp_path / "node1", cluster_tables(pg_dsn, redis_url, "node1"),
                                  domains=("a.test",), host="127.0.0.1")
    try:
        for user in (ALICE, CAROL):
            await survivor.add_user(user)
        room = room_owned_by("node2")
        with subprocess_node(tmp_path / "node2", cluster_tables(pg_dsn, redis_url, "node2"),
                             "127.0.0.2") as (victim, _port):
            cluster = survivor.server.cluster
            assert cluster is not None
            await eventually(lambda: "node2" in cluster.membership.live, "node2 joined")
            alice = await raw_available(survivor, ALICE, "pc")
            carol = await raw_available(survivor, CAROL, "pc")
            await join(alice, "Alice", room)
            await instant(alice, room)
            await join(carol, "Carol", room)
            await next_presence_from(alice, f"{room}/Carol")
            assert await claim(survivor, room) == f"node2:{cluster.membership.live['node2']}"
            # node2 mirrors the room (its occupants) to Redis just after it answered the join:
            # frozen before that, the new owner would not know Carol was in (a window of one
            # Redis write, wider on a loaded machine, that this test is not about).
            await mirrored(survivor, room, {"Alice", "Carol"})
            victim.send_signal(signal.SIGSTOP)
            try:
                sent = cluster.inbox.sent
                for i in range(5):
                    await alice.send(f"<message to='{room}' type='groupchat' id='v{i}'>"
                                     f"<body>{i}</body></message>")
                # In node2's stream, unread.
                await eventually(lambda: cluster.inbox.sent >= sent + 5, "forwarded to node2")
                assert await cluster.redis.xlen("presenced:inbox:node2") >= 1
            finally:
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
        # The survivor reaps node2 (dead_after 3 s) and owns the room now; the five arrive
        # in order, to both occupants, from the room.
        for client in (alice, carol):
            got = [await client.next_of("message", 15) for _ in range(5)]
            assert [(m.get("from"), body(m)) for m in got] == [
                (f"{room}/Alice", str(i)) for i in range(5)]
        assert await claim(survivor, room) == incarnation(survivor)
        await alice.send(f"<message to='{room}' type='groupchat' id='v5'><body>5</body>"
                         "</message>")
        for client in (alice, carol):
            assert body(await next_message(client)) == "5"
        for client in (alice, carol):
            await client.close()
    finally:
        await stop_server(survivor)


async def test_graceful_stop_hands_its_rooms_over(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """node1 stops gracefully while it owns a room with occupants on both nodes: the room goes
    to node2 (the hashing among the others) instead of ending with 332. Bob and Carol, on
    node2, stay joined without a word and go on talking; Alice, on node1, leaves as her
    session ends (a plain unavailable presence, no 332 and no 333)."""
    one = await start_server(tmp_path / "node1", cluster_tables(pg_dsn, redis_url, "node1"),
                             domains=("a.test",), host="127.0.0.1")
    two = await start_server(tmp_path / "node2", cluster_tables(pg_dsn, redis_url, "node2"),
                             domains=("a.test",), host="127.0.0.2")
    stopped = False
    try:
        await see_each_other(one, two)
        for user in (ALICE, BOB, CAROL):
            await one.add_user(user)
        room = room_owned_by("node1")
        alice = await raw_available(one, ALICE, "pc")
        bob = await raw_available(two, BOB, "pc")
        carol = await raw_available(two, CAROL, "pc")
        await join(alice, "Alice", room)
        await instant(alice, room)  # a temporary room: its state lives in the mirror only
        await join(bob, "Bob", room)
        await join(carol, "Carol", room)
        for client in (alice, bob):
            await next_presence_from(client, f"{room}/Carol")
        await alice.send(f"<message to='{room}' type='groupchat' id='s1'><subject>kept"
                         "</subject></message>")
        for client in (alice, bob, carol):
            assert (await next_message(client)).findtext(f"{{{CLIENT}}}subject") == "kept"
        assert room in rooms_of(one) and await claim(one, room) == incarnation(one)
        await stop_server(one)
        stopped = True
        # Alice's session ended: Bob and Carol see her leave, plainly.
        for client in (bob, carol):
            gone = await next_presence_from(client, f"{room}/Alice")
            assert gone.get("type") == "unavailable" and not codes(gone) & {"332", "333"}
        assert room in rooms_of(two) and await claim(two, room) == incarnation(two)
        # Still joined, still talking: the room reflects to both (XEP-0045 §7.4).
        await bob.send(f"<message to='{room}' type='groupchat' id='g1'><body>still here"
                       "</body></message>")
        for client in (bob, carol):
            message = await next_message(client)
            assert (message.get("from"), body(message)) == (f"{room}/Bob", "still here")
        muc = two.server.module(Muc)
        assert muc is not None
        moved = muc.rooms[JID.parse(room)]
        assert sorted(o.nick for o in moved.occupants.values()) == ["Bob", "Carol"]
        assert moved.subject == "kept"
        # Nobody on node2 heard 332 or 333.
        for client in (bob, carol):
            with pytest.raises(TimeoutError):
                extra = await client.next_of("presence", 0.5)
                raise AssertionError(f"unexpected: {etree.tostring(extra)!r}")
        for client in (bob, carol):
            await client.close()
    finally:
        await stop_server(two)
        if not stopped:
            await stop_server(one)


async def test_room_list_and_room_quota_count_every_node(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """disco#items on the service (XEP-0045 §6.3) lists the public rooms of both nodes, asked
    on either; [muc] max_rooms_per_user counts the rooms the user owns on both nodes (a third
    room is refused with resource-constraint wherever it would live); `presenced cluster
    status` counts the rooms each node holds."""
    quota = "[muc]\nmax_rooms_per_user = 2\n"
    one = await start_server(tmp_path / "node1",
                             cluster_tables(pg_dsn, redis_url, "node1") + quota,
                             domains=("a.test",), host="127.0.0.1")
    two = await start_server(tmp_path / "node2",
                             cluster_tables(pg_dsn, redis_url, "node2") + quota,
                             domains=("a.test",), host="127.0.0.2")
    try:
        await see_each_other(one, two)
        for user in (ALICE, BOB):
            await one.add_user(user)
        here, there = room_owned_by("node1"), room_owned_by("node2")
        alice = await raw_available(one, ALICE, "pc")
        bob = await raw_available(two, BOB, "pc")
        for room in (here, there):
            await join(alice, "Alice", room)
            await instant(alice, room, "<field var='FORM_TYPE'><value>"
                          f"{MUC}#roomconfig</value></field><field var='muc#roomconfig_"
                          f"roomname'><value>{room[:5]}</value></field>")
        assert rooms_of(one) == {here} and rooms_of(two) == {there}
        for client in (alice, bob):
            result = await client.ask(f"<iq type='get' to='{SERVICE}' id='items'><query "
                                      "xmlns='http://jabber.org/protocol/disco#items'/></iq>",
                                      skip_others=True)
            assert result.get("type") == "result", etree.tostring(result)
            listed = [(i.get("jid"), i.get("name")) for i in result.iter(
                "{http://jabber.org/protocol/disco#items}item")]
            assert listed == sorted([(here, here[:5]), (there, there[:5])])
        # A third room, on either node: alice owns two already (one on each node).
        refused_rooms = []
        for node in ("node1", "node2"):
            third = next(f"extra{i}@{SERVICE}" for i in range(1000)
                         if rendezvous(f"extra{i}@{SERVICE}", ("node1", "node2")) == node)
            refused_rooms.append(third)
            await alice.send(f"<presence to='{third}/Alice'><x xmlns='{MUC}'/></presence>")
            refused = await alice.next_of("presence", 10)
            assert refused.get("type") == "error" and refused.get("from") == f"{third}/Alice"
            error = refused.find(f"{{{CLIENT}}}error")
            assert error is not None and error.find(
                "{urn:ietf:params:xml:ns:xmpp-stanzas}resource-constraint") is not None
        # The refused joins made no room: their claims are gone (not held until the node
        # dies), on both nodes and in Redis; the two rooms made keep theirs.
        from server.cluster import keys
        redis = one.server.cluster.redis  # type: ignore[union-attr]
        claims = [keys.placed("room", name) for name in refused_rooms]
        for _ in range(100):
            if not await redis.exists(*claims):
                break
            await asyncio.sleep(0.05)
        assert await redis.exists(*claims) == 0
        for running in (one, two):
            member = running.server.cluster.membership  # type: ignore[union-attr]
            mine = {raw.decode() for raw in await redis.smembers(keys.placed_by(
                "room", f"{member.name}:{member.incarnation}"))}
            assert not mine & set(refused_rooms), mine
            assert mine == {here if member.name == "node1" else there}
        assert await redis.exists(keys.placed("room", here), keys.placed("room", there)) == 2
        # Bob owns none: he may.
        got = await join(bob, "Bob", f"bobs@{SERVICE}")
        assert "201" in codes(self_presence(got))
        # cluster status: the rooms each node holds (its heartbeat publishes the count; the
        # refused joins left claims of nothing behind, not counted).
        from server.cluster.membership import status
        cluster = one.server.cluster
        assert cluster is not None
        owners = {"node1": 1, "node2": 1}
        owners[rendezvous(f"bobs@{SERVICE}", ("node1", "node2")) or ""] += 1

        async def rooms_per_node() -> dict[str, int]:
            return {n["node"]: n["rooms"] for n in await status(cluster.redis)}
        for _ in range(100):
            if await rooms_per_node() == owners:
                break
            await asyncio.sleep(0.05)
        assert await rooms_per_node() == owners
        for client in (alice, bob):
            await client.close()
    finally:
        await stop_server(two)
        await stop_server(one)


async def test_no_claim_is_kept_for_a_room_that_is_not_there(
        nodes: tuple[RunningServer, RunningServer]) -> None:  # noqa: F811
    """A stanza for a room nobody made (disco#info, XEP-0045 §6.4: item-not-found), and a room
    its owner destroyed (§10.9): the claim that brought the stanza to the room's node goes once
    it was handled, instead of staying until that node dies."""
    one, two = nodes
    alice = await raw_available(one, ALICE, "pc")
    nothing, made = room_owned_by("node2"), room_owned_by("node1")
    info = await alice.ask(f"<iq type='get' to='{nothing}' id='i1'><query "
                           "xmlns='http://jabber.org/protocol/disco#info'/></iq>",
                           skip_others=True)
    assert info.get("type") == "error" and info.find(
        f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}item-not-found"
    ) is not None, etree.tostring(info)
    await eventually_async(lambda: claim(one, nothing), "", "the claim of nothing gone")
    muc_two = two.server.module(Muc)
    assert muc_two is not None and nothing not in muc_two.placed.placement.owned  # type: ignore[union-attr]
    # A room made, then destroyed by its owner: its claim goes with it.
    await join(alice, "Alice", made)
    await instant(alice, made)
    assert await claim(two, made) == incarnation(one)
    done = await alice.ask(f"<iq type='set' to='{made}' id='d1'><query xmlns='{MUC}#owner'>"
                           "<destroy/></query></iq>", skip_others=True)
    assert done.get("type") == "result", etree.tostring(done)
    await eventually_async(lambda: claim(two, made), "", "the destroyed room's claim gone")
    # Joined again, it is made again, and claimed again.
    got = await join(alice, "Alice", made)
    assert "201" in codes(self_presence(got))
    assert await claim(two, made) == incarnation(one)
    await alice.close()


async def eventually_async(read: Any, expected: Any, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await read()) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} ({value!r})")
        await asyncio.sleep(0.05)
