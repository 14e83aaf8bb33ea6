"""Federation between two real presenced servers on their own loopback addresses: SASL EXTERNAL
with a test CA, dialback without one, bounces, and spoofing attempts over raw s2s streams.

The cross-server scenario itself lives in `federation_scenario` so that the interop tests
(tests/test_interop.py) run the very same steps against Prosody and ejabberd.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from bench.peers import PresencedPeer, make_ca, make_certificates
from federation import auth
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.process import free_port, free_ports
from tests.rawclient import CLIENT, STREAMS, RawClient, header
from tests.schema import validate_stream_bytes
from tests.test_presence import next_presence, roster_of, subscribe_both

ONE, TWO = "one.test", "two.test"
HOST_ONE, HOST_TWO = "127.0.0.41", "127.0.0.42"
SERVER_NS = "jabber:server"
DIALBACK = "jabber:server:dialback"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"


# -- the scenario every federation test runs --------------------------------------------------

async def next_stanza(client: RawClient, kind: str, timeout: float = 10.0) -> etree._Element:
    """The next stanza of that kind (presence, message or iq); others are skipped, roster
    pushes acknowledged (a peer's server may wait for that)."""
    own = getattr(client, "jid", "").split("/")[0]
    while True:
        el = await client.next(timeout)
        if el.tag == f"{{{CLIENT}}}iq" and el.get("type") == "set" and el.get("from") in (
                None, "", own):  # a roster push: acknowledge it
            await client.send(f"<iq type='result' id='{el.get('id')}'/>")
            continue
        if el.tag == f"{{{CLIENT}}}{kind}":
            return el


async def next_message(client: RawClient, timeout: float = 10.0) -> etree._Element:
    return await next_stanza(client, "message", timeout)


async def presence_showing(client: RawClient, from_: str, show: str) -> etree._Element:
    """The next available presence from `from_` with that <show/> (earlier ones, e.g. the
    answer to the probe, may still be on their way)."""
    while True:
        update = await next_presence(client, None, from_)
        if update.findtext(f"{{{CLIENT}}}show") == show:
            return update


async def federation_scenario(a: RawClient, b: RawClient, ajid: str, bjid: str) -> None:
    """Two users on two servers: subscriptions both ways, presence both ways, messages both
    ways, and unavailable presence when one leaves (RFC 6121 §3, §4, §5 across servers)."""
    await roster_of(a)
    await roster_of(b)
    await a.send("<presence/>")
    await b.send("<presence/>")
    await subscribe_both(None, a, b, ajid, bjid)  # type: ignore[arg-type]
    await b.send("<presence><show>away</show><status>from afar</status></presence>")
    update = await presence_showing(a, bjid, "away")
    assert update.findtext(f"{{{CLIENT}}}status") == "from afar"
    await a.send("<presence><show>dnd</show></presence>")
    await presence_showing(b, ajid, "dnd")
    await a.send(f"<message to='{bjid}' type='chat' id='m1'><body>hello over s2s</body></message>")
    got = await next_message(b)
    assert got.get("from", "").startswith(ajid + "/")
    assert got.findtext(f"{{{CLIENT}}}body") == "hello over s2s"
    await b.send(f"<message to='{ajid}' type='chat' id='m2'><body>and back</body></message>")
    got = await next_message(a)
    assert got.get("from", "").startswith(bjid + "/")
    assert got.findtext(f"{{{CLIENT}}}body") == "and back"
    # iqs both ways: to the other user's full JID (answered by that client) and to the other
    # server itself (answered by it).
    afull, bfull = a.jid, b.jid  # type: ignore[attr-defined]
    await a.send(f"<iq type='get' to='{bfull}' id='q1'><query xmlns='jabber:iq:version'/></iq>")
    asked = await next_stanza(b, "iq")
    assert asked.get("from") == afull and asked.get("type") == "get"
    await b.send(f"<iq type='result' to='{afull}' id='q1'><query xmlns='jabber:iq:version'>"
                 "<name>raw</name></query></iq>")
    answer = await next_stanza(a, "iq")
    assert (answer.get("type"), answer.get("id"), answer.get("from")) == ("result", "q1", bfull)
    bdomain = bjid.split("@")[1]
    await a.send(f"<iq type='get' to='{bdomain}' id='q2'><ping xmlns='urn:xmpp:ping'/></iq>")
    answer = await next_stanza(a, "iq")
    assert (answer.get("type"), answer.get("id"), answer.get("from")) == ("result", "q2", bdomain)
    await b.send("<presence type='unavailable'/>")
    gone = await next_presence(a, "unavailable", bjid)
    assert gone.get("from", "").startswith(bjid + "/")
    # Back again: b's server probes a's (RFC 6121 §4.3), so b learns a's presence at once.
    await b.send("<presence/>")
    await presence_showing(b, ajid, "dnd")
    await next_presence(a, None, bjid)


async def expect_bounce(client: RawClient, to: str, condition: str | tuple[str, ...],
                        timeout: float = 30.0) -> etree._Element:
    """A message to `to` comes back as an error with the given condition."""
    await client.send(f"<message to='{to}' type='chat' id='bounce1'><body>x</body></message>")
    got = await next_message(client, timeout)
    assert got.get("type") == "error" and got.get("id") == "bounce1", etree.tostring(got)
    conditions = (condition,) if isinstance(condition, str) else condition
    error = got.find(f"{{{CLIENT}}}error")
    assert error is not None
    found = [etree.QName(c).localname for c in error]
    assert any(c in found for c in conditions), found
    return got


# -- two servers ---------------------------------------------------------------------------------
# Modules are per process (module-level state), so the second server is a process of its own.

SECRET_TWO = "two.test's dialback secret, known to the tests"


@dataclass
class Federated:
    one: RunningServer
    two: PresencedPeer
    ports: tuple[int, int]

    async def login_two(self, user: str = "bob", resource: str = "pc") -> RawClient:
        assert self.two.c2s_port is not None
        client = await RawClient.connect(HOST_TWO, self.two.c2s_port)
        client.jid = await client.login(TWO, user, PASSWORD, resource)  # type: ignore[attr-defined]
        return client

    def two_log(self) -> str:
        return self.two.log_file.read_text(errors="replace")


@contextlib.asynccontextmanager
async def federated(tmp: Path, *, certificates: bool, s2s_one: str = "",
                    s2s_two: str = "") -> AsyncIterator[Federated]:
    """one.test in this process on 127.0.0.41, two.test a `presenced serve` on 127.0.0.42,
    routed to each other statically; with certificates from one test CA both trust, or with
    self-signed ones (then dialback)."""
    port_one = free_port(HOST_ONE)
    c2s_two, port_two = free_ports(2, HOST_TWO)
    options: dict[str, object] = {}
    certs_two = ca_file = None
    if certificates:
        ca = make_ca(tmp / "ca")
        ca_file = ca.certificate
        certs_one = make_certificates(tmp / "certs-one", [ONE], ca=ca)
        certs_two = make_certificates(tmp / "certs-two", [TWO], ca=ca)
        options.update(certificate=(certs_one.certificate, certs_one.key), ca_file=ca_file)
    two = PresencedPeer(tmp / "two", host=HOST_TWO, domains=(TWO,), c2s_port=c2s_two,
                        s2s_port=port_two, certificates=certs_two, cafile=ca_file,
                        extra_config=f'[s2s]\nroutes = {{ "{ONE}" = "{HOST_ONE}:{port_one}" }}\n'
                                     f'dialback_secret = "{SECRET_TWO}"\n{s2s_two}')
    two.register("bob", TWO, PASSWORD)
    one = await start_server(
        tmp / "one", f'[s2s]\nroutes = {{ "{TWO}" = "{HOST_TWO}:{port_two}" }}\n{s2s_one}',
        domains=(ONE,), host=HOST_ONE, s2s=f"{HOST_ONE}:{port_one}", **options)
    try:
        await one.add_user(f"alice@{ONE}")
        await two.astart()
        try:
            yield Federated(one, two, (port_one, port_two))
        finally:
            await two.astop()
    finally:
        await stop_server(one)


def methods(running: RunningServer) -> set[str]:
    assert running.server.federation is not None
    return {s.negotiation.method for s in running.server.federation.outbound.values()
            if s.negotiation is not None and s.ready}


@pytest.mark.parametrize("bidi", [True, False], ids=["bidi", "two-streams"])
@pytest.mark.parametrize("certificates", [True, False], ids=["certificates", "dialback"])
async def test_two_servers_federate(tmp_path: Path, certificates: bool, bidi: bool) -> None:
    """SASL EXTERNAL with certificates of a shared CA, else dialback (XEP-0220); over one
    bidirectional connection (XEP-0288) or one connection per direction."""
    async with federated(tmp_path, certificates=certificates,
                         s2s_one="" if bidi else "bidi = false\n") as fed:
        alice = await fed.one.raw_login(f"alice@{ONE}", resource="pc")
        bob = await fed.login_two()
        await federation_scenario(alice, bob, f"alice@{ONE}", f"bob@{TWO}")
        method = "sasl-external" if certificates else "dialback"
        assert methods(fed.one) == {method}
        log = fed.two_log()
        assert f"local={TWO} remote={ONE} method={method} bidi={bidi}" in log
        federation = fed.one.server.federation
        assert federation is not None
        if bidi and certificates:
            # two.test answered over one.test's connection: it opened none of its own.
            assert "direction=out" not in log and not federation.inbound
        elif bidi:
            # It had to connect back to check the dialback key (XEP-0288 §2.2: never on the
            # connection the request came on), but stanzas went over the bidi stream.
            assert "event=s2s-connected direction=out" in log
        else:
            assert f"direction=out local={TWO} remote={ONE} method={method}" in log
            assert federation.inbound


async def test_valid_certificates_required_refuses_dialback(tmp_path: Path) -> None:
    async with federated(tmp_path, certificates=False,
                         s2s_one="require_valid_certificates = true\n") as fed:
        alice = await fed.one.raw_login(f"alice@{ONE}", resource="pc")
        await expect_bounce(alice, f"bob@{TWO}", "remote-server-not-found")


async def test_peer_down_bounces_remote_server_not_found(tmp_path: Path) -> None:
    port = free_port(HOST_TWO)  # nobody listens there
    one = await start_server(tmp_path, f'[s2s]\nroutes = {{ "{TWO}" = "{HOST_TWO}:{port}" }}\n',
                             domains=(ONE,), host=HOST_ONE)
    try:
        await one.add_user(f"alice@{ONE}")
        alice = await one.raw_login(f"alice@{ONE}")
        await expect_bounce(alice, f"bob@{TWO}", "remote-server-not-found")
        # An error is never answered with an error (RFC 6120 §8.3.1): nothing comes back.
        await alice.send(f"<message to='bob@{TWO}' type='error' id='e1'/>")
        await alice.send(f"<iq type='get' id='ping' to='{ONE}'><ping xmlns='urn:xmpp:ping'/></iq>")
        assert (await alice.next()).get("id") == "ping"
    finally:
        await stop_server(one)


async def test_silent_peer_bounces_remote_server_timeout(tmp_path: Path) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Accept, read, never answer. Ending quietly when the loop closes: asyncio logs a
        # cancelled connection task as an error, which the suite's traceback check would
        # take for the server's.
        with contextlib.suppress(asyncio.CancelledError):
            await reader.read()

    silent = await asyncio.start_server(swallow, HOST_TWO, 0)
    port = silent.sockets[0].getsockname()[1]
    one = await start_server(
        tmp_path, f'[s2s]\nnegotiation_timeout = 1\nroutes = {{ "{TWO}" = "{HOST_TWO}:{port}" }}\n',
        domains=(ONE,), host=HOST_ONE)
    try:
        await one.add_user(f"alice@{ONE}")
        await one.add_user(f"dave@{ONE}")
        alice = await one.raw_login(f"alice@{ONE}")
        dave = await one.raw_login(f"dave@{ONE}")
        await alice.send(f"<message to='bob@{TWO}' type='chat' id='bounce1'><body>x</body>"
                         "</message>")
        # A dead peer does not hold up local delivery while its stream hangs.
        await alice.send(f"<message to='{dave.jid}' id='local'><body>meanwhile</body></message>")  # type: ignore[attr-defined]
        assert (await next_message(dave, timeout=0.5)).findtext(f"{{{CLIENT}}}body") == "meanwhile"
        got = await next_message(alice, timeout=10)
        assert got.get("id") == "bounce1" and got.get("type") == "error"
        assert got.find(f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}"
                        "remote-server-timeout") is not None
    finally:
        await stop_server(one)
        silent.close()


