"""External Service Discovery (XEP-0215) with a real coturn: the credentials a slixmpp client
gets from presenced open a TURN allocation (turnutils_uclient), a forged or an expired one
does not; <credentials/> (§3.2); only accounts of our domains get them; nothing is advertised
without [turn]."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import slixmpp
from slixmpp.xmlstream import ET

from server.config import ConfigErrors, load_config
from server.modules import config_sections
from tests.conftest import RunningServer, start_server, stop_server
from tests.process import free_ports
from tests.rawclient import condition
from tests.test_service_hosts import two_in_process

NS = "urn:xmpp:extdisco:2"
TURN_HOST = "127.0.0.215"  # coturn's own loopback address, apart from the XMPP servers'
SECRET = "a-coturn-static-auth-secret"

pytestmark = pytest.mark.skipif(shutil.which("turnserver") is None
                                or shutil.which("turnutils_uclient") is None,
                                reason="coturn is not installed (Debian package coturn)")


@dataclass
class Coturn:
    host: str
    port: int
    secret: str

    def allocate(self, username: str, password: str) -> tuple[int, str]:
        """A TURN allocation (RFC 5766 §6) with these credentials: (exit status, output)."""
        (peer_port,) = free_ports(1, self.host)
        done = subprocess.run(
            ["turnutils_uclient", "-u", username, "-w", password, "-p", str(self.port),
             "-n", "1", "-m", "1", "-l", "64", "-e", self.host, "-r", str(peer_port),
             "-y", self.host],
            capture_output=True, text=True, timeout=30, check=False)
        return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """A private coturn on loopback with use-auth-secret (INTEROP.md "coturn"), stopped after."""
    folder = tmp_path_factory.mktemp("coturn")
    (folder / "turnserver.conf").write_text("")  # not the system's /etc/turnserver.conf
    (port,) = free_ports(1, TURN_HOST)
    relay = free_ports(1, TURN_HOST)[0]
    proc = subprocess.Popen(
        ["turnserver", "-c", str(folder / "turnserver.conf"), "-L", TURN_HOST,
         "-p", str(port), "--relay-ip", TURN_HOST,
         "--min-port", str(relay), "--max-port", str(relay + 20),
         "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm=a.test",
         "--no-tls", "--no-dtls", "--no-cli", "--allow-loopback-peers",
         f"--log-file={folder / 'turn.log'}", "--simple-log", f"--pidfile={folder / 'pid'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:  # ready when its TCP listener accepts
            try:
                socket.create_connection((TURN_HOST, port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"coturn did not start: {_read(folder / 'turn.log')[-2000:]}")
                time.sleep(0.1)
        yield Coturn(TURN_HOST, port, SECRET)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def turn_table(coturn: Coturn, extra: str = "") -> str:
    return (f'[turn]\nhost = "{coturn.host}"\nport = {coturn.port}\nsecret = "{coturn.secret}"\n'
            + extra)


@pytest.fixture
async def turn_server(tmp_path: Path, coturn: Coturn) -> AsyncIterator[RunningServer]:
    running = await start_server(tmp_path, turn_table(coturn))
    try:
        yield running
    finally:
        await stop_server(running)


async def ask(xmpp: slixmpp.ClientXMPP, to: str, payload: str) -> ET.Element:
    """An iq get from slixmpp; the answer's payload (errors raise IqError)."""
    iq = xmpp.make_iq_get(ito=to)
    iq.append(ET.fromstring(payload))
    answer = await iq.send(timeout=10)
    return answer.xml


def services_of(answer: ET.Element, tag: str = "services") -> list[dict[str, str]]:
    container = answer.find(f"{{{NS}}}{tag}")
    assert container is not None, ET.tostring(answer)
    return [dict(s.attrib) for s in container.findall(f"{{{NS}}}service")]


# -- credentials that coturn accepts --------------------------------------------------------------

