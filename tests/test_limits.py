"""[limits]: read and stanza rates, per-address connection counts, authentication backoff
(server/limits.py), unit tests of the pure accounting, then over real sockets. Loopback is
trusted by default, so the socket tests set ``trusted = []`` and connect from several
127.0.0.x addresses to show that counting is per address."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from server.config import load_config
from server.limits import (
    AuthBackoff,
    Limiter,
    ReadShaper,
    Ticket,
    TokenBucket,
    address_key,
)
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import SASL_NS, TLS_NS, RawClient

# -- token bucket --------------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(10, 20, now=100.0)
    assert bucket.level(100.0) == 20
    assert bucket.take(20, 100.0)
    assert not bucket.take(1, 100.0)       # in debt now
    assert bucket.level(100.0) == pytest.approx(-1)
    assert bucket.wait(0, 100.0) == pytest.approx(0.1)
    assert bucket.wait(5, 100.0) == pytest.approx(0.6)
    assert bucket.wait(5, 100.3) == pytest.approx(0.3)
    assert bucket.take(4, 100.6)           # 6 refilled, -1 + 6 - 4 = 1
    assert bucket.level(100.6) == pytest.approx(1)


def test_bucket_never_saves_more_than_its_burst() -> None:
    bucket = TokenBucket(10, 20, now=0.0)
    bucket.take(20, 0.0)
    assert bucket.level(1000.0) == 20
    assert bucket.wait(50, 1000.0) == 0.0  # more than the burst: waits only for a full bucket
    # a quiet while does not save up more than the burst: 20 at once, then one per 0.1 s
    assert bucket.take_up_to(100, 1000.0) == 20
    assert bucket.take_up_to(100, 1000.0) == 0


def test_bucket_take_up_to_takes_whole_tokens_only() -> None:
    bucket = TokenBucket(100, 50, now=0.0)
    assert bucket.take_up_to(30, 0.0) == 30
    assert bucket.take_up_to(30, 0.0) == 20
    assert bucket.take_up_to(30, 0.0) == 0
    assert bucket.take_up_to(30, 0.005) == 0   # half a token
    assert bucket.take_up_to(30, 0.01) == 1
    assert bucket.level(0.01) == pytest.approx(0)
    assert bucket.wait(10, 0.01) == pytest.approx(0.1)


def test_bucket_take_one() -> None:
    bucket = TokenBucket(2, 3, now=0.0)
    assert [bucket.take_one(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take_one(0.4)            # 0.8 of a token
    assert bucket.take_one(0.5)
    assert not bucket.take_one(0.5)
    assert bucket.wait(1, 0.5) == pytest.approx(0.5)
    assert [bucket.take_one(100.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_clock_going_back_adds_nothing() -> None:
    bucket = TokenBucket(10, 20, now=5.0)
    bucket.take(20, 5.0)
    assert bucket.take_up_to(5, 4.0) == 0
    assert not bucket.take_one(4.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 5)])
def test_bucket_refuses_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


def test_shaper_admits_what_the_bucket_holds_and_wakes_in_quanta() -> None:
    shaper = ReadShaper(TokenBucket(1000, 500, 0.0), None)
    assert shaper.admit(300, 0.0) == 300
    assert shaper.admit(300, 0.0) == 200
    # 100 bytes wait: a tenth of a second's worth (100 bytes) is the quantum
    assert shaper.resume_after(100, 0.0) == pytest.approx(0.1)
    assert shaper.resume_after(40, 0.0) == pytest.approx(0.04)
    assert shaper.resume_after(100_000, 0.0) == pytest.approx(0.1)
    assert shaper.resume_after(100_000, 0.05) == pytest.approx(0.05)
    unlimited = ReadShaper(None, TokenBucket(1, 1, 0.0))
    assert unlimited.admit(10**6, 0.0) == 10**6
    assert unlimited.resume_after(10**6, 0.0) == 0.0


# -- authentication backoff ---------------------------------------------------------------------


def test_backoff_free_failures_then_doubling_up_to_the_cap() -> None:
    backoff = AuthBackoff(free=2, delay=1.0, max_delay=5.0, forget=100.0)
    assert [backoff.penalty(n) for n in range(7)] == [0, 0, 0, 1, 2, 4, 5]
    assert backoff.penalty(10_000) == 5.0  # no overflow
    assert backoff.failed("a", 0.0) == 0
    assert backoff.failed("a", 0.0) == 0
    assert backoff.remaining("a", 0.0) == 0
    assert backoff.failed("a", 1.0) == 1.0
    assert backoff.remaining("a", 1.5) == pytest.approx(0.5)
    assert backoff.remaining("a", 2.0) == 0
    assert backoff.failed("a", 2.0) == 2.0
    assert backoff.remaining("b", 2.0) == 0  # per key
    assert backoff.blocked(2.5) == 1


def test_backoff_forgets_after_a_quiet_while_and_on_success() -> None:
    backoff = AuthBackoff(free=0, delay=1.0, max_delay=60.0, forget=10.0)
    for _ in range(4):
        backoff.failed("a", 0.0)
    assert backoff.remaining("a", 0.0) == 8.0
    assert backoff.failed("a", 11.0) == 1.0   # more than forget after the last: counts anew
    backoff.failed("b", 11.0)
    backoff.succeeded("b")
    assert backoff.remaining("b", 11.0) == 0
    assert backoff.remaining("a", 30.0) == 0
    assert len(backoff) == 0  # remaining() dropped the stale record


def test_backoff_purges_stale_records() -> None:
    backoff = AuthBackoff(free=0, delay=1.0, max_delay=60.0, forget=10.0)
    for i in range(100):
        backoff.failed(f"k{i}", 0.0)
    assert len(backoff) == 100
    backoff.failed("new", 100.0)  # the first purge a minute on
    assert len(backoff) == 1


# -- addresses, counts --------------------------------------------------------------------------


def _limiter(tmp_path: Path, text: str) -> Limiter:
    path = tmp_path / "l.toml"
    path.write_text("[limits]\n" + text)
    return Limiter(load_config(path).limits)


def test_address_keys() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not an address") is None


def test_trusted_addresses_get_no_key(tmp_path: Path) -> None:
    default = _limiter(tmp_path, "")
    assert default.key("127.0.0.1") is None and default.key("127.9.9.9") is None
    assert default.key("::1") is None and default.key("::ffff:127.0.0.1") is None
    assert default.key("192.0.2.1") == "192.0.2.1"
    custom = _limiter(tmp_path, 'trusted = ["10.0.0.0/8"]\n')
    assert custom.key("127.0.0.1") == "127.0.0.1"
    assert custom.key("10.1.2.3") is None


def test_connections_and_unauthenticated_per_address(tmp_path: Path) -> None:
    limiter = _limiter(tmp_path, "max_connections_per_ip = 3\nmax_unauthenticated_per_ip = 2\n")
    first = limiter.open("a")
    second = limiter.open("a")
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert limiter.open("a") == "unauthenticated-per-ip"
    assert isinstance(limiter.open("b"), Ticket)  # per address
    first.authenticated()
    first.authenticated()  # idempotent
    third = limiter.open("a")
    assert isinstance(third, Ticket)
    assert limiter.open("a") == "connections-per-ip"
    assert limiter.refused == {"unauthenticated-per-ip": 1, "connections-per-ip": 1}
    for ticket in (first, second, third, first):
        ticket.release()
    assert "a" not in limiter.connections and "a" not in limiter.unauthenticated
    assert limiter.connections == {"b": 1}


def test_zero_turns_limits_off(tmp_path: Path) -> None:
    limiter = _limiter(tmp_path, "max_connections_per_ip = 0\nmax_unauthenticated_per_ip = 0\n"
                       "c2s_read_rate = 0\nstanza_rate = 0\n")
    assert all(isinstance(limiter.open("a"), Ticket) for _ in range(100))
    assert limiter.shaper("c2s", "a", 0.0) is None


def test_shapers_per_kind(tmp_path: Path) -> None:
    limiter = _limiter(tmp_path, "c2s_read_rate = 100\nc2s_read_burst = 200\n"
                       "s2s_read_rate = 1000\nstanza_rate = 5\nstanza_burst = 7\n")
    c2s = limiter.shaper("c2s", "a", 0.0)
    assert c2s is not None and c2s.bytes is not None and c2s.stanzas is not None
    assert (c2s.bytes.rate, c2s.bytes.burst, c2s.stanzas.rate, c2s.stanzas.burst) == \
        (100, 200, 5, 7)
    s2s = limiter.shaper("s2s", "a", 0.0)
    assert s2s is not None and s2s.bytes is not None and s2s.stanzas is None
    assert limiter.shaper("component", "a", 0.0) is None  # off by default
    assert limiter.shaper("c2s", None, 0.0) is None       # trusted


def test_auth_accounting(tmp_path: Path) -> None:
    limiter = _limiter(tmp_path, "auth_failures_free = 1\nauth_delay = 2.0\n")
    assert limiter.auth_failed("ip1", "alice@a", 0.0) == 0
    assert limiter.auth_failed("ip2", "alice@a", 0.0) == 2.0  # the account's second
    assert limiter.auth_wait("ip1", 0.0) == 0          # each address failed once only
    assert limiter.auth_failed("ip1", "bob@a", 0.0) == 2.0  # the address's second
    assert limiter.auth_wait("ip1", 1.0) == 1.0
    assert limiter.auth_wait(None, 1.0) == 0 and limiter.auth_failed(None, "x", 1.0) == 0
    limiter.auth_succeeded("alice@a")
    assert limiter.auth_failed("ip3", "alice@a", 5.0) == 0  # alice's count started again
    assert limiter.auth_wait("ip1", 1.5) == 0.5             # ip1's did not
    assert limiter.auth_delayed == 2


# -- over real sockets --------------------------------------------------------------------------

DOMAIN = "a.test"


async def _server(tmp_path: Path, limits: str) -> RunningServer:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path, "[limits]\n" + limits)
    for user in ("alice", "bob", "carol"):
        await running.add_user(f"{user}@{DOMAIN}")
    return running


@contextlib.asynccontextmanager
async def _limited(tmp_path: Path, limits: str
                   ) -> AsyncIterator[tuple[RunningServer, list[RawClient]]]:
    """A server with these [limits], and a list for the raw clients to close at the end."""
    running = await _server(tmp_path, limits)
    clients: list[RawClient] = []
    try:
        yield running, clients
    finally:
        for client in clients:
            await client.close()
        await stop_server(running)


async def _connect(running: RunningServer, source: str) -> RawClient:
    host, port = running.address("c2s")
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    return RawClient(reader, writer)


async def _tls(client: RawClient, *, opened: bool = False) -> etree._Element:
    """Open the stream (unless it is) and STARTTLS: the features after TLS."""
    if not opened:
        await client.open(DOMAIN)
    await client.send(f"<starttls xmlns='{TLS_NS}'/>")
    await client.expect(f"{{{TLS_NS}}}proceed")
    await client.starttls()
    return await client.open(DOMAIN)


async def _plain(client: RawClient, user: str, password: str) -> tuple[str, float]:
    """One SASL PLAIN attempt: (the answer's name or failure condition, seconds it took)."""
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    started = time.monotonic()
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{token}</auth>")
    answer = await client.next(timeout=15)
    took = time.monotonic() - started
    name = etree.QName(answer).localname
    if name == "failure":
        name = etree.QName(answer[0]).localname
    return name, took


async def _login(running: RunningServer, source: str, user: str) -> RawClient:
    client = await _connect(running, source)
    await client.login(DOMAIN, user, PASSWORD)
    return client


def _metrics(running: RunningServer) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from server.http.metrics import Metrics
    metrics = Metrics(running.server)
    body, _type = metrics.render("")
    return {f"{s.name}{sorted(s.labels.items()) if s.labels else ''}": s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


async def test_eleventh_connection_from_one_address_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with _limited(tmp_path, "trusted = []\nmax_connections_per_ip = 10\n"
                        "max_unauthenticated_per_ip = 0\n") as (running, clients):
        for _ in range(10):
            client = await _connect(running, "127.0.0.2")
            clients.append(client)
            await client.open(DOMAIN)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            eleventh = await _connect(running, "127.0.0.2")
            clients.append(eleventh)
            assert await eleventh.stream_error() == "policy-violation"
            await eleventh.wait_closed()
        lines = [r.getMessage() for r in caplog.records if "policy-violation" in r.getMessage()]
        assert len(lines) == 1 and "peer=127.0.0.2:" in lines[0], lines
        # another address is counted on its own
        other = await _connect(running, "127.0.0.3")
        clients.append(other)
        await other.open(DOMAIN)
        # one of the ten leaves: a place is free again
        await clients[0].close()
        await asyncio.sleep(0.2)
        again = await _connect(running, "127.0.0.2")
        clients.append(again)
        await again.open(DOMAIN)
        values = _metrics(running)
        assert values["presenced_limit_refused_connections_total[('reason', "
                      "'connections-per-ip')]"] == 1
        assert values["presenced_limit_limited_addresses"] == 2


async def test_unauthenticated_connections_per_address(tmp_path: Path) -> None:
    async with _limited(tmp_path, "trusted = []\nmax_unauthenticated_per_ip = 2\n"
                        ) as (running, clients):
        first = await _connect(running, "127.0.0.4")
        clients.append(first)
        await first.authenticate(DOMAIN, "alice", PASSWORD)
        for _ in range(2):
            client = await _connect(running, "127.0.0.4")
            clients.append(client)
            await client.open(DOMAIN)
        third = await _connect(running, "127.0.0.4")
        clients.append(third)
        assert await third.stream_error() == "policy-violation"
        # one logs in: it no longer counts as unauthenticated
        await _tls(clients[1], opened=True)
        assert (await _plain(clients[1], "bob", PASSWORD))[0] == "success"
        fourth = await _connect(running, "127.0.0.4")
        clients.append(fourth)
        await fourth.open(DOMAIN)
        assert _metrics(running)["presenced_limit_refused_connections_total[('reason', "
                                 "'unauthenticated-per-ip')]"] == 1


async def test_brute_force_is_slowed_then_refused_while_the_owner_logs_in(
        tmp_path: Path) -> None:
    async with _limited(tmp_path, "trusted = []\nauth_failures_free = 2\n"
                        "auth_delay = 1.0\nauth_max_delay = 60.0\n") as (running, clients):
        attacker = await _connect(running, "127.0.0.5")
        again = await _connect(running, "127.0.0.5")
        clients += [attacker, again]
        await _tls(attacker)
        await _tls(again)
        # two guesses cost nothing; the third is answered a second late
        for _ in range(2):
            condition, took = await _plain(attacker, "alice", "guess")
            assert condition == "not-authorized" and took < 0.8
        third = asyncio.ensure_future(_plain(attacker, "alice", "guess"))
        await asyncio.sleep(0.2)
        # meanwhile another connection from the same address is refused unheard, even with
        # the right password, while the delay lasts
        condition, took = await _plain(again, "alice", PASSWORD)
        assert condition == "temporary-auth-failure" and took < 0.5
        assert _metrics(running)["presenced_limit_blocked_addresses"] == 1
        condition, took = await third
        assert condition == "not-authorized" and took >= 0.9
        # (three failures end the stream: RFC 6120 §6.4.5)
        assert await attacker.stream_error() == "policy-violation"
        # the owner, from another address, logs in at once
        started = time.monotonic()
        owner = await _login(running, "127.0.0.6", "alice")
        clients.append(owner)
        assert time.monotonic() - started < 2.0
        # wrong passwords for alice from ever new addresses are answered late all the same:
        # the account's failures count too (the owner's login started them again: two free)
        for source, slow in (("127.0.0.7", False), ("127.0.0.14", False), ("127.0.0.15", True)):
            other = await _connect(running, source)
            clients.append(other)
            await _tls(other)
            condition, took = await _plain(other, "alice", "guess")
            assert condition == "not-authorized"
            assert took >= 0.9 if slow else took < 0.8, (source, took)
        values = _metrics(running)
        assert values["presenced_limit_auth_refused_total"] == 1
        assert values["presenced_limit_auth_delayed_total"] == 2


async def _flood(running: RunningServer, source: str, count: int, body: str = "x"
                 ) -> tuple[list[float], list[float]]:
    """alice (from source) sends count messages to bob at once, while carol (from 127.0.0.9)
    pings the server: (bob's arrival times, carol's ping round trips)."""
    bob = await _login(running, "127.0.0.8", "bob")
    carol = await _login(running, "127.0.0.9", "carol")
    alice = await _login(running, source, "alice")
    try:
        for client in (alice, bob, carol):
            await client.send("<presence/>")
        await asyncio.sleep(0.3)
        flood = "".join(f"<message to='bob@{DOMAIN}' id='m{i}' type='chat'><body>{body}</body>"
                        "</message>" for i in range(count))
        started = time.monotonic()
        await alice.send(flood)
        arrivals: list[float] = []
        pings: list[float] = []

        async def receive() -> None:
            while len(arrivals) < count:
                message = await bob.next_of("message", timeout=30)
                assert message.get("id") == f"m{len(arrivals)}"  # in order
                arrivals.append(time.monotonic() - started)

        async def ping() -> None:
            for i in range(10):
                sent = time.monotonic()
                reply = await carol.ask(f"<iq type='get' id='p{i}' to='{DOMAIN}'>"
                                        "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
                assert reply.get("type") == "result"
                pings.append(time.monotonic() - sent)
                await asyncio.sleep(0.2)

        await asyncio.gather(receive(), ping())
        return arrivals, pings
    finally:
        for client in (alice, bob, carol):
            await client.close()


async def test_stanza_flood_is_shaped_and_others_keep_their_latency(tmp_path: Path) -> None:
    running = await _server(tmp_path, "trusted = []\nc2s_read_rate = 0\n"
                            "stanza_rate = 10\nstanza_burst = 10\n")
    try:
        arrivals, pings = await _flood(running, "127.0.0.10", 50)
        # 10 at once (the burst, less what login and presence took), then 10 a second
        assert arrivals[-1] >= 3.5, arrivals
        assert arrivals[-1] < 8.0, arrivals
        late = [t for t in arrivals if t > 1.0]
        rate = (len(late) - 1) / (late[-1] - late[0])
        assert 7.0 <= rate <= 11.5, (rate, arrivals)
        assert max(pings) < 0.5, pings
        assert _metrics(running)["presenced_limit_stanza_pauses_total"] >= 3
    finally:
        await stop_server(running)


async def test_byte_flood_is_shaped_and_others_keep_their_latency(tmp_path: Path) -> None:
    running = await _server(tmp_path, "trusted = []\nstanza_rate = 0\n"
                            "c2s_read_rate = 4000\nc2s_read_burst = 4000\n")
    try:
        # ~200 bytes a message (TLS adds a little): 100 of them are ~20 kB, 4 s past the burst
        arrivals, pings = await _flood(running, "127.0.0.11", 100, "y" * 120)
        assert arrivals[-1] >= 3.0, arrivals
        assert arrivals[-1] < 10.0, arrivals
        first_second = sum(1 for t in arrivals if t < 1.0)
        assert first_second < 50, arrivals  # not all at once
        assert max(pings) < 0.5, pings
        assert _metrics(running)["presenced_limit_read_pauses_total[('kind', 'c2s')]"] >= 3
    finally:
        await stop_server(running)


async def test_trusted_addresses_are_exempt(tmp_path: Path) -> None:
    async with _limited(tmp_path, 'trusted = ["127.0.0.12/32"]\nmax_connections_per_ip = 2\n'
                        "stanza_rate = 5\nstanza_burst = 5\nc2s_read_rate = 1000\n"
                        "c2s_read_burst = 1000\nauth_failures_free = 0\n") as (running, clients):
        for _ in range(4):
            client = await _connect(running, "127.0.0.12")
            clients.append(client)
            await client.open(DOMAIN)
        arrivals, _pings = await _flood(running, "127.0.0.12", 50, "z" * 100)
        assert arrivals[-1] < 2.0, arrivals
        attacker = await _connect(running, "127.0.0.12")
        clients.append(attacker)
        await _tls(attacker)
        for _ in range(2):
            condition, took = await _plain(attacker, "alice", "guess")
            assert condition == "not-authorized" and took < 0.8
        # not trusted: the same configuration refuses the third connection
        for _ in range(2):
            clients.append(await _connect(running, "127.0.0.13"))
            await clients[-1].open(DOMAIN)
        clients.append(await _connect(running, "127.0.0.13"))
        assert await clients[-1].stream_error() == "policy-violation"


async def test_websocket_connections_count_per_address(tmp_path: Path) -> None:
    import aiohttp

    from tests.test_http import insecure_context, start_web, url
    running = await start_web(tmp_path, "[limits]\ntrusted = []\nmax_connections_per_ip = 1\n")
    try:
        async with aiohttp.ClientSession() as session:
            target = url(running, "/xmpp-websocket", "wss")
            first = await session.ws_connect(target, protocols=("xmpp",), ssl=insecure_context())
            second = await session.ws_connect(target, protocols=("xmpp",), ssl=insecure_context())
            opening = await second.receive(timeout=5)  # RFC 7395 §3.6: <open/> first
            assert opening.data.startswith("<open"), opening
            error = await second.receive(timeout=5)
            assert "<policy-violation" in error.data, error
            await first.send_str(f"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' "
                                 f"to='{DOMAIN}' version='1.0'/>")
            opened = await first.receive(timeout=5)
            assert opened.data.startswith("<open"), opened
            await first.close()
            await second.close()
    finally:
        await stop_server(running)


async def test_component_stream_read_rate(tmp_path: Path) -> None:
    import hashlib

    from tests.rawclient import header
    from tests.test_service_hosts import COMPONENT_NS, SECRET, component_server
    limits = "[limits]\ntrusted = []\ncomponent_read_rate = 4000\ncomponent_read_burst = 4000\n"
    async with component_server(tmp_path, limits) as (running, port):
        await running.add_user(f"bob@{DOMAIN}")
        bob = await _login(running, "127.0.0.8", "bob")
        await bob.send("<presence/>")  # available: a message to the bare JID reaches it
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=("127.0.0.16", 0))
        component = RawClient(reader, writer)
        try:
            await component.send(header("bridge.a.test", version=None, xmlns=COMPONENT_NS))
            while not component.stream_attrs:
                await component._read_more(5.0)
            digest = hashlib.sha1((component.stream_attrs["id"] + SECRET).encode()).hexdigest()
            await component.send(f"<handshake>{digest}</handshake>")
            await component.next()
            count = 100  # ~220 bytes each: ~22 kB, 4.5 s past the burst at 4000 bytes/s
            started = time.monotonic()
            await component.send("".join(
                f"<message xmlns='{COMPONENT_NS}' from='x@bridge.a.test' to='bob@{DOMAIN}' "
                f"id='c{i}'><body>{'w' * 120}</body></message>" for i in range(count)))
            for i in range(count):
                message = await bob.next_of("message", timeout=30)
                assert message.get("id") == f"c{i}"
            took = time.monotonic() - started
            assert 3.5 <= took < 12.0, took
            assert _metrics(running)["presenced_limit_read_pauses_total[('kind', "
                                     "'component')]"] >= 3
        finally:
            await component.close()
            await bob.close()


async def _web_flood(tmp_path: Path, send: Any) -> float:
    """alice, logged in by ``send(running, count, body, opened)`` over WebSocket or BOSH (its
    client put in opened, closed here), sends bob messages: seconds until bob had them all,
    in order."""
    opened: list[Any] = []
    from tests.test_http import start_web
    running = await start_web(tmp_path, "[limits]\ntrusted = []\nstanza_rate = 0\n"
                              "c2s_read_rate = 2000\nc2s_read_burst = 2000\n")
    try:
        for user in ("alice", "bob"):
            await running.add_user(f"{user}@{DOMAIN}")
        bob = await _login(running, "127.0.0.8", "bob")
        await bob.send("<presence/>")
        try:
            count = 40  # ~220 bytes each: ~9 kB, 3.5 s past the burst at 2000 bytes/s
            started = time.monotonic()
            sender = asyncio.ensure_future(send(running, count, "v" * 120, opened))
            for i in range(count):
                message = await bob.next_of("message", timeout=30)
                assert message.get("id") == f"w{i}"
            await sender
            return time.monotonic() - started
        finally:
            for client in (bob, *opened):
                await client.close()
    finally:
        await stop_server(running)


def _message(i: int, body: str) -> str:
    return (f"<message xmlns='jabber:client' to='bob@{DOMAIN}' id='w{i}' type='chat'>"
            f"<body>{body}</body></message>")


async def test_websocket_read_rate(tmp_path: Path) -> None:
    from tests.test_http import WSClient, url

    async def send(running: RunningServer, count: int, body: str, opened: list[Any]) -> None:
        client = await WSClient.connect(url(running, "/xmpp-websocket", "wss"))
        opened.append(client)
        await client.login("alice")
        for i in range(count):
            await client.send(_message(i, body))

    took = await _web_flood(tmp_path, send)
    assert 2.5 <= took < 12.0, took


async def test_bosh_read_rate(tmp_path: Path) -> None:
    from tests.test_http import BoshClient, url

    async def send(running: RunningServer, count: int, body: str, opened: list[Any]) -> None:
        client = BoshClient(url(running, "/http-bind"))
        opened.append(client)
        await client.login("alice")
        for start in range(0, count, 5):
            # a ping with them: its result answers the request at once
            await client.post("".join(_message(i, body) for i in range(start, start + 5)) +
                              f"<iq xmlns='jabber:client' type='get' id='p{start}' "
                              f"to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>",
                              timeout=20)

    took = await _web_flood(tmp_path, send)
    assert 2.5 <= took < 12.0, took