@pytest.mark.parametrize("policy", [f'deny = ["{TWO}"]', 'allow = ["three.test"]'])
async def test_denied_domain_gets_not_allowed(tmp_path: Path, policy: str) -> None:
    one = await start_server(tmp_path, f'[s2s]\n{policy}\n', domains=(ONE,), host=HOST_ONE)
    try:
        await one.add_user(f"alice@{ONE}")
        alice = await one.raw_login(f"alice@{ONE}")
        await expect_bounce(alice, f"bob@{TWO}", "not-allowed", timeout=5)
    finally:
        await stop_server(one)


# -- spoofing over raw s2s streams ---------------------------------------------------------------

async def s2s_open(host: str, port: int, to: str, from_: str) -> tuple[RawClient, etree._Element]:
    """A raw s2s stream: header, STARTTLS (no client certificate), header again."""
    raw = await RawClient.connect(host, port)
    extra = f" from='{from_}' xmlns:db='{DIALBACK}'"
    await raw.send(header(to, xmlns=SERVER_NS, extra=extra))
    features = await raw.expect(f"{{{STREAMS}}}features")
    assert features.find(f"{{{TLS_NS}}}starttls") is not None
    await raw.send(f"<starttls xmlns='{TLS_NS}'/>")
    await raw.expect(f"{{{TLS_NS}}}proceed")
    await raw.starttls()
    await raw.send(header(to, xmlns=SERVER_NS, extra=extra))
    features = await raw.expect(f"{{{STREAMS}}}features")
    return raw, features


