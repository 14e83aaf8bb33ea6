"""A cluster's edges (issue 22 item 4): federation with a real Prosody through a two-node
cluster, and external components (XEP-0114) connected to one node for users of another.

a.test is served by two in-process nodes (tests/test_cluster.py's configuration: a private
Redis and PostgreSQL) on 127.0.0.71 and 127.0.0.72; Prosody (Debian `prosody`) serves
prosody.test on 127.0.0.73 and resolves a.test to node1 only (its private hosts file), so
everything Prosody sends lands on node1, for users of either node. Both nodes reach Prosody
(a static route); each opens its own outbound stream, authenticated by dialback with the key
secret the nodes share in the database (XEP-0220 §2.3: Prosody verifies node2's key by asking
a.test, which is node1).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from bench.peers import CertificateAuthority, ProsodyPeer, make_ca, make_certificates
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, RawClient, condition, header
from tests.redis import redis_server, redis_url  # noqa: F401 (fixtures)
from tests.test_cluster import cluster_tables, eventually, sees
from tests.test_federation import federation_scenario, next_message, next_stanza
from tests.test_interop import need, peer_login, running
from tests.test_presence import next_presence

DOMAIN, PROSODY = "a.test", "prosody.test"
NODE1, NODE2, PROSODY_HOST = "127.0.0.71", "127.0.0.72", "127.0.0.73"
S2S_PORT = 5269
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PAT, QUINN = f"pat@{PROSODY}", f"quinn@{PROSODY}"


@contextlib.contextmanager
def prosody(tmp: Path, ca: CertificateAuthority | None, bidi: bool = False
            ) -> Iterator[ProsodyPeer]:
    """ca: certificates issued by it on both sides, verified (SASL EXTERNAL); None: dialback.
    bidi: Prosody's mod_s2s_bidi (XEP-0288) answers over the nodes' own streams."""
    need("prosody", "prosody lua-unbound")
    certs = make_certificates(tmp / "prosody-certs", [PROSODY], ca=ca)
    peer = ProsodyPeer(tmp / "prosody", host=PROSODY_HOST, domains=(PROSODY,),
                       s2s_port=S2S_PORT, certificates=certs,
                       cafile=ca.certificate if ca else None, dialback=ca is None,
                       s2s_secure_auth=ca is not None, hosts={DOMAIN: NODE1},
                       extra_modules=("s2s_bidi",) if bidi else ())
    for user in ("pat", "quinn"):
        peer.register(user, PROSODY, PASSWORD)
    with running(peer):
        yield peer


@contextlib.asynccontextmanager
async def two_nodes(tmp: Path, pg_dsn: str, redis_url: str, extra: str,  # noqa: F811
                    **options: Any) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """node1 and node2 for a.test on NODE1 and NODE2 (tables `extra` added; options for
    start_server, "{host}" in a string option being the node's address), alice and bob."""
    started: list[RunningServer] = []
    try:
        for name, host in (("node1", NODE1), ("node2", NODE2)):
            mine = {k: v.format(host=host) if isinstance(v, str) else v
                    for k, v in options.items()}
            started.append(await start_server(
                tmp / name, cluster_tables(pg_dsn, redis_url, name) + extra,
                domains=(DOMAIN,), host=host, **mine))
        one, two = started
        await one.add_user(ALICE)
        await one.add_user(BOB)
        yield one, two
    finally:
        for node in reversed(started):
            await stop_server(node)


def federated_nodes(tmp: Path, pg_dsn: str, redis_url: str,  # noqa: F811
                    ca: CertificateAuthority | None = None
                    ) -> contextlib.AbstractAsyncContextManager[tuple[RunningServer,
                                                                      RunningServer]]:
    """Each node with an s2s listener on its own address and a route to Prosody; one
    certificate for a.test (issued by ca and verified, or self-signed and dialback stands in
    for it)."""
    certs = make_certificates(tmp / "a-certs", [DOMAIN], ca=ca)
    s2s = (f'[s2s]\nroutes = {{ "{PROSODY}" = "{PROSODY_HOST}:{S2S_PORT}" }}\n'
           f"require_valid_certificates = {'true' if ca else 'false'}\n")
    trust = {"ca_file": ca.certificate} if ca else {}
    return two_nodes(tmp, pg_dsn, redis_url, s2s, s2s=f"{{host}}:{S2S_PORT}",
                     certificate=(certs.certificate, certs.key), **trust)


@pytest.mark.parametrize("mode", ["dialback", "certificates", "bidi"])
async def test_prosody_federates_with_users_on_both_nodes(
        tmp_path: Path, pg_dsn: str, redis_url: str, mode: str) -> None:  # noqa: F811
    """Subscriptions both ways, presence both ways (probes from Prosody answered by node1 for
    bob on node2), messages and iqs both ways, unavailable: for alice on node1 and bob on
    node2 with two Prosody users. Prosody's streams land on node1 only; node2 sends over its
    own outbound stream, which Prosody accepts after asking node1 about node2's key
    (dialback), or by its certificate (SASL EXTERNAL, XEP-0178); with bidi, Prosody answers
    each node over that node's own stream (XEP-0288) and never connects to us."""
    ca = make_ca(tmp_path / "ca") if mode in ("certificates", "bidi") else None
    async with federated_nodes(tmp_path, pg_dsn, redis_url, ca) as (one, two):
        with prosody(tmp_path, ca, bidi=mode == "bidi") as peer:
            alice = await one.raw_login(ALICE, resource="pc")
            bob = await two.raw_login(BOB, resource="desk")
            pat = await peer_login(PROSODY_HOST, PROSODY, "pat")
            quinn = await peer_login(PROSODY_HOST, PROSODY, "quinn")
            # bob first: Prosody's first stream to a.test reaches node1, bob is on node2.
            await federation_scenario(bob, pat, BOB, PAT)
            await federation_scenario(alice, quinn, ALICE, QUINN)
            # Everything Prosody sent came in on node1; each node sent over its own stream.
            assert one.server.federation is not None and two.server.federation is not None
            assert not two.server.federation.inbound, peer.log_tail()
            if mode == "bidi":  # Prosody answered over each node's own stream (XEP-0288)
                assert not one.server.federation.inbound, peer.log_tail()
                assert all(s.negotiation.bidi for node in (one, two)
                           for s in node.server.federation.outbound.values()
                           if s.negotiation is not None)
            else:
                assert any(s.negotiation.authenticated for s in one.server.federation.inbound)
            want = "sasl-external" if ca else "dialback"
            for node in (one, two):
                ready = {(s.local, s.remote, s.negotiation.method)
                         for s in node.server.federation.outbound.values()
                         if s.ready and s.negotiation is not None}
                assert ready == {(DOMAIN, PROSODY, want)}, (node.server.config.cluster.node,
                                                             peer.log_tail())
            # A stanza from Prosody to bob's bare JID while bob is on node2 and alice's
            # session is the only one on node1: routed across (RFC 6121 §8.5.2.1.1).
            await pat.send(f"<message to='{BOB}' type='chat' id='p1'><body>to bob</body>"
                           "</message>")
            got = await next_message(bob)
            assert (got.get("from"), got.findtext(f"{{{CLIENT}}}body")) == (
                pat.jid, "to bob")  # type: ignore[attr-defined]
            # A probe for bob (on node2) from a Prosody resource that comes online: answered
            # with bob's presence by node1 (RFC 6121 §4.3.2), through the directory.
            await eventually(sees(one, f"{BOB}/desk"), "node1 sees bob on node2")
            late = await peer_login(PROSODY_HOST, PROSODY, "pat")
            await late.send("<presence/>")
            got = await next_presence(late, None, BOB)
            assert got.get("from") == f"{BOB}/desk"
            # An iq from Prosody to bob's full JID on node2, answered by bob's client.
            await late.send(f"<iq type='get' to='{BOB}/desk' id='v1'>"
                            "<query xmlns='jabber:iq:version'/></iq>")
            asked = await next_stanza(bob, "iq")
            assert asked.get("from") == late.jid  # type: ignore[attr-defined]
            await bob.send(f"<iq type='result' to='{late.jid}' id='v1'/>")  # type: ignore[attr-defined]
            answer = await next_stanza(late, "iq")
            assert (answer.get("type"), answer.get("from")) == ("result", f"{BOB}/desk")
            for client in (alice, bob, pat, quinn, late):
                await client.close()




# -- external components (XEP-0114) on any node -------------------------------------------------

BRIDGE, SECRET = "bridge.a.test", "a component secret"
COMPONENT_NS = "jabber:component:accept"


def component_nodes(tmp: Path, pg_dsn: str, redis_url: str  # noqa: F811
                    ) -> contextlib.AbstractAsyncContextManager[tuple[RunningServer,
                                                                      RunningServer]]:
    """Each node with a component listener for bridge.a.test."""
    return two_nodes(tmp, pg_dsn, redis_url,
                     f'[components]\n"{BRIDGE}" = {{ secret = "{SECRET}" }}\n',
                     listen_extra='component = ["{host}:0"]')


async def connect_component(node: RunningServer) -> RawClient:
    """A component stream to this node, handshake sent (XEP-0114 §3); not yet answered."""
    host, port = node.address("component")
    raw = await RawClient.connect(host, port)
    await raw.send(header(BRIDGE, version=None, xmlns=COMPONENT_NS))
    for _ in range(50):
        if raw.stream_attrs:
            break
        await raw._read_more(5.0)
    digest = hashlib.sha1((raw.stream_attrs["id"] + SECRET).encode()).hexdigest()
    await raw.send(f"<handshake>{digest}</handshake>")
    return raw


async def component(node: RunningServer) -> RawClient:
    raw = await connect_component(node)
    done = await raw.next()
    assert done.tag == f"{{{COMPONENT_NS}}}handshake" and len(done) == 0
    return raw


async def to_component(raw: RawClient, kind: str, timeout: float = 5.0) -> etree._Element:
    """The next message or iq the component gets (other stanzas skipped)."""
    while (el := await raw.next(timeout)).tag != f"{{{COMPONENT_NS}}}{kind}":
        pass
    return el


async def route_owner(node: RunningServer) -> str | None:
    assert node.server.cluster is not None
    raw = await node.server.cluster.redis.get(f"presenced:component:{BRIDGE}")
    return raw.decode() if raw is not None else None


def incarnation(node: RunningServer) -> str:
    cluster = node.server.cluster
    assert cluster is not None
    return f"{cluster.name}:{cluster.membership.incarnation}"


async def test_a_component_on_one_node_serves_users_on_the_other(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """The bridge connects to node1; bob on node2 writes to it and gets its stanzas, both
    ways, in order; a second connection on either node is refused with <conflict/>; once the
    bridge leaves, node2 answers for it as for a component that is away; it may then connect
    to node2 and serve alice on node1."""
    async with component_nodes(tmp_path, pg_dsn, redis_url) as (one, two):
        bridge = await component(one)
        assert await route_owner(one) == incarnation(one)
        bob = await two.raw_login(BOB, resource="desk")
        await bob.send("<presence/>")
        await eventually(sees(one, f"{BOB}/desk"), "node1 sees bob on node2")
        for i in range(5):
            await bob.send(f"<message to='irc@{BRIDGE}' type='chat' id='b{i}'><body>{i}</body>"
                           "</message>")
        got = [await to_component(bridge, "message") for _ in range(5)]
        assert [(m.get("id"), m.get("from")) for m in got] == [
            (f"b{i}", f"{BOB}/desk") for i in range(5)]
        assert got[0].tag == f"{{{COMPONENT_NS}}}message"
        # The bridge answers bob's full and bare JIDs; both reach node2.
        for to in (f"{BOB}/desk", BOB):
            await bridge.send(f"<message xmlns='{COMPONENT_NS}' from='irc@{BRIDGE}' to='{to}' "
                              f"type='chat' id='to-{to}'><body>hi</body></message>")
            reply = await next_message(bob)
            assert (reply.get("id"), reply.get("from")) == (f"to-{to}", f"irc@{BRIDGE}")
        # An iq from bob to the bridge, answered by it (the result crosses back to node2).
        await bob.send(f"<iq type='get' to='{BRIDGE}' id='v1'><query xmlns='jabber:iq:version'/>"
                       "</iq>")
        asked = await to_component(bridge, "iq")
        assert (asked.get("from"), asked.get("type")) == (f"{BOB}/desk", "get")
        await bridge.send(f"<iq xmlns='{COMPONENT_NS}' type='result' id='v1' from='{BRIDGE}' "
                          f"to='{BOB}/desk'/>")
        answer = await next_stanza(bob, "iq")
        assert (answer.get("type"), answer.get("id"), answer.get("from")) == (
            "result", "v1", BRIDGE)
        # XEP-0114: one connection per component domain, cluster-wide.
        for node in (two, one):
            second = await connect_component(node)
            assert await second.stream_error() == "conflict"
        assert await route_owner(one) == incarnation(one)
        await bridge.close()
        await eventually_async(lambda: route_owner(one), None, "the route removed")
        await bob.send(f"<message to='irc@{BRIDGE}' type='chat' id='gone'><body>?</body>"
                       "</message>")
        bounce = await next_message(bob)
        assert bounce.get("id") == "gone" and condition(bounce) == "service-unavailable"
        # Now on node2, for alice on node1.
        bridge = await component(two)
        assert await route_owner(two) == incarnation(two)
        alice = await one.raw_login(ALICE, resource="pc")
        await alice.send(f"<message to='irc@{BRIDGE}' type='chat' id='a1'><body>x</body>"
                         "</message>")
        got_one = await to_component(bridge, "message")
        assert (got_one.get("id"), got_one.get("from")) == ("a1", f"{ALICE}/pc")
        for client in (bridge, bob, alice):
            await client.close()


async def test_a_dead_nodes_component_route_is_removed_and_taken_over(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """node1, holding the bridge, stops beating (as if killed): node2, cleaning up after its
    incarnation (reaper.py), removes its route, and the bridge may connect to node2."""
    async with component_nodes(tmp_path, pg_dsn, redis_url) as (one, two):
        bridge = await component(one)
        owner = incarnation(one)
        assert await route_owner(two) == owner
        second = await connect_component(two)
        assert await second.stream_error() == "conflict"  # node1 is live
        assert one.server.cluster is not None
        await one.server.cluster.membership.stop()  # no more heartbeats: dead after 3 s
        await eventually_async(lambda: route_owner(two), None, "the dead node's route removed",
                               timeout=15)
        assert not await two.server.cluster.redis.exists(  # type: ignore[union-attr]
            f"presenced:placed:component:{owner}")
        bridge2 = await component(two)
        assert await route_owner(two) == incarnation(two)
        bob = await two.raw_login(BOB, resource="desk")
        await bob.send(f"<message to='irc@{BRIDGE}' type='chat' id='n2'><body>x</body>"
                       "</message>")
        assert (await to_component(bridge2, "message")).get("id") == "n2"
        for client in (bridge, bridge2, bob):
            await client.close()


async def test_a_fenced_node_claims_its_components_again(
        tmp_path: Path, pg_dsn: str, redis_url: str) -> None:  # noqa: F811
    """node1 is declared dead while it runs (fencing: it lost Redis for longer than
    dead_after) and joins again as a new incarnation: the bridge still connected to it claims
    its domain again under that incarnation, the clean-up after the old one leaves the new
    claim alone, and bob on node2 reaches the bridge again."""
    async with component_nodes(tmp_path, pg_dsn, redis_url) as (one, two):
        bridge = await component(one)
        cluster = one.server.cluster
        assert cluster is not None
        first = incarnation(one)
        await cluster.redis.delete("presenced:node:node1")  # as if its key had expired
        await eventually(lambda: incarnation(one) != first, "node1 joined again")
        await eventually_async(lambda: route_owner(two), incarnation(one),
                               "the bridge claimed again by the new incarnation")
        await eventually(lambda: two.server.cluster.membership.is_live(  # type: ignore[union-attr]
            "node1", cluster.membership.incarnation), "node2 sees the new incarnation")
        await eventually_async(lambda: cluster.redis.hexists("presenced:incarnations", first),
                               False, "the old incarnation cleaned up after")
        assert await route_owner(two) == incarnation(one)
        bob = await two.raw_login(BOB, resource="desk")
        await bob.send(f"<message to='irc@{BRIDGE}' type='chat' id='f1'><body>x</body>"
                       "</message>")
        assert (await to_component(bridge, "message")).get("id") == "f1"
        for client in (bridge, bob):
            await client.close()


async def eventually_async(read: Callable[[], Awaitable[object]], want: object, what: str,
                           timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await read()) != want:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (still {got!r})")
        await asyncio.sleep(0.05)


__all__ = ["component_nodes", "federated_nodes", "prosody"]
