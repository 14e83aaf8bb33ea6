"""Service hosts (a domain of its own: echo.<domain>, an external component's domain), external
components (XEP-0114) from slixmpp and raw bytes, and two servers federating in one process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import slixmpp

from tests.conftest import RunningServer, start_server, stop_server
from tests.process import free_ports
from tests.rawclient import CLIENT, RawClient, condition, header
from tests.test_federation import federation_scenario, next_message, next_stanza

COMPONENT_NS = "jabber:component:accept"
SECRET = "a component secret"
ECHO = "[echo]\nenabled = true\n"


@pytest.fixture
async def echo_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, ECHO)
    try:
        yield running
    finally:
        await stop_server(running)


# -- a service host: echo.a.test ----------------------------------------------------------------

async def test_service_is_listed_and_answers_for_its_domain(echo_server: RunningServer) -> None:
    await echo_server.add_user("alice@a.test")
    alice = await echo_server.raw_login("alice@a.test")
    items = await alice.ask("<iq type='get' to='a.test' id='i1'>"
                            "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
    listed = [i.get("jid") for i in items.iter("{http://jabber.org/protocol/disco#items}item")]
    # Every service of a.test (MUC and pubsub are on by default), and nothing of b.test's.
    assert sorted(listed) == ["echo.a.test", "muc.a.test", "pubsub.a.test"]
    # b.test has its own echo service, listed there and not here.
    items = await alice.ask("<iq type='get' to='b.test' id='i2'>"
                            "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
    assert sorted(i.get("jid") for i in items.iter(
        "{http://jabber.org/protocol/disco#items}item")) == [
        "echo.b.test", "muc.b.test", "pubsub.b.test"]
    info = await alice.ask("<iq type='get' to='echo.a.test' id='i3'>"
                           "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    assert info.get("type") == "result" and info.get("from") == "echo.a.test"
    identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None
    assert (identity.get("category"), identity.get("type")) == ("component", "generic")
    features = {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert "urn:xmpp:ping" in features
    # The user domain's own identity is unchanged: a service is not the server.
    info = await alice.ask("<iq type='get' to='a.test' id='i4'>"
                           "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    identity = info.find(".//{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None and identity.get("category") == "server"
    pong = await alice.ask("<iq type='get' to='echo.a.test' id='p1'>"
                           "<ping xmlns='urn:xmpp:ping'/></iq>")
    assert (pong.get("type"), pong.get("from")) == ("result", "echo.a.test")
    # Bare and full JIDs at the service reach it too.
    await alice.send("<message to='room@echo.a.test/nick' type='chat' id='m1'>"
                     "<body>hello service</body></message>")
    echo = await alice.next_of("message")
    assert echo.get("from") == "room@echo.a.test/nick"
    assert echo.findtext(f"{{{CLIENT}}}body") == "hello service"
    # What the service does not handle: service-unavailable (RFC 6120 §8.3.3.19).
    other = await alice.ask("<iq type='get' to='echo.a.test' id='v1'>"
                            "<query xmlns='jabber:iq:version'/></iq>")
    assert condition(other) == "service-unavailable"


async def test_services_are_off_unless_enabled(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        items = await alice.ask("<iq type='get' to='a.test' id='i1'>"
                                "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
        assert "echo.a.test" not in [i.get("jid") for i in items[0]]
        # Not ours, so federation is asked (and finds no such server here).
        await alice.send("<message to='echo.a.test' type='chat' id='m1'><body>x</body></message>")
        bounce = await alice.next_of("message", timeout=30)
        assert condition(bounce) in ("remote-server-not-found", "remote-server-timeout")
    finally:
        await stop_server(running)


# -- external components (XEP-0114) -------------------------------------------------------------

@contextlib.asynccontextmanager
async def component_server(tmp: Path, extra: str = "") -> AsyncIterator[tuple[RunningServer, int]]:
    (port,) = free_ports(1, "127.0.0.1")
    running = await start_server(
        tmp, f'[components]\n"bridge.a.test" = {{ secret = "{SECRET}" }}\n{extra}',
        listen_extra=f'component = ["127.0.0.1:{port}"]')
    try:
        yield running, running.address("component")[1]
    finally:
        await stop_server(running)


async def raw_component(port: int, domain: str = "bridge.a.test",
                        secret: str = SECRET) -> tuple[RawClient, str]:
    """Opens a component stream and sends the handshake; returns (client, stream id)."""
    raw = await RawClient.connect("127.0.0.1", port)
    await raw.send(header(domain, version=None, xmlns=COMPONENT_NS))
    stream_id = await _stream_id(raw)
    digest = hashlib.sha1((stream_id + secret).encode()).hexdigest()
    await raw.send(f"<handshake>{digest}</handshake>")
    return raw, stream_id


async def _stream_id(raw: RawClient) -> str:
    for _ in range(50):
        if raw.stream_attrs:
            return raw.stream_attrs["id"]
        await raw._read_more(5.0)
    raise AssertionError("no stream header")


async def test_slixmpp_component_sends_and_receives(tmp_path: Path) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    async with component_server(tmp_path) as (running, port):
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        await alice.send("<presence/>")
        component = slixmpp.ComponentXMPP("bridge.a.test", SECRET, "127.0.0.1", port)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        received: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        component.add_event_handler("session_start", lambda _e: started.set_result(None))
        component.add_event_handler("message", received.put_nowait)
        component.connect()
        try:
            await asyncio.wait_for(started, 10)
            # A user writes to a JID at the component: the component gets it, 'from' stamped.
            await alice.send("<message to='irc-user@bridge.a.test' type='chat' id='c1'>"
                             "<body>to the bridge</body></message>")
            got = await asyncio.wait_for(received.get(), 10)
            assert str(got["from"]).startswith("alice@a.test/")
            assert str(got["to"]) == "irc-user@bridge.a.test"
            assert got["body"] == "to the bridge"
            # The component writes to the user, from a JID of its domain.
            component.send_message(mto="alice@a.test", mfrom="irc-user@bridge.a.test",
                                   mbody="from the bridge", mtype="chat")
            reply = await next_message(alice)
            assert reply.get("from") == "irc-user@bridge.a.test"
            assert reply.findtext(f"{{{CLIENT}}}body") == "from the bridge"
            # The component is a service of a.test: disco#items lists it.
            items = await alice.ask("<iq type='get' to='a.test' id='i1'>"
                                    "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
            assert "bridge.a.test" in [i.get("jid") for i in items.iter(
                "{http://jabber.org/protocol/disco#items}item")]
        finally:
            component.disconnect()
        # Gone: stanzas for it get an error, they are not sent over federation.
        for _ in range(50):
            if not running.server.components or not running.server.components.connected:
                break
            await asyncio.sleep(0.05)
        await alice.send("<message to='irc-user@bridge.a.test' type='chat' id='c2'>"
                         "<body>anyone?</body></message>")
        bounce = await next_message(alice)
        assert bounce.get("id") == "c2" and condition(bounce) == "service-unavailable"


async def test_component_handshake_and_addressing_errors(tmp_path: Path) -> None:
    async with component_server(tmp_path) as (_running, port):
        # Wrong secret: not-authorized (XEP-0114 §3).
        raw, _ = await raw_component(port, secret="not the secret")
        assert await raw.stream_error() == "not-authorized"
        # A domain that is not configured: host-unknown.
        raw, _ = await raw_component(port, domain="other.a.test")
        assert await raw.stream_error() == "host-unknown"
        # Right secret: <handshake/>, then the component may only send from its domain.
        raw, _ = await raw_component(port)
        done = await raw.next()
        assert done.tag == f"{{{COMPONENT_NS}}}handshake" and len(done) == 0
        # A second connection for the same domain is refused while the first is up.
        second, _ = await raw_component(port)
        assert await second.stream_error() == "conflict"
        await raw.send(f"<message xmlns='{COMPONENT_NS}' from='x@a.test' to='alice@a.test'>"
                       "<body>spoofed</body></message>")
        assert await raw.stream_error() == "invalid-from"
        raw, _ = await raw_component(port)
        await raw.next()
        await raw.send(f"<message xmlns='{COMPONENT_NS}' to='alice@a.test'><body>x</body>"
                       "</message>")
        assert await raw.stream_error() == "improper-addressing"
        # A component's iq to a local account that does not exist gets the usual error back,
        # in the component's namespace.
        raw, _ = await raw_component(port)
        await raw.next()
        await raw.send(f"<iq xmlns='{COMPONENT_NS}' type='get' id='q1' from='bridge.a.test' "
                       "to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
        answer = await raw.next()
        assert answer.tag == f"{{{COMPONENT_NS}}}iq"
        assert (answer.get("type"), answer.get("to")) == ("result", "bridge.a.test")


def test_component_domain_may_not_be_a_user_domain(tmp_path: Path) -> None:
    from server.config import ConfigErrors, load_config
    path = tmp_path / "c.toml"
    path.write_text('domains = ["a.test"]\n[components]\n"a.test" = { secret = "12345678" }\n')
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    assert 'c.toml:3: components: "a.test" is also in domains' in str(caught.value)


# -- two servers in one process ------------------------------------------------------------------

def _routes(address: str, domain: str, names: tuple[str, ...]) -> str:
    """[s2s] routes to a server: its user domain, its default services and the names given."""
    targets = (domain, f"muc.{domain}", f"pubsub.{domain}", *names)
    return "[s2s]\nroutes = { " + ", ".join(f'"{t}" = "{address}"' for t in targets) + " }\n"


@contextlib.asynccontextmanager
async def two_in_process(tmp: Path, *, one_extra: str = "", two_extra: str = "",
                         one_names: tuple[str, ...] = (), two_names: tuple[str, ...] = (),
                         one_listen: str = "",
                         ) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """one.test on 127.0.0.51 and two.test on 127.0.0.52, both Server objects of this process,
    each routed to the other's domains (its user domain, default services, and one_names /
    two_names: service or component domains of one or of two); dialback, self-signed
    certificates. one_listen: more [listen] keys of one.test (with its ports, see ports)."""
    (port_one,) = free_ports(1, "127.0.0.51")
    (port_two,) = free_ports(1, "127.0.0.52")
    one = await start_server(
        tmp / "one", _routes(f"127.0.0.52:{port_two}", "two.test", two_names) + one_extra,
        domains=("one.test",), host="127.0.0.51", s2s=f"127.0.0.51:{port_one}",
        listen_extra=one_listen)
    try:
        two = await start_server(
            tmp / "two", _routes(f"127.0.0.51:{port_one}", "one.test", one_names) + two_extra,
            domains=("two.test",), host="127.0.0.52", s2s=f"127.0.0.52:{port_two}")
        try:
            yield one, two
        finally:
            await stop_server(two)
    finally:
        await stop_server(one)


async def test_two_servers_in_one_process_federate(tmp_path: Path) -> None:
    (component_port,) = free_ports(1, "127.0.0.51")
    async with two_in_process(
            tmp_path, two_extra=ECHO, two_names=("echo.two.test",),
            one_extra=f'[components]\n"bridge.one.test" = {{ secret = "{SECRET}" }}\n',
            one_names=("bridge.one.test",),
            one_listen=f'component = ["127.0.0.51:{component_port}"]') as (one, two):
        await one.add_user("alice@one.test")
        await two.add_user("bob@two.test")
        alice = await one.raw_login("alice@one.test", resource="pc")
        bob = await two.raw_login("bob@two.test", resource="pc")
        await federation_scenario(alice, bob, "alice@one.test", "bob@two.test")
        # A service host of two.test answers over federation, from its own domain.
        await alice.send("<iq type='get' to='echo.two.test' id='p1'>"
                         "<ping xmlns='urn:xmpp:ping'/></iq>")
        pong = await next_stanza(alice, "iq")
        assert (pong.get("type"), pong.get("from"), pong.get("id")) == (
            "result", "echo.two.test", "p1")
        await alice.send("<message to='echo.two.test' type='chat' id='e1'>"
                         "<body>echo across</body></message>")
        echo = await next_message(alice)
        assert echo.get("from") == "echo.two.test"
        assert echo.findtext(f"{{{CLIENT}}}body") == "echo across"
        # Each server has its own modules: state of one is not the other's.
        assert one.server.modules["roster"] is not two.server.modules["roster"]
        # An external component of one.test talks to a user of two.test over federation.
        logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
        component = slixmpp.ComponentXMPP("bridge.one.test", SECRET, "127.0.0.51",
                                          component_port)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        received: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        component.add_event_handler("session_start", lambda _e: started.set_result(None))
        component.add_event_handler("message", received.put_nowait)
        component.connect()
        try:
            await asyncio.wait_for(started, 10)
            component.send_message(mto="bob@two.test", mfrom="irc-user@bridge.one.test",
                                   mbody="bridged", mtype="chat")
            got = await next_message(bob)
            assert got.get("from") == "irc-user@bridge.one.test"
            assert got.findtext(f"{{{CLIENT}}}body") == "bridged"
            await bob.send("<message to='irc-user@bridge.one.test' type='chat'>"
                           "<body>and back</body></message>")
            back = await asyncio.wait_for(received.get(), 10)
            assert str(back["from"]).startswith("bob@two.test/") and back["body"] == "and back"
        finally:
            component.disconnect()


# -- certificates name the service domains ------------------------------------------------------

def test_certificates_cover_service_domains(tmp_path: Path) -> None:
    """The generated certificate names every service domain (peers check it over federation);
    `presenced check` warns when a configured certificate does not."""
    from server.certs import certificate_names, ensure_certificate, generate_self_signed
    from server.config import load_config
    from tests.test_cli import presenced

    path = tmp_path / "generated.toml"
    path.write_text(f'domains = ["a.test"]\ndata_dir = "{tmp_path / "data"}"\n'
                    '[components]\n"bridge.a.test" = { secret = "12345678" }\n[echo]\n'
                    'enabled = true\n')
    config = load_config(path)
    assert set(config.local_domains) == {"a.test", "echo.a.test", "muc.a.test", "pubsub.a.test",
                                         "bridge.a.test"}
    assert config.local_domains[0] == "a.test"
    # An older generated certificate without the services is made again.
    generate_self_signed(["a.test"], config.tls.certificate, config.tls.key)
    ensure_certificate(config)
    from cryptography import x509
    leaf = x509.load_pem_x509_certificate(config.tls.certificate.read_bytes())
    assert set(certificate_names(leaf)) >= {"a.test", "echo.a.test", "bridge.a.test"}
    # A configured certificate for the user domain alone: check names the service domain.
    cert, key = tmp_path / "own.pem", tmp_path / "own.key"
    generate_self_signed(["a.test"], cert, key)
    path = tmp_path / "configured.toml"
    path.write_text(f'domains = ["a.test"]\ndata_dir = "{tmp_path / "data2"}"\n[echo]\n'
                    f'enabled = true\n[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')
    result = presenced(tmp_path, "check", "--config", str(path))
    assert "is not for echo.a.test" in result.out, result.out + result.err