async def test_forged_dialback_key_is_refused(tmp_path: Path) -> None:
    """An attacker claims to be two.test with a made-up key: one.test asks two.test (the
    authoritative server), which says 'invalid'; stanzas from the stream are refused."""
    async with federated(tmp_path, certificates=False) as fed:
        raw, features = await s2s_open(HOST_ONE, fed.ports[0], ONE, TWO)
        # No valid certificate was shown: EXTERNAL is not offered, dialback is.
        assert features.find("{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms") is None
        assert features.find("{urn:xmpp:features:dialback}dialback") is not None
        await raw.send(f"<db:result xmlns:db='{DIALBACK}' from='{TWO}' to='{ONE}'>"
                       "0123456789abcdef0123456789abcdef</db:result>")
        result = await raw.expect(f"{{{DIALBACK}}}result", timeout=15)
        assert result.get("type") == "invalid"
        # XEP-0220 §2.2.1: and the stream ends; nothing it carried is accepted.
        await raw.wait_closed()
        assert raw.closed
        validate_stream_bytes(bytes(raw.received))


async def test_stanza_from_unauthenticated_domain_is_invalid_from(tmp_path: Path) -> None:
    """A peer authenticated as two.test may not send as three.test (RFC 6120 §4.9.3.9)."""
    async with federated(tmp_path, certificates=False) as fed:
        raw, _features = await s2s_open(HOST_ONE, fed.ports[0], ONE, TWO)
        # A genuine key: computed the way two.test would (XEP-0185), with two.test's secret.
        key = auth.dialback_key(SECRET_TWO.encode(), ONE, TWO, raw.stream_attrs["id"])
        await raw.send(f"<db:result xmlns:db='{DIALBACK}' from='{TWO}' to='{ONE}'>{key}"
                       "</db:result>")
        result = await raw.expect(f"{{{DIALBACK}}}result", timeout=15)
        assert result.get("type") == "valid"
        await raw.send(f"<message xmlns='{SERVER_NS}' from='eve@three.test' to='alice@{ONE}'>"
                       "<body>spoof</body></message>")
        assert await raw.stream_error() == "invalid-from"
        validate_stream_bytes(bytes(raw.received))


