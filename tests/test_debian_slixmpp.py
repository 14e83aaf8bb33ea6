"""SCRAM with Debian's slixmpp 1.8.3 (poezio 0.14's library), issue 19 item 6.

slixmpp 1.8.3 knows one channel binding, tls-unique, which TLS 1.3 does not have, and ignores
the XEP-0440 list of those we offer (tls-exporter, tls-server-end-point). It picks the -PLUS
mechanisms first (best score first: SCRAM-SHA-256-PLUS, then SCRAM-SHA-1-PLUS) with
`p=tls-unique`, then the plain ones with the `y` flag ("I could bind, I think you cannot").
RFC 5802 §6 makes a server refuse `y` when it offered binding, to catch a man in the middle who
removed the -PLUS mechanisms; but a client that just tried a binding type we lack has shown
that it cannot bind with us, and its `y` is no downgrade. A client that saw no -PLUS at all
and says `y` is still refused.

The wire is reproduced byte for byte from slixmpp 1.8.3's util/sasl/mechanisms.py (SCRAM
process_1/process_2) with a raw client, and Debian's slixmpp itself logs in under
/usr/bin/python3 where it is installed (CI installs python3-slixmpp with poezio).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import PASSWORD, RunningServer, on_ci, start_server, stop_server
from tests.rawclient import SASL_NS, TLS_NS, RawClient

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningServer]:
    server = await start_server(tmp_path)
    await server.add_user("alice@a.test")
    yield server
    await stop_server(server)


class Slixmpp183Scram:
    """slixmpp 1.8.3's SCRAM client (util/sasl/mechanisms.py, class SCRAM), step for step: the
    cnonce is the digits of random.random(), the gs2 header 'p=tls-unique,,' for -PLUS and
    'y,,' otherwise (the channel_binding credential is set on any TLS socket)."""

    def __init__(self, mechanism: str, username: str, password: str, cb_data: bytes) -> None:
        self.plus = mechanism.endswith("-PLUS")
        name = mechanism.removesuffix("-PLUS")[len("SCRAM-"):]
        self.hash = getattr(hashlib, "sha" + name[len("SHA-"):])
        self.username, self.password, self.cb_data = username, password.encode(), cb_data
        self.cnonce = str(random.random())[2:].encode()  # ("%s" % random.random())[2:]
        self.gs2_header = (b"p=tls-unique" if self.plus else b"y") + b",,"
        self.first_bare = b"n=" + username.encode() + b",r=" + self.cnonce
        self.server_signature = b""

    def first(self) -> bytes:
        return self.gs2_header + self.first_bare

    def final(self, challenge: bytes) -> bytes:
        data = dict(item.split(b"=", 1) for item in challenge.split(b","))
        salt, iterations, nonce = base64.b64decode(data[b"s"]), int(data[b"i"]), data[b"r"]
        assert nonce.startswith(self.cnonce)
        cbind_input = self.gs2_header + (self.cb_data if self.plus else b"")
        without_proof = b"c=" + base64.b64encode(cbind_input) + b",r=" + nonce
        salted = hashlib.pbkdf2_hmac(self.hash().name, self.password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", self.hash)
        stored_key = self.hash(client_key).digest()
        auth_message = self.first_bare + b"," + challenge + b"," + without_proof
        signature = hmac.digest(stored_key, auth_message, self.hash)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac.digest(hmac.digest(salted, b"Server Key", self.hash),
                                            auth_message, self.hash)
        return without_proof + b",p=" + base64.b64encode(proof)


async def starttls(running: RunningServer) -> tuple[RawClient, list[str], bytes]:
    """Connect, STARTTLS; the mechanisms offered and the channel's tls-unique data (what
    slixmpp's credentials callback reads with get_channel_binding())."""
    host, port = running.address("c2s")
    client = await RawClient.connect(host, port)
    await client.open("a.test")
    await client.send(f"<starttls xmlns='{TLS_NS}'/>")
    await client.expect(f"{{{TLS_NS}}}proceed")
    await client.starttls()
    features = await client.open("a.test")
    mechanisms = [m.text or "" for m in features.iter(f"{{{SASL_NS}}}mechanism")]
    ssl_object = client.writer.get_extra_info("ssl_object")
    assert ssl_object.version() == "TLSv1.3"
    cb_data = ssl_object.get_channel_binding("tls-unique")
    assert cb_data, "Python gives tls-unique data even under TLS 1.3: slixmpp sends -PLUS"
    return client, mechanisms, cb_data


async def attempt(client: RawClient, scram: Slixmpp183Scram,
                  mechanism: str) -> etree._Element:
    """One <auth/> as slixmpp sends it; the <success/> or <failure/> that ends it."""
    first = base64.b64encode(scram.first()).decode()
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'>{first}</auth>")
    answer = await client.next()
    if answer.tag != f"{{{SASL_NS}}}challenge":
        return answer
    final = base64.b64encode(scram.final(base64.b64decode(answer.text or ""))).decode()
    await client.send(f"<response xmlns='{SASL_NS}'>{final}</response>")
    return await client.next()


