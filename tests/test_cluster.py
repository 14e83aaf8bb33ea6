"""One domain on two nodes (issue 22): a private redis-server (tests/redis.py), a private
PostgreSQL (tests/pg.py) and two Servers for a.test on different loopback addresses, with real
clients on each node. Every test goes through the cross-node path: the directory in Redis, the
per-node Streams, membership."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from server.config import ConfigErrors, load_config
from server.jid import JID
from tests.conftest import RunningServer, start_server, stop_server, write_config
from tests.rawclient import CLIENT, RawClient
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = f"{{{CLIENT}}}message"
PRESENCE = f"{{{CLIENT}}}presence"
IQ = f"{{{CLIENT}}}iq"
ALICE, BOB = "alice@a.test", "bob@a.test"


def cluster_tables(dsn: str, redis: str, node: str) -> str:
    return (f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
            f'[cluster]\nredis = "{redis}"\nnode = "{node}"\nheartbeat = 0.2\n'
            f'dead_after = 3.0\n')


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def see_each_other(*running: RunningServer) -> None:
    """Every node counts every other one live (rooms are placed by the hashing over what a
    node sees: a node that joined a moment ago may not be in the others' view yet)."""
    clusters = [r.server.cluster for r in running]
    assert all(c is not None for c in clusters)
    names = {c.membership.name for c in clusters if c is not None}
    await eventually(lambda: all(names <= c.membership.live.keys() for c in clusters
                                 if c is not None), "the nodes see each other")


@pytest.fixture
async def nodes(tmp_path: Path, pg_dsn: str, redis_url: str  # noqa: F811
                ) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    one = await start_server(tmp_path / "node1", cluster_tables(pg_dsn, redis_url, "node1"),
                             domains=("a.test",), host="127.0.0.1")
    two = await start_server(tmp_path / "node2", cluster_tables(pg_dsn, redis_url, "node2"),
                             domains=("a.test",), host="127.0.0.2")
    await one.add_user(ALICE)
    await one.add_user(BOB)
    try:
        await see_each_other(one, two)
        yield one, two
    finally:
        await stop_server(two)
        await stop_server(one)


def sees(node: RunningServer, jid: str, available: bool = True) -> Callable[[], bool]:
    """The node's directory knows a session of jid on another node (available: with presence)."""
    full = JID.parse(jid)

    def check() -> bool:
        session = node.server.sessions.get(full)
        return session is not None and type(session).__name__ == "RemoteSession" and (
            not available or session.presence is not None)
    return check


async def raw_available(node: RunningServer, jid: str, resource: str) -> RawClient:
    client = await node.raw_login(jid, resource)
    await client.send("<presence/>")
    await client.expect(PRESENCE)  # its own presence, reflected (RFC 6121 §4.2.2)
    return client


async def alice_and_bob(one: RunningServer, two: RunningServer) -> tuple[RawClient, RawClient]:
    """alice available on node1 (phone), bob on node2 (desk), each node seeing the other's."""
    alice = await raw_available(one, ALICE, "phone")
    bob = await raw_available(two, BOB, "desk")
    for node, other in ((one, f"{BOB}/desk"), (two, f"{ALICE}/phone")):
        await eventually(sees(node, other), f"{other} seen from the other node")
    return alice, bob


async def test_messages_bare_and_full_both_ways(nodes: tuple[RunningServer, RunningServer]
                                                ) -> None:
    one, two = nodes
    alice, bob = await alice_and_bob(one, two)
    # Bare JID on node1 -> the available resource on node2 (RFC 6121 §8.5.2.1.1).
    await alice.send(f"<message to='{BOB}' type='chat' id='m1'><body>one</body></message>")
    got = await bob.expect(MESSAGE)
    assert (got.get("id"), got.get("from"), got.findtext(f"{{{CLIENT}}}body")) == (
        "m1", f"{ALICE}/phone", "one")
    # Full JID, node2 -> node1.
    await bob.send(f"<message to='{ALICE}/phone' type='chat' id='m2'><body>two</body>"
                   "</message>")
    got = await alice.expect(MESSAGE)
    assert (got.get("id"), got.get("from"), got.findtext(f"{{{CLIENT}}}body")) == (
        "m2", f"{BOB}/desk", "two")
    # Order per sender across nodes.
    for i in range(20):
        await alice.send(f"<message to='{BOB}/desk' type='chat' id='o{i}'><body>{i}</body>"
                         "</message>")
    ids = [(await bob.expect(MESSAGE)).get("id") for _ in range(20)]
    assert ids == [f"o{i}" for i in range(20)]
    assert one.server.cluster is not None and one.server.cluster.inbox.sent >= 21
    await alice.close()
    await bob.close()


async def test_subscription_and_presence_across_nodes(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    alice = await one.client(ALICE, resource="laptop")
    bob = await two.client(BOB, resource="desk")
    await eventually(sees(one, f"{BOB}/desk"), "node1 sees bob available")
    loop = asyncio.get_running_loop()
    bob_seen: asyncio.Future[str] = loop.create_future()
    alice_seen: asyncio.Future[str] = loop.create_future()

    def on_alice(presence: Any) -> None:
        if presence["from"].bare == BOB and not bob_seen.done():
            bob_seen.set_result(str(presence["from"]))

    def on_bob(presence: Any) -> None:
        if presence["from"].bare == ALICE and not alice_seen.done():
            alice_seen.set_result(str(presence["from"]))

    alice.add_event_handler("presence_available", on_alice)
    bob.add_event_handler("presence_available", on_bob)
    # slixmpp approves and subscribes back (auto_authorize, auto_subscribe): both directions
    # cross the nodes (RFC 6121 §3.1), then each gets the other's presence (§4.2.2, probes).
    alice.send_presence_subscription(pto=BOB)
    assert await asyncio.wait_for(bob_seen, 10) == f"{BOB}/desk"
    assert await asyncio.wait_for(alice_seen, 10) == f"{ALICE}/laptop"

    async def subscription(node: RunningServer, user: str, contact: str) -> str:
        _version, items = await node.server.storage.rosters.load(user, "a.test")
        return next(i.subscription for i in items if i.contact == contact)

    for _ in range(100):
        if (await subscription(one, "alice", BOB), await subscription(two, "bob", ALICE)) == (
                "both", "both"):
            break
        await asyncio.sleep(0.05)
    assert await subscription(one, "alice", BOB) == "both"
    assert await subscription(two, "bob", ALICE) == "both"
    # A presence change on node2 is broadcast to the contact on node1 (RFC 6121 §4.4.2).
    away: asyncio.Future[str] = loop.create_future()

    def on_changed(presence: Any) -> None:
        if presence["from"].bare == BOB and presence["show"] == "away" and not away.done():
            away.set_result(presence["status"])

    alice.add_event_handler("changed_status", on_changed)
    bob.send_presence(pshow="away", pstatus="lunch")
    assert await asyncio.wait_for(away, 10) == "lunch"
    # Unavailable when bob's stream ends on node2.
    gone: asyncio.Future[str] = loop.create_future()
    alice.add_event_handler("presence_unavailable", lambda p: gone.done() or (
        p["from"].bare == BOB and gone.set_result(str(p["from"]))))
    bob.disconnect()
    assert await asyncio.wait_for(gone, 10) == f"{BOB}/desk"


async def test_iqs_to_a_full_jid_on_the_other_node(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    alice = await one.client(ALICE, resource="laptop",
                             plugins=("xep_0199", "xep_0030", "xep_0092"))
    bob = await two.client(BOB, resource="desk", plugins=("xep_0092", "xep_0199", "xep_0030"))
    bob.plugin["xep_0092"].software_name = "bob-client"
    bob.plugin["xep_0092"].version = "4.2"
    await eventually(sees(one, f"{BOB}/desk", available=False), "node1 sees bob")
    await eventually(sees(two, f"{ALICE}/laptop", available=False), "node2 sees alice")
    # XEP-0199 ping to a full JID: answered by bob's client on node2, the result comes back.
    rtt = await alice.plugin["xep_0199"].ping(f"{BOB}/desk", timeout=10)
    assert rtt is not None and rtt >= 0
    # XEP-0092 software version: the client's own answer (not the server's).
    version = await alice.plugin["xep_0092"].get_version(f"{BOB}/desk", timeout=10)
    assert version["software_version"]["name"] == "bob-client"
    assert version["software_version"]["version"] == "4.2"
    # XEP-0030 disco#info of the full JID, node2 -> node1 this time.
    info = await bob.plugin["xep_0030"].get_info(f"{ALICE}/laptop", timeout=10)
    assert "urn:xmpp:ping" in info["disco_info"]["features"]


async def test_iq_to_a_session_gone_since_is_answered(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    """The directory still names a session that its node closed: the node answers the iq
    with service-unavailable (RFC 6121 §8.5.3.2.1) and keeps a message offline."""
    one, two = nodes
    alice, bob = await alice_and_bob(one, two)
    remote = one.server.sessions.get(JID.parse(f"{BOB}/desk"))
    assert remote is not None
    await bob.close()
    await eventually(lambda: len(two.server.sessions) == 0, "bob gone from node2")
    # Through the proxy node1 still held: node2 no longer has that session.
    remote.send(etree.fromstring(
        f"<iq xmlns='jabber:client' type='get' id='v1' from='{ALICE}/phone' to='{BOB}/desk'>"
        "<query xmlns='jabber:iq:version'/></iq>"))
    error = await alice.expect(IQ)
    assert error.get("type") == "error" and error.get("id") == "v1"
    assert error.find(f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}"
                      "service-unavailable") is not None
    remote.send(etree.fromstring(
        f"<message xmlns='jabber:client' type='chat' id='late' from='{ALICE}/phone' "
        f"to='{BOB}/desk'><body>later</body></message>"))
    back = await raw_available(two, BOB, "desk")  # offline storage delivers it (XEP-0160)
    got = await back.expect(MESSAGE)
    assert got.get("id") == "late" and got.findtext(f"{{{CLIENT}}}body") == "later"
    await alice.close()
    await back.close()


async def test_resource_conflict_across_nodes(nodes: tuple[RunningServer, RunningServer]
                                              ) -> None:
    one, two = nodes
    old = await raw_available(two, BOB, "same")
    await eventually(sees(one, f"{BOB}/same"), "node1 sees bob/same")
    new = await one.raw_login(BOB, "same")
    # RFC 6120 §7.7.2.2: the older session, on the other node, is closed with <conflict/>.
    assert await old.stream_error(10) == "conflict"
    await new.send("<presence/>")
    await new.expect(PRESENCE)
    await eventually(lambda: len(two.server.sessions) == 0, "the old session gone")
    # The directory names the new session only; a message to it arrives on node1.
    alice = await raw_available(two, ALICE, "x")
    await eventually(sees(two, f"{BOB}/same"), "node2 sees the new bob/same")
    await alice.send(f"<message to='{BOB}/same' type='chat' id='c1'><body>hi</body></message>")
    got = await new.expect(MESSAGE)
    assert got.get("id") == "c1"
    await new.close()
    await alice.close()


async def test_fenced_node_closes_its_streams_and_rejoins(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    one, two = nodes
    bob = await raw_available(two, BOB, "desk")
    cluster = two.server.cluster
    assert cluster is not None
    first = cluster.membership.incarnation
    # As if node2 had lost Redis for longer than dead_after: its key is gone.
    await cluster.redis.delete("presenced:node:node2")
    assert await bob.stream_error(10) == "system-shutdown"
    await eventually(lambda: cluster.membership.incarnation != first, "a new incarnation")
    one_cluster = one.server.cluster
    assert one_cluster is not None
    await eventually(lambda: one_cluster.membership.live.get("node2") ==
                     cluster.membership.incarnation, "node1 sees the new incarnation")


async def test_cluster_status_lists_both_nodes(nodes: tuple[RunningServer, RunningServer]
                                               ) -> None:
    one, two = nodes
    alice = await raw_available(one, ALICE, "a")
    bob = await raw_available(two, BOB, "b")
    bob2 = await raw_available(two, BOB, "c")
    await asyncio.sleep(0.5)  # a heartbeat publishes the session counts
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "cluster", "status", "--json", "-c",
        str(one.config_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    nodes_seen = {n["node"]: n for n in map(json.loads, out.decode().splitlines())}
    assert set(nodes_seen) == {"node1", "node2"}
    assert all(n["alive"] for n in nodes_seen.values())
    assert (nodes_seen["node1"]["sessions"], nodes_seen["node2"]["sessions"]) == (1, 2)
    assert (nodes_seen["node1"]["rooms"], nodes_seen["node2"]["rooms"]) == (0, 0)
    assert all(isinstance(n["missed"], int) for n in nodes_seen.values())
    assert nodes_seen["node2"]["incarnation"] == two.server.cluster.membership.incarnation  # type: ignore[union-attr]
    # The table form names both.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "cluster", "status", "-c", str(two.config_path),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _err = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().splitlines()
    assert lines[0].split()[:7] == ["NODE", "STATE", "AGE", "HEARTBEAT", "SESSIONS", "ROOMS",
                                    "MISSED"]
    assert [line.split()[:2] for line in lines[1:]] == [["node1", "alive"], ["node2", "alive"]]
    assert [line.split()[4:6] for line in lines[1:]] == [["1", "0"], ["2", "0"]]
    for client in (alice, bob, bob2):
        await client.close()


def test_sqlite_with_cluster_is_a_config_error(tmp_path: Path) -> None:
    given = write_config(tmp_path / "a", '[storage]\nbackend = "sqlite"\n[cluster]\n'
                         'redis = "redis://127.0.0.1:6379/0"\nnode = "node1"\n')
    with pytest.raises(ConfigErrors) as info:
        load_config(given)
    line = given.read_text().splitlines().index('backend = "sqlite"') + 1
    assert str(info.value) == (f'{given}:{line}: [storage] backend: [cluster] needs the shared '
                               'PostgreSQL database, not SQLite; expected "postgresql"')
    implicit = write_config(tmp_path / "b", '[cluster]\nredis = "redis://127.0.0.1:6379/0"\n'
                            'node = "node1"\n')
    with pytest.raises(ConfigErrors) as info:
        load_config(implicit)
    line = implicit.read_text().splitlines().index('redis = "redis://127.0.0.1:6379/0"') + 1
    assert str(info.value).startswith(f"{implicit}:{line}: [cluster] redis: [cluster] needs")
    missing = write_config(tmp_path / "c", '[cluster]\nnode = "n"\n')
    with pytest.raises(ConfigErrors, match=r"\[cluster\] redis: missing"):
        load_config(missing)
    # Without [cluster]: SQLite as always, and no cluster.
    assert load_config(write_config(tmp_path / "d")).cluster.enabled is False


async def test_a_connected_session_on_another_node_gets_no_push(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    """XEP-0357 §3: push only while an account has no connected session. bob, connected on
    node2 with push enabled, gets alice's messages from node1, and his app server (here a client
    on node1) no publish: node1 used to take the session on node2 for a detached one."""
    one, two = nodes
    await one.add_user("app@a.test")
    app = await raw_available(one, "app@a.test", "server")
    bob = await raw_available(two, BOB, "phone")
    reply = await bob.ask("<iq type='set' id='e1'><enable xmlns='urn:xmpp:push:0' "
                          "jid='app@a.test/server' node='n1'/></iq>", skip_others=True)
    assert reply.get("type") == "result", etree.tostring(reply)
    alice = await raw_available(one, ALICE, "desk")
    await eventually(sees(one, f"{BOB}/phone"), "node1 sees bob on node2")
    for i in range(3):
        await alice.send(f"<message to='{BOB}' type='chat' id='p{i}'><body>{i}</body></message>")
        assert (await bob.expect(MESSAGE)).get("id") == f"p{i}"
    with pytest.raises(TimeoutError):
        got = await app.expect(IQ, timeout=1.0)
        raise AssertionError(f"a push for a connected session: {etree.tostring(got)!r}")
    for client in (alice, bob, app):
        await client.close()


def test_entries_for_one_node_travel_packed_in_order() -> None:
    """Inbox: a flush writes one stream entry per run of records for a node (one XADD, one
    reply to parse), read back in the order written; a value holding a separator goes alone."""
    from server.cluster.inbox import _entries, records

    def entry(n: int, xml: str = "<message/>") -> dict[str, str]:
        return {"k": "s", "j": "bob@a.test/r", "s": "1", "x": xml, "m": f"n1:i:{n}"}

    batch = [("in2", entry(1)), ("in3", entry(2)), ("in2", entry(3)),
             ("in2", entry(4, "<m>\x1f</m>")), ("in2", entry(5)), ("in2", entry(6))]
    written = _entries(batch)
    assert [stream for stream, _ in written] == ["in2", "in2", "in2", "in3"]
    assert len(written[0][1]) == 1 and "*" in written[0][1]  # entries 1 and 3, packed
    read = {stream: [] for stream in ("in2", "in3")}  # type: dict[str, list[dict[str, str]]]
    for stream, fields in written:
        read[stream] += records({k.encode(): v.encode() for k, v in fields.items()})
    assert read == {"in2": [entry(1), entry(3), entry(4, "<m>\x1f</m>"), entry(5), entry(6)],
                    "in3": [entry(2)]}
    many = _entries([("in2", entry(n)) for n in range(300)])
    assert [len(records({b"*": f["*"].encode()})) for _, f in many] == [128, 128, 44]


async def test_a_session_bound_a_moment_ago_elsewhere_is_found_on_a_miss(
        nodes: tuple[RunningServer, RunningServer]) -> None:
    """node1's replica lags binds on node2 (here: node1 hears no invalidation for bob or
    carol at all). A stanza that finds nothing in the replica makes node1 read the account's
    directory entry in Redis once before giving up: a message to a bare or full JID reaches
    the session on node2 instead of offline storage (RFC 6121 §8.5), an iq to a full JID is
    the client's to answer instead of service-unavailable. A hit in the replica reads nothing."""
    one, two = nodes
    cluster, other = one.server.cluster, two.server.cluster
    assert cluster is not None and other is not None
    await one.add_user("carol@a.test")
    directory = cluster.directory
    heard = directory.invalidate
    lagging = {BOB, "carol@a.test"}
    directory.invalidate = lambda bare: None if bare in lagging else heard(bare)  # type: ignore[method-assign]
    alice = await raw_available(one, ALICE, "phone")
    carol = await raw_available(two, "carol@a.test", "desk")
    bob = await raw_available(two, BOB, "desk")
    await other.directory.flush()  # node2's entries are in Redis (node1 was not told)
    assert not one.server.sessions.resources(JID.parse(BOB))  # the replica lags
    assert not one.server.sessions.resources(JID.parse("carol@a.test"))
    # Bare JID: no available resource known, until Redis is asked.
    await alice.send("<message to='carol@a.test' type='chat' id='b1'><body>bare</body>"
                     "</message>")
    got = await carol.expect(MESSAGE)
    assert (got.get("id"), got.findtext(f"{{{CLIENT}}}body")) == ("b1", "bare")
    assert directory.rechecks == 1
    # Full JID.
    await alice.send(f"<message to='{BOB}/desk' type='chat' id='f1'><body>full</body>"
                     "</message>")
    got = await bob.expect(MESSAGE)
    assert (got.get("id"), got.findtext(f"{{{CLIENT}}}body")) == ("f1", "full")
    assert directory.rechecks == 2
    # Found now: the next one goes straight to node2's inbox, no lookup.
    await alice.send(f"<message to='{BOB}/desk' type='chat' id='f2'><body>2</body></message>")
    assert (await bob.expect(MESSAGE)).get("id") == "f2"
    assert directory.rechecks == 2
    # An iq to a full JID bound a moment ago: delivered to the client, which answers it.
    tablet = await two.raw_login(BOB, "tablet")
    await other.directory.flush()
    await alice.send(f"<iq to='{BOB}/tablet' type='get' id='q1'>"
                     "<query xmlns='jabber:iq:version'/></iq>")
    asked = await tablet.expect(IQ)
    assert asked.get("id") == "q1" and asked.get("type") == "get"
    assert directory.rechecks == 3
    # Nothing was stored offline.
    for user in ("bob", "carol"):
        assert await one.server.storage.offline.count(user, "a.test") == 0
    for client in (alice, bob, carol, tablet):
        await client.close()


async def test_a_burst_of_changes_elsewhere_is_read_in_batches(
        nodes: tuple[RunningServer, RunningServer], redis_url: str) -> None:  # noqa: F811
    """A thousand accounts changed on other nodes at once (a burst of logins) are read again in
    batches by one task, over a connection or two: not a Redis connection per account, which
    emptied redis-py's pool under `--workers 6` and starved the heartbeats (the nodes were
    fenced). Sessions of the burst that exist in Redis appear in the replica."""
    import redis.asyncio

    one, two = nodes
    bob = await two.raw_login(BOB, "desk")
    watcher = redis.asyncio.from_url(redis_url)
    try:
        before = len(await watcher.client_list())
        cluster = one.server.cluster
        assert cluster is not None
        directory = cluster.directory
        for n in range(1000):
            directory.invalidate(f"user{n}@a.test")
        directory.invalidate(BOB)
        await eventually(lambda: directory.get(JID.parse(f"{BOB}/desk")) is not None,
                         "bob/desk read again")
        await eventually(lambda: not directory._stale, "every account read")
        assert len(await watcher.client_list()) <= before + 2
    finally:
        await watcher.aclose()
        await bob.close()


async def test_a_busy_event_loop_is_not_a_dead_node(
        nodes: tuple[RunningServer, RunningServer], caplog: pytest.LogCaptureFixture) -> None:
    """A node whose event loop is starved (CPU-bound work, here a blocking sleep longer than
    dead_after) is busy, not dead: its heartbeat thread keeps its key, nobody declares it dead,
    it does not fence itself, and its clients stay connected (session 7: a CPU-starved worker
    was fenced and closed ~9,500 sessions, whose reconnections loaded the others further)."""
    import logging
    import time

    caplog.set_level(logging.INFO, logger="presenced.cluster")
    one, two = nodes
    clusters = [one.server.cluster, two.server.cluster]
    assert clusters[0] is not None and clusters[1] is not None
    alice, bob = await alice_and_bob(one, two)
    before = [c.membership.incarnation for c in clusters if c is not None]
    dead_after = clusters[0].membership.settings.dead_after
    loop = asyncio.get_running_loop()
    blocked = loop.create_future()

    def block() -> None:  # both nodes share this loop: both are starved
        time.sleep(dead_after + 1.5)
        blocked.set_result(None)

    loop.call_soon(block)
    await blocked
    await asyncio.sleep(dead_after)  # time for a fencing, a reaping, to happen
    assert not [r for r in caplog.records if "event=cluster-fenced" in r.getMessage()]
    assert not [r for r in caplog.records if "event=cluster-node-died" in r.getMessage()]
    assert [c.membership.incarnation for c in clusters if c is not None] == before
    await alice.send(f"<message to='{BOB}/desk' type='chat' id='b1'><body>still here</body>"
                     "</message>")
    got = await bob.expect(MESSAGE)
    assert (got.get("id"), got.findtext(f"{{{CLIENT}}}body")) == ("b1", "still here")
    await bob.send(f"<message to='{ALICE}/phone' type='chat' id='b2'><body>me too</body>"
                   "</message>")
    assert (await alice.expect(MESSAGE)).get("id") == "b2"
    await alice.close()
    await bob.close()


async def test_a_hung_event_loop_is_a_dead_node(nodes: tuple[RunningServer, RunningServer]
                                                ) -> None:
    """The heartbeat thread beats only while the event loop shows progress: a loop that has
    shown none for hung_after(dead_after) seconds is hung, its key expires and the others
    declare the node dead within dead_after, as for a frozen process."""
    import time

    from server.cluster.heartbeat import hung_after

    one, two = nodes
    cluster, other = one.server.cluster, two.server.cluster
    assert cluster is not None and other is not None
    membership = other.membership
    dead = membership.incarnation
    await asyncio.sleep(0.5)
    assert membership.thread.beats > 0
    # node2's loop side stops (as a hung loop would), its last sign of progress long ago.
    assert membership._task is not None
    membership._task.cancel()
    membership.progress = time.monotonic() - hung_after(membership.settings.dead_after) - 1
    beats = membership.thread.beats
    await eventually(lambda: cluster.membership.live.get("node2") != dead,
                     "node1 declares node2 dead", timeout=membership.settings.dead_after + 2)
    assert membership.thread.beats == beats
    assert membership.thread.alive  # not stopped: it waits for the loop


async def test_missed_heartbeats_are_counted_and_shown(
        nodes: tuple[RunningServer, RunningServer], redis_server: Any,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis paused for less than dead_after: every node misses beats, is not declared dead,
    and says how many it missed (`presenced cluster status`, /metrics) and, while it waits,
    how overdue its next beat is."""
    import logging
    import signal

    from prometheus_client.parser import text_string_to_metric_families

    from server.cluster.membership import status
    from server.http.metrics import Metrics

    caplog.set_level(logging.INFO, logger="presenced.cluster")
    one, _two = nodes
    cluster = one.server.cluster
    assert cluster is not None
    metrics = Metrics(one.server)

    def samples() -> dict[str, float]:
        text = metrics.render("text/plain")[0].decode()
        return {s.name: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name.startswith("presenced_cluster_heartbeat")}

    await asyncio.sleep(0.5)
    before = samples()
    assert before["presenced_cluster_heartbeats_missed_total"] == 0
    assert before["presenced_cluster_heartbeat_late_seconds"] < 0.5
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(1.2)
        assert samples()["presenced_cluster_heartbeat_late_seconds"] >= 0.6
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    await eventually(lambda: cluster.membership.thread.missed >= 3, "node1 counts them")
    after = samples()
    assert after["presenced_cluster_heartbeats_missed_total"] >= 3
    assert after["presenced_cluster_heartbeat_late_seconds"] < 0.5

    async def published() -> dict[str, int]:
        return {n["node"]: n["missed"] for n in await status(cluster.redis)}
    for _ in range(50):
        missed = await published()
        if all(m >= 3 for m in missed.values()):
            break
        await asyncio.sleep(0.1)
    assert set(missed) == {"node1", "node2"} and all(m >= 3 for m in missed.values()), missed
    assert not [r for r in caplog.records if "event=cluster-fenced" in r.getMessage()]


async def test_an_entry_read_while_the_loop_is_busy_is_not_lost(
        nodes: tuple[RunningServer, RunningServer], redis_url: str) -> None:  # noqa: F811
    """node2's event loop is busy for longer than its Redis socket timeout (5 s) while an entry
    arrives in its inbox: Redis answered the blocking read, the client gave up waiting for the
    answer (a timeout), and the entry stayed read and unacknowledged, never handed over, until
    the node died. The reader reads its unacknowledged entries again after a failure."""
    import time

    import redis

    one, two = nodes
    alice, bob = await alice_and_bob(one, two)
    remote = one.server.sessions.get(JID.parse(f"{BOB}/desk"))
    assert remote is not None
    sid = remote.sid  # type: ignore[attr-defined]
    writer = redis.Redis.from_url(redis_url)
    loop = asyncio.get_running_loop()
    blocked = loop.create_future()

    def block() -> None:
        time.sleep(0.3)
        # As node1 would write it (inbox.py: a stanza for a session), while node2 is busy.
        writer.xadd("presenced:inbox:node2", {
            "k": "s", "j": f"{BOB}/desk", "s": sid, "m": "node1:test:1",
            "x": f"<message xmlns='jabber:client' from='{ALICE}/phone' to='{BOB}/desk' "
                 "type='chat' id='busy1'><body>while you were busy</body></message>"})
        time.sleep(6.0)
        blocked.set_result(None)

    try:
        loop.call_soon(block)
        await blocked
        got = await bob.expect(MESSAGE, timeout=10)
        assert (got.get("id"), got.findtext(f"{{{CLIENT}}}body")) == (
            "busy1", "while you were busy")
        pending = await asyncio.to_thread(writer.xpending, "presenced:inbox:node2", "presenced")
        assert pending["pending"] == 0, pending
    finally:
        writer.close()
    await alice.close()
    await bob.close()