async def test_unknown_host_and_missing_tls(tmp_path: Path) -> None:
    async with federated(tmp_path, certificates=False) as fed:
        raw = await RawClient.connect(HOST_ONE, fed.ports[0])
        await raw.send(header("nowhere.test", xmlns=SERVER_NS, extra=f" from='{TWO}'"))
        assert await raw.stream_error() == "host-unknown"
        raw = await RawClient.connect(HOST_ONE, fed.ports[0])
        await raw.send(header(ONE, xmlns=SERVER_NS, extra=f" from='{TWO}' xmlns:db='{DIALBACK}'"))
        await raw.expect(f"{{{STREAMS}}}features")
        await raw.send(f"<db:result xmlns:db='{DIALBACK}' from='{TWO}' to='{ONE}'>k</db:result>")
        assert await raw.stream_error() == "policy-violation"
        validate_stream_bytes(bytes(raw.received))


@pytest.mark.parametrize("certificates", [True, False])
async def test_stream_is_reused_and_idle_closed(tmp_path: Path, certificates: bool) -> None:
    async with federated(tmp_path, certificates=certificates,
                         s2s_one="idle_timeout = 1\n") as fed:
        alice = await fed.one.raw_login(f"alice@{ONE}", resource="pc")
        bob = await fed.login_two()
        for n in range(3):
            await alice.send(f"<message to='bob@{TWO}/pc' id='r{n}'><body>{n}</body></message>")
        for n in range(3):
            assert (await next_message(bob)).findtext(f"{{{CLIENT}}}body") == str(n)
        federation = fed.one.server.federation
        assert federation is not None and len(federation.outbound) == 1
        for _ in range(40):
            if not federation.outbound:
                break
            await asyncio.sleep(0.25)
        assert not federation.outbound  # idle for more than a second: closed
        await alice.send(f"<message to='bob@{TWO}/pc' id='again'><body>again</body></message>")
        assert (await next_message(bob)).findtext(f"{{{CLIENT}}}body") == "again"