def slixmpp_order(offered: list[str]) -> list[str]:
    """slixmpp 1.8.3's sasl.choose(): the best score first; SCRAM-SHA-n scores 60 + the
    hash's place in hashlib's sorted names, -PLUS 10 more; PLAIN 2."""
    names = ["SHA-" + h[3:] for h in sorted(dir(hashlib)) if h.startswith("sha")]
    scores = {"PLAIN": 2}
    for n, name in enumerate(names, 1):
        scores[f"SCRAM-{name}"] = 60 + n
        scores[f"SCRAM-{name}-PLUS"] = 70 + n
    return sorted((m for m in offered if m in scores), key=lambda m: -scores[m])


async def test_slixmpp_183_sequence_logs_in_with_scram(running: RunningServer) -> None:
    client, offered, cb_data = await starttls(running)
    order = slixmpp_order(offered)
    assert order[:3] == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256"]
    outcomes = []
    for mechanism in order[:3]:
        scram = Slixmpp183Scram(mechanism, "alice", PASSWORD, cb_data)
        answer = await attempt(client, scram, mechanism)
        outcomes.append(etree.QName(answer).localname)
        if outcomes[-1] == "success":
            verifier = dict(item.split(b"=", 1) for item in
                            base64.b64decode(answer.text or "").split(b","))[b"v"]
            assert base64.b64decode(verifier) == scram.server_signature
            break
    # Two -PLUS tries with tls-unique fail (we have no such binding), then 'y' is accepted.
    assert outcomes == ["failure", "failure", "success"]
    client.restart()
    features = await client.open("a.test")
    assert features.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None


async def test_y_without_a_failed_binding_try_is_still_a_downgrade(
        running: RunningServer) -> None:
    """A client that saw no -PLUS (stripped on the way) says 'y' at once: refused (RFC 5802
    §6), and so after a -PLUS try that failed for another reason than the binding type."""
    client, _offered, cb_data = await starttls(running)
    answer = await attempt(client, Slixmpp183Scram("SCRAM-SHA-256", "alice", PASSWORD, cb_data),
                           "SCRAM-SHA-256")
    assert answer.tag == f"{{{SASL_NS}}}failure"
    assert answer.find(f"{{{SASL_NS}}}not-authorized") is not None
    assert "downgrade" in (answer.findtext(f"{{{SASL_NS}}}text") or "")
    # A -PLUS try with a binding we do have (tls-server-end-point) but the wrong data...
    wrong = Slixmpp183Scram("SCRAM-SHA-256-PLUS", "alice", PASSWORD, b"not the channel")
    wrong.gs2_header = b"p=tls-server-end-point,,"
    answer = await attempt(client, wrong, "SCRAM-SHA-256-PLUS")
    assert answer.tag == f"{{{SASL_NS}}}failure"
    # ...shows no inability to bind: 'y' is still a downgrade.
    answer = await attempt(client, Slixmpp183Scram("SCRAM-SHA-1", "alice", PASSWORD, cb_data),
                           "SCRAM-SHA-1")
    assert answer.tag == f"{{{SASL_NS}}}failure"
    assert "downgrade" in (answer.findtext(f"{{{SASL_NS}}}text") or "")


# -- Debian's slixmpp itself -------------------------------------------------------------------

LOGIN = """
import asyncio, ssl, sys
import slixmpp
jid, password, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
xmpp = slixmpp.ClientXMPP(jid, password)
xmpp.ssl_context.check_hostname = False
xmpp.ssl_context.verify_mode = ssl.CERT_NONE
mechanisms = xmpp.plugin["feature_mechanisms"]
tried = []
send_auth = mechanisms._send_auth
def counted():
    result = send_auth()
    tried.append(mechanisms.mech.name)
    return result
mechanisms._send_auth = counted
loop = asyncio.get_event_loop()
done = loop.create_future()
def finish(outcome):
    if not done.done():
        done.set_result(outcome)
xmpp.add_event_handler("session_start", lambda _e: finish("session"))
xmpp.add_event_handler("failed_all_auth", lambda _e: finish("failed"))
xmpp.add_event_handler("disconnected", lambda _e: finish("disconnected"))
xmpp.connect((host, port))
outcome = loop.run_until_complete(asyncio.wait_for(done, 20))
print("version=" + slixmpp.__version__)
print("outcome=" + outcome)
print("tried=" + ",".join(tried))
"""


def debian_slixmpp_version() -> str | None:
    if SYSTEM_PYTHON is None:
        return None
    found = subprocess.run([SYSTEM_PYTHON, "-c", "import slixmpp; print(slixmpp.__version__)"],
                           capture_output=True, text=True, cwd="/", check=False)
    return found.stdout.strip() if found.returncode == 0 else None


@pytest.mark.skipif(not on_ci() and not (debian_slixmpp_version() or "").startswith("1.8"),
                    reason="Debian's python3-slixmpp 1.8 is not installed (CI installs it)")
async def test_debian_slixmpp_logs_in_with_scram(running: RunningServer) -> None:
    assert SYSTEM_PYTHON is not None
    host, port = running.address("c2s")
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", LOGIN, "alice@a.test", PASSWORD, host, str(port), cwd="/",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    report = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    assert report.get("version", "").startswith("1.8"), out.decode()
    assert report.get("outcome") == "session", out.decode()
    tried = report["tried"].split(",")
    assert tried[-1].startswith("SCRAM-") and not tried[-1].endswith("-PLUS"), tried
    assert "PLAIN" not in tried