async def test_credentials_from_services_open_a_turn_allocation(
        turn_server: RunningServer, coturn: Coturn) -> None:
    await turn_server.add_user("alice@a.test")
    alice = await turn_server.client("alice@a.test")
    info = await ask(alice, "a.test", "<query xmlns='http://jabber.org/protocol/disco#info'/>")
    assert NS in {f.get("var") for f in info.iter("{http://jabber.org/protocol/disco#info}feature")}
    before = int(time.time())
    services = services_of(await ask(alice, "a.test", f"<services xmlns='{NS}'/>"))
    # STUN and TURN on coturn's port, over UDP and TCP (the default transports).
    assert sorted((s["type"], s["transport"]) for s in services) == [
        ("stun", "tcp"), ("stun", "udp"), ("turn", "tcp"), ("turn", "udp")]
    assert all((s["host"], s["port"]) == (coturn.host, str(coturn.port)) for s in services)
    assert all("username" not in s for s in services if s["type"] == "stun")
    turn = [s for s in services if s["type"] == "turn"]
    assert all(s["restricted"] == "1" for s in turn)
    # TURN REST API: username = expiry:user, password = base64(HMAC-SHA1(secret, username)).
    expiry_text, _, user = turn[0]["username"].partition(":")
    assert user == "alice@a.test"
    assert before + 86400 <= int(expiry_text) <= int(time.time()) + 86400
    assert turn[0]["expires"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                               time.gmtime(int(expiry_text)))
    status, output = await asyncio.to_thread(coturn.allocate, turn[0]["username"],
                                             turn[0]["password"])
    assert status == 0, output
    # A forged password (right form, wrong secret) is refused by coturn.
    forged = base64.b64encode(hmac.new(b"not the secret", turn[0]["username"].encode(),
                                       hashlib.sha1).digest()).decode()
    status, output = await asyncio.to_thread(coturn.allocate, turn[0]["username"], forged)
    assert status != 0 and "Cannot complete Allocation" in output, output


async def test_credentials_request_and_expiry(tmp_path: Path, coturn: Coturn) -> None:
    """§3.2 <credentials/>; with ttl = 1 the credentials stop working a second later."""
    running = await start_server(tmp_path, turn_table(coturn, "ttl = 1\ntransports = ['udp']\n"))
    try:
        await running.add_user("alice@a.test")
        alice = await running.client("alice@a.test")
        answer = await ask(alice, "a.test", f"<credentials xmlns='{NS}'><service host="
                                            f"'{coturn.host}' type='turn'/></credentials>")
        (service,) = services_of(answer, "credentials")
        assert (service["type"], service["transport"], service["restricted"]) == (
            "turn", "udp", "1")
        assert int(service["username"].split(":")[0]) <= int(time.time()) + 1
        status, output = await asyncio.to_thread(coturn.allocate, service["username"],
                                                 service["password"])
        assert status == 0, output
        await asyncio.sleep(2.2)
        status, output = await asyncio.to_thread(coturn.allocate, service["username"],
                                                 service["password"])
        assert status != 0, "coturn accepted expired credentials"
        # A port that is not coturn's: nothing matches.
        raw = await running.raw_login("alice@a.test")
        for payload, expected in [
                (f"<service host='{coturn.host}' type='turn' port='{coturn.port + 1}'/>",
                 "item-not-found"),
                ("<service host='elsewhere.example' type='turn'/>", "item-not-found"),
                (f"<service host='{coturn.host}' type='stun'/>", "item-not-found"),  # no creds
                (f"<service host='{coturn.host}' type='turn' port='²'/>", "bad-request"),
                (f"<service host='{coturn.host}'/>", "bad-request"),
                ("", "bad-request")]:
            reply = await raw.ask(f"<iq type='get' to='a.test' id='c'><credentials "
                                  f"xmlns='{NS}'>{payload}</credentials></iq>")
            assert condition(reply) == expected, payload
        # <services type='stun'/>: only those, without credentials (§3.1.2).
        reply = await raw.ask(f"<iq type='get' to='a.test' id='s'><services xmlns='{NS}' "
                              "type='stun'/></iq>")
        assert [(s["type"], "username" in s) for s in services_of(reply)] == [("stun", False)]
    finally:
        await stop_server(running)