async def test_directed_presence_undone_across_servers(tmp_path: Path) -> None:
    """RFC 6121 §4.6: a remote non-subscriber who got directed presence gets unavailable
    when the sender's session ends, even abruptly."""
    async with federated(tmp_path, certificates=False) as fed:
        alice = await fed.one.raw_login(f"alice@{ONE}", resource="pc")
        bob = await fed.login_two()
        await alice.send("<presence/>")
        await bob.send("<presence/>")
        await alice.send(f"<presence to='bob@{TWO}'><status>just for you</status></presence>")
        got = await next_presence(bob, None, f"alice@{ONE}")
        assert got.findtext(f"{{{CLIENT}}}status") == "just for you"
        alice.writer.transport.abort()
        await next_presence(bob, "unavailable", f"alice@{ONE}")


def need_dnsmasq() -> None:
    import shutil

    from tests.conftest import on_ci
    if shutil.which("dnsmasq") is None:
        if on_ci():
            pytest.fail("dnsmasq is missing on CI: .ci/run must apt-get install dnsmasq-base")
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")


@contextlib.contextmanager
def dns_server(tmp: Path, lines: list[str]) -> Iterator[str]:
    """dnsmasq on a loopback address and port of its own, answering only what `lines` say
    (and NXDOMAIN for the rest of .test). Yields "ip:port" for [s2s] nameservers."""
    need_dnsmasq()
    host = "127.0.0.48"
    port = free_port(host)
    conf = tmp / "dnsmasq.conf"
    conf.write_text("\n".join(["no-resolv", "no-hosts", "bind-interfaces",
                               f"listen-address={host}", f"port={port}", "local=/test/",
                               *lines]) + "\n")
    proc = subprocess.Popen(["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}",
                             f"--pid-file={tmp / 'dnsmasq.pid'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # it answers once it has bound its UDP socket
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    break
            time.sleep(0.05)
        yield f"{host}:{port}"
    finally:
        proc.terminate()
        proc.wait(5)


async def test_srv_records_lead_to_the_peer(tmp_path: Path) -> None:
    """No static route: one.test finds two.test by _xmpp-server._tcp SRV (RFC 6120 §3.2.1)
    at a port other than 5269, then its A record, from a DNS server of the test's own."""
    c2s_two, port_two = free_ports(2, HOST_TWO)
    port_one = free_port(HOST_ONE)
    records = [f"address=/{TWO}/{HOST_TWO}",
               f"srv-host=_xmpp-server._tcp.{TWO},{TWO},{port_two},0,5",
               # A lower-priority target that does not answer: tried only after the first.
               f"srv-host=_xmpp-server._tcp.{TWO},{TWO},1,10,5"]
    with dns_server(tmp_path, records) as nameserver:
        two = PresencedPeer(tmp_path / "two", host=HOST_TWO, domains=(TWO,), c2s_port=c2s_two,
                            s2s_port=port_two,
                            extra_config=f'[s2s]\nroutes = {{ "{ONE}" = "{HOST_ONE}:{port_one}" }}\n')
        two.register("bob", TWO, PASSWORD)
        one = await start_server(tmp_path / "one", f'[s2s]\nnameservers = ["{nameserver}"]\n',
                                 domains=(ONE,), host=HOST_ONE, s2s=f"{HOST_ONE}:{port_one}")
        try:
            await one.add_user(f"alice@{ONE}")
            await two.astart()
            try:
                alice = await one.raw_login(f"alice@{ONE}")
                bob = await RawClient.connect(HOST_TWO, c2s_two)
                await bob.login(TWO, "bob", PASSWORD, "pc")
                await alice.send(f"<message to='bob@{TWO}/pc'><body>via SRV</body></message>")
                assert (await next_message(bob)).findtext(f"{{{CLIENT}}}body") == "via SRV"
                # A domain with no records at all: the A fallback fails too: bounced.
                await expect_bounce(alice, "bob@nowhere.test", "remote-server-not-found")
            finally:
                await two.astop()
        finally:
            await stop_server(one)


async def test_direct_tls_found_by_xmpps_server_srv(tmp_path: Path) -> None:
    """XEP-0368: an _xmpps-server SRV record leads to a direct-TLS s2s port (ALPN
    xmpp-server); two.test reaches one.test that way."""
    c2s_two, port_two = free_ports(2, HOST_TWO)
    direct_one = free_port(HOST_ONE)
    records = [f"address=/{ONE}/{HOST_ONE}",
               f"srv-host=_xmpps-server._tcp.{ONE},{ONE},{direct_one},0,5"]
    with dns_server(tmp_path, records) as nameserver:
        two = PresencedPeer(tmp_path / "two", host=HOST_TWO, domains=(TWO,), c2s_port=c2s_two,
                            s2s_port=port_two,
                            extra_config=f'[s2s]\nnameservers = ["{nameserver}"]\n')
        two.register("bob", TWO, PASSWORD)
        one = await start_server(
            tmp_path / "one",
            f'[s2s]\nroutes = {{ "{TWO}" = "{HOST_TWO}:{port_two}" }}\n',
            domains=(ONE,), host=HOST_ONE, s2s_tls=f"{HOST_ONE}:{direct_one}")
        try:
            await one.add_user(f"alice@{ONE}")
            await two.astart()
            try:
                alice = await one.raw_login(f"alice@{ONE}")
                bob = await RawClient.connect(HOST_TWO, c2s_two)
                await bob.login(TWO, "bob", PASSWORD, "pc")
                await bob.send(f"<message to='{alice.jid}'><body>direct</body></message>")  # type: ignore[attr-defined]
                assert (await next_message(alice)).findtext(f"{{{CLIENT}}}body") == "direct"
                assert "direct_tls=True" in two.log_file.read_text()
            finally:
                await two.astop()
        finally:
            await stop_server(one)


async def served_names(host: str, port: int, server_name: str) -> list[str]:
    """The DNS names in the certificate a direct-TLS listener serves for server_name."""
    from cryptography import x509
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                    server_hostname=server_name)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    cert = x509.load_der_x509_certificate(der)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName)