async def test_static_services_are_listed(tmp_path: Path, coturn: Coturn) -> None:
    running = await start_server(tmp_path, f"""\
        [turn]
        services = [
          {{ type = "stun", host = "stun.example.org", port = 3478 }},
          {{ type = "turns", host = "{coturn.host}", port = 5349, secret = "{coturn.secret}", name = "TLS relay" }},
          {{ type = "turn", host = "relay.example.org", port = 3478, transport = "tcp", username = "fixed", password = "pass" }},
        ]
        """)
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        reply = await alice.ask(f"<iq type='get' to='a.test' id='s'><services xmlns='{NS}'/></iq>")
        stun, turns, turn = services_of(reply)
        assert stun == {"type": "stun", "host": "stun.example.org", "port": "3478",
                        "transport": "udp"}
        assert (turns["transport"], turns["name"], turns["restricted"]) == (
            "tcp", "TLS relay", "1")
        assert turns["password"] == base64.b64encode(hmac.new(
            coturn.secret.encode(), turns["username"].encode(), hashlib.sha1).digest()).decode()
        assert (turn["username"], turn["password"], turn["restricted"]) == ("fixed", "pass", "1")
    finally:
        await stop_server(running)


# -- who gets them, and when nothing is configured ----------------------------------------------

async def test_users_of_other_servers_get_nothing(tmp_path: Path, coturn: Coturn) -> None:
    async with two_in_process(tmp_path, two_extra=turn_table(coturn)) as (one, two):
        await one.add_user("mallory@one.test")
        await two.add_user("bob@two.test")
        mallory = await one.raw_login("mallory@one.test")
        for payload in (f"<services xmlns='{NS}'/>",
                        f"<credentials xmlns='{NS}'><service host='{coturn.host}' "
                        "type='turn'/></credentials>"):
            reply = await mallory.ask(f"<iq type='get' to='two.test' id='x'>{payload}</iq>",
                                      skip_others=True)
            assert condition(reply) == "forbidden"
        bob = await two.raw_login("bob@two.test")
        reply = await bob.ask(f"<iq type='get' to='two.test' id='y'><services xmlns='{NS}'/></iq>")
        assert len(services_of(reply)) == 4


async def test_without_turn_nothing_is_advertised(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    alice = await server.raw_login("alice@a.test")
    info = await alice.ask("<iq type='get' to='a.test' id='i'>"
                           "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    assert NS not in {f.get("var") for f in
                      info.iter("{http://jabber.org/protocol/disco#info}feature")}
    reply = await alice.ask(f"<iq type='get' to='a.test' id='s'><services xmlns='{NS}'/></iq>")
    assert condition(reply) == "service-unavailable"


async def test_without_a_secret_only_stun(tmp_path: Path) -> None:
    running = await start_server(tmp_path, '[turn]\nhost = "stun.a.test"\ntransports = ["udp"]\n')
    try:
        await running.add_user("alice@a.test")
        alice = await running.raw_login("alice@a.test")
        reply = await alice.ask(f"<iq type='get' to='a.test' id='s'><services xmlns='{NS}'/></iq>")
        assert services_of(reply) == [{"type": "stun", "host": "stun.a.test", "port": "3478",
                                       "transport": "udp"}]
        reply = await alice.ask(f"<iq type='get' to='a.test' id='c'><credentials xmlns='{NS}'>"
                                "<service host='stun.a.test' type='turn'/></credentials></iq>")
        assert condition(reply) == "item-not-found"
    finally:
        await stop_server(running)


@pytest.mark.parametrize(("table", "key", "problem"), [
    ('secret = "s"', "turn.host", "missing"),
    ('host = "turn.example.org"\nsecret = "s"\ntransports = ["sctp"]', "turn.transports", None),
    ('services = [{ type = "ftp", host = "h", port = 21 }]', "turn.services", "type must be"),
    ('services = [{ type = "turn", host = "h", port = 0 }]', "turn.services", "port must be"),
    ('services = [{ type = "turn", host = "h", port = 1, username = "u" }]', "turn.services",
     "together"),
])
def test_bad_turn_settings_are_named(tmp_path: Path, table: str, key: str,
                                     problem: str | None) -> None:
    path = tmp_path / "presenced.toml"
    path.write_text(f"[turn]\n{table}\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(path, config_sections())
    (error,) = info.value.errors
    assert error.key == key
    if problem:
        assert problem in str(error), str(error)