async def test_each_hosted_domain_shows_its_own_certificate(tmp_path: Path) -> None:
    """Two hosted domains with a certificate each ([tls] domain_certificates): each
    authenticates to the peer with SASL EXTERNAL as itself, on a stream of its own."""
    uno = "uno.test"
    port_one = free_port(HOST_ONE)
    c2s_two, port_two = free_ports(2, HOST_TWO)
    ca = make_ca(tmp_path / "ca")
    certs_one = make_certificates(tmp_path / "certs-one", [ONE], ca=ca)
    certs_uno = make_certificates(tmp_path / "certs-uno", [uno], ca=ca)
    certs_two = make_certificates(tmp_path / "certs-two", [TWO], ca=ca)
    two = PresencedPeer(tmp_path / "two", host=HOST_TWO, domains=(TWO,), c2s_port=c2s_two,
                        s2s_port=port_two, certificates=certs_two, cafile=ca.certificate,
                        extra_config=f'[s2s]\nrequire_valid_certificates = true\nroutes = {{ '
                                     f'"{ONE}" = "{HOST_ONE}:{port_one}", '
                                     f'"{uno}" = "{HOST_ONE}:{port_one}" }}\n')
    two.register("bob", TWO, PASSWORD)
    one = await start_server(
        tmp_path / "one", f'[s2s]\nrequire_valid_certificates = true\n'
                          f'routes = {{ "{TWO}" = "{HOST_TWO}:{port_two}" }}\n',
        domains=(ONE, uno), host=HOST_ONE, s2s=f"{HOST_ONE}:{port_one}",
        certificate=(certs_one.certificate, certs_one.key), ca_file=ca.certificate,
        top=f'[tls.domain_certificates]\n"{uno}" = ["{certs_uno.certificate}", '
            f'"{certs_uno.key}"]\n')
    try:
        await one.add_user(f"alice@{ONE}")
        await one.add_user(f"carol@{uno}")
        await two.astart()
        try:
            alice = await one.raw_login(f"alice@{ONE}")
            carol = await one.raw_login(f"carol@{uno}")
            bob = await RawClient.connect(HOST_TWO, c2s_two)
            bob_jid = await bob.login(TWO, "bob", PASSWORD, "pc")
            for sender in (alice, carol):
                await sender.send(f"<message to='{bob_jid}'><body>hi</body></message>")
                assert (await next_message(bob)).get("from") == sender.jid  # type: ignore[attr-defined]
                await bob.send(f"<message to='{sender.jid}'><body>back</body></message>")  # type: ignore[attr-defined]
                assert (await next_message(sender)).findtext(f"{{{CLIENT}}}body") == "back"
            assert methods(one) == {"sasl-external"}
            log = two.log_file.read_text()
            for local in (ONE, uno):
                assert f"local={TWO} remote={local} method=sasl-external" in log
            # Clients get the certificate of the domain they name (SNI) too.
            for name in (ONE, uno):
                assert await served_names(*one.address("c2s_tls"), name) == [name]
        finally:
            await two.astop()
    finally:
        await stop_server(one)
