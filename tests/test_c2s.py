"""c2s over real sockets: negotiation, errors for bad input, stanzas, routing basics."""

from __future__ import annotations

import asyncio
import base64
import re
from datetime import UTC, datetime

import pytest
from lxml import etree

from tests.conftest import PASSWORD, RunningServer
from tests.rawclient import BIND_NS, CLIENT, SASL_NS, STREAMS, TLS_NS, RawClient, header
from tests.schema import validate_stream_bytes

FEATURES = f"{{{STREAMS}}}features"


async def features_of(client: RawClient, to: str = "a.test") -> etree._Element:
    return await client.open(to)


async def secured(client: RawClient) -> etree._Element:
    """STARTTLS, then the restarted stream's features."""
    await features_of(client)
    await client.send(f"<starttls xmlns='{TLS_NS}'/>")
    await client.expect(f"{{{TLS_NS}}}proceed")
    await client.starttls()
    return await features_of(client)


# -- stream headers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("head", "condition"), [
    (header("unknown.test"), "host-unknown"),
    (b"<?xml version='1.0'?><stream:stream version='1.0' xmlns='jabber:client' "
     b"xmlns:stream='http://etherx.jabber.org/streams'>", "host-unknown"),
    (header("a.test", xmlns="jabber:server"), "invalid-namespace"),
    (header("a.test", xmlns="urn:wrong"), "invalid-namespace"),
    (b"<stream:stream to='a.test' version='1.0' xmlns='jabber:client' "
     b"xmlns:stream='urn:not-streams'>", "invalid-namespace"),
    (header("a.test", version=None), "unsupported-version"),
    (header("a.test", version="2.0"), "unsupported-version"),
    (b"<s:stream to='a.test' version='1.0' xmlns='jabber:client' "
     b"xmlns:s='http://etherx.jabber.org/streams'>", "bad-namespace-prefix"),
    (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream to='a.test'>",
     "restricted-xml"),
    (b"<stream:stream to='a.test' <<>", "not-well-formed"),
])
async def test_bad_stream_headers_get_stream_errors(server: RunningServer, head: bytes,
                                                    condition: str) -> None:
    client = await server.raw()
    await client.send(head)
    assert await client.stream_error() == condition
    await client.wait_closed()
    validate_stream_bytes(bytes(client.received))


async def test_stream_version_1_x_is_accepted(server: RunningServer) -> None:
    client = await server.raw()
    await client.send(header("a.test", version="1.5"))
    await client.expect(FEATURES)
    assert client.stream_attrs["version"] == "1.0"
    assert client.stream_attrs["from"] == "a.test"
    assert client.stream_attrs.get("id")
    await client.close()


async def test_starttls_is_required_and_plain_not_offered_before_tls(server: RunningServer) -> None:
    client = await server.raw()
    features = await features_of(client)
    starttls = features.find(f"{{{TLS_NS}}}starttls")
    assert starttls is not None and starttls.find(f"{{{TLS_NS}}}required") is not None
    assert features.find(f"{{{SASL_NS}}}mechanisms") is None
    # A stanza before authentication is refused.
    await client.send("<message to='b@a.test'><body>x</body></message>")
    assert await client.stream_error() == "not-authorized"
    validate_stream_bytes(bytes(client.received))


async def test_auth_before_starttls_is_refused(server: RunningServer) -> None:
    client = await server.raw()
    await features_of(client)
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>AHVzZXIAcGFzcw==</auth>")
    failure = await client.expect(f"{{{SASL_NS}}}failure")
    assert failure.find(f"{{{SASL_NS}}}encryption-required") is not None


async def test_mechanisms_after_tls(server: RunningServer) -> None:
    client = await server.raw()
    await features_of(client)
    await client.send(f"<starttls xmlns='{TLS_NS}'/>")
    await client.expect(f"{{{TLS_NS}}}proceed")
    await client.starttls()
    features = await features_of(client)
    mechanisms = [m.text for m in features.iter(f"{{{SASL_NS}}}mechanism")]
    assert "SCRAM-SHA-256" in mechanisms and "SCRAM-SHA-1" in mechanisms and "PLAIN" in mechanisms
    assert "SCRAM-SHA-256-PLUS" in mechanisms  # tls-exporter / tls-server-end-point available
    assert features.find(f"{{{TLS_NS}}}starttls") is None
    await client.close()


async def test_plain_login_and_bad_password(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    await secured(client)
    bad = base64.b64encode(b"\0alice\0wrong").decode()
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{bad}</auth>")
    failure = await client.expect(f"{{{SASL_NS}}}failure")
    assert failure.find(f"{{{SASL_NS}}}not-authorized") is not None
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>not base64!</auth>")
    failure = await client.expect(f"{{{SASL_NS}}}failure")
    assert failure.find(f"{{{SASL_NS}}}incorrect-encoding") is not None
    good = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{good}</auth>")
    await client.expect(f"{{{SASL_NS}}}success")
    client.restart()
    features = await features_of(client)
    assert features.find(f"{{{BIND_NS}}}bind") is not None
    validate_stream_bytes(bytes(client.received))
    await client.close()


async def test_unknown_mechanism_and_too_many_failures(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    await secured(client)
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='X-UNKNOWN'/>")
    failure = await client.expect(f"{{{SASL_NS}}}failure")
    assert failure.find(f"{{{SASL_NS}}}invalid-mechanism") is not None
    bad = base64.b64encode(b"\0alice\0wrong").decode()
    for _ in range(2):
        await client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{bad}</auth>")
        await client.expect(f"{{{SASL_NS}}}failure")
    assert await client.stream_error() == "policy-violation"


async def test_abort_sasl(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    await secured(client)
    first = base64.b64encode(b"n,,n=alice,r=abcdefgh").decode()
    await client.send(f"<auth xmlns='{SASL_NS}' mechanism='SCRAM-SHA-1'>{first}</auth>")
    await client.expect(f"{{{SASL_NS}}}challenge")
    await client.send(f"<abort xmlns='{SASL_NS}'/>")
    failure = await client.expect(f"{{{SASL_NS}}}failure")
    assert failure.find(f"{{{SASL_NS}}}aborted") is not None
    await client.close()


async def test_direct_tls_login(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    host, port = server.address("c2s_tls")
    client = await RawClient.connect(host, port, direct_tls=True)
    features = await features_of(client)
    assert features.find(f"{{{TLS_NS}}}starttls") is None
    assert features.find(f"{{{SASL_NS}}}mechanisms") is not None
    await client.close()
    xmpp = await server.client("alice@a.test", direct_tls=True)
    assert str(xmpp.boundjid) == "alice@a.test/slix"


async def test_raw_login_bind_and_session(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    jid = await client.login("a.test", "alice", PASSWORD, resource="laptop")
    assert jid == "alice@a.test/laptop"
    await client.send("<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
    reply = await client.expect(f"{{{CLIENT}}}iq")
    assert reply.get("type") == "result" and reply.get("id") == "s1", etree.tostring(reply)
    validate_stream_bytes(bytes(client.received))
    await client.close()


async def test_server_generated_resource(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    jid = await client.login("a.test", "alice", PASSWORD, resource=None)
    assert jid.startswith("alice@a.test/") and len(jid) > len("alice@a.test/")
    await client.close()


async def test_resource_conflict_new_session_wins(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    old = await server.raw_login("alice@a.test", resource="phone")
    new = await server.raw_login("alice@a.test", resource="phone")
    assert await old.stream_error() == "conflict"
    await new.send("<iq type='get' id='p' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    reply = await new.expect(f"{{{CLIENT}}}iq")
    assert reply.get("type") == "result"
    await new.close()


async def test_stanza_before_bind_is_refused(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    await client.authenticate("a.test", "alice", PASSWORD)
    await features_of(client)
    await client.send("<message to='alice@a.test'><body>x</body></message>")
    assert await client.stream_error() == "not-authorized"


# -- stanzas ---------------------------------------------------------------------------------------

async def test_from_is_stamped_and_spoofing_refused(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test", resource="r")
    await bob.send("<presence/>")
    alice = await server.raw_login("alice@a.test", resource="r")
    await alice.send("<message to='bob@a.test/r' type='chat'><body>hi</body></message>")
    msg = await bob.next()
    while msg.tag != f"{{{CLIENT}}}message":  # skip bob's own presence echo
        msg = await bob.next()
    assert msg.get("from") == "alice@a.test/r"
    assert msg.findtext(f"{{{CLIENT}}}body") == "hi"
    await alice.send("<message from='bob@a.test/r' to='bob@a.test/r'><body>x</body></message>")
    assert await alice.stream_error() == "invalid-from"
    await bob.close()


async def test_server_iqs(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    xmpp = await server.client("alice@a.test", plugins=("xep_0030", "xep_0092", "xep_0199",
                                                          "xep_0202"))
    info = await xmpp.plugin["xep_0030"].get_info(jid="a.test")
    features = info["disco_info"]["features"]
    assert "urn:xmpp:ping" in features and "jabber:iq:version" in features
    assert ("server", "im", None, "presenced") in info["disco_info"]["identities"]
    version = await xmpp.plugin["xep_0092"].get_version("a.test")
    assert version["software_version"]["name"] == "presenced"
    await xmpp.plugin["xep_0199"].ping("a.test")  # raises unless the answer is a result
    # The wire, read raw: XEP-0199 §4 ping and XEP-0202 time, answered by the server itself.
    client = await server.raw_login("alice@a.test")
    reply = await client.ask("<iq type='get' id='p1' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>",
                             skip_others=True)
    assert {k: reply.get(k) for k in ("type", "id", "from", "to")} == {
        "type": "result", "id": "p1", "from": "a.test", "to": "alice@a.test/raw"}
    assert len(reply) == 0 and not (reply.text or "").strip()  # an empty result
    before = datetime.now(UTC).replace(microsecond=0)
    reply = await client.ask("<iq type='get' id='t1' to='a.test'><time xmlns='urn:xmpp:time'/></iq>",
                             skip_others=True)
    after = datetime.now(UTC)
    assert (reply.get("type"), reply.get("id"), reply.get("from")) == ("result", "t1", "a.test")
    time_el = reply.find("{urn:xmpp:time}time")
    assert time_el is not None and [etree.QName(c).localname for c in time_el] == ["tzo", "utc"]
    tzo = time_el.findtext("{urn:xmpp:time}tzo") or ""
    assert re.fullmatch(r"[+-](0\d|1[0-4]):[0-5]\d", tzo), tzo  # XEP-0082 TZD
    # XEP-0082 DateTime in UTC, as XEP-0202 §3 shows it (slixmpp 1.17's get_utc() would
    # append a second 'Z', so the XML is read).
    utc = time_el.findtext("{urn:xmpp:time}utc") or ""
    stamp = datetime.strptime(utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= stamp <= after, (before, utc, after)
    t = await xmpp.plugin["xep_0202"].get_entity_time("a.test")
    assert t.xml.findtext("{urn:xmpp:time}time/{urn:xmpp:time}utc")[:16] == utc[:16]


async def test_unknown_iq_service_unavailable_and_results_dropped(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    await client.send("<iq type='get' id='u1' to='a.test'><q xmlns='urn:unknown'/></iq>")
    reply = await client.expect(f"{{{CLIENT}}}iq")
    assert reply.get("type") == "error" and reply.get("id") == "u1"
    assert reply.find(f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}service-unavailable") is not None
    # A result or error to the server is never answered: the next reply we see is the ping's.
    await client.send("<iq type='result' id='r1' to='a.test'/>")
    await client.send("<iq type='error' id='r2' to='a.test'><error type='cancel'>"
                      "<bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
    await client.send("<iq type='get' id='p1' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    reply = await client.expect(f"{{{CLIENT}}}iq")
    assert reply.get("id") == "p1" and reply.get("type") == "result"
    # jid-malformed for a bad 'to'
    await client.send("<message to='a@b@c' id='m1'><body>x</body></message>")
    reply = await client.expect(f"{{{CLIENT}}}message")
    assert reply.get("type") == "error"
    assert reply.find(f"{{{CLIENT}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}jid-malformed") is not None
    validate_stream_bytes(bytes(client.received))
    await client.close()


async def test_restricted_xml_after_login(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    for bad, condition in [(b"<!-- c -->", "restricted-xml"), (b"<?pi x?>", "restricted-xml"),
                           (b"<message>&xxe;</message>", "restricted-xml"),
                           (b"<message><body>x</message>", "not-well-formed")]:
        client = await server.raw_login("alice@a.test")
        await client.send(bad)
        assert await client.stream_error() == condition, bad
        validate_stream_bytes(bytes(client.received))


async def test_oversized_stanza_is_a_policy_violation(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    await client.send(b"<message to='a.test'><body>" + b"x" * 300_000 + b"</body></message>")
    assert await client.stream_error() == "policy-violation"


async def test_whitespace_keepalive(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw_login("alice@a.test")
    for _ in range(3):
        await client.send(b" ")
    await client.send("<iq type='get' id='p1' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
    reply = await client.expect(f"{{{CLIENT}}}iq")
    assert reply.get("type") == "result"
    await client.close()


async def test_chat_between_slixmpp_clients(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    alice = await server.client("alice@a.test")
    bob = await server.client("bob@a.test")
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    bob.add_event_handler("message", lambda m: got.done() or got.set_result(str(m["body"])))
    await asyncio.sleep(0.1)
    alice.send_message(mto="bob@a.test/slix", mbody="hello bob", mtype="chat")
    assert await asyncio.wait_for(got, 5) == "hello bob"


async def test_graceful_shutdown_closes_streams(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_server
    running = await start_server(tmp_path)
    await running.add_user("alice@a.test")
    client = await running.raw_login("alice@a.test")
    await running.server.stop()
    assert await client.stream_error() == "system-shutdown"
    assert client.closed


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS",
                                       "SCRAM-SHA-256-PLUS"])
async def test_scram_mechanisms_end_to_end(server: RunningServer, mechanism: str) -> None:
    """scramp as an independent client; -PLUS with tls-server-end-point channel binding."""
    await server.add_user("alice@a.test")
    client = await server.raw()
    await client.authenticate("a.test", "alice", PASSWORD, mechanism=mechanism)
    features = await features_of(client)
    assert features.find(f"{{{BIND_NS}}}bind") is not None
    await client.close()


async def test_scram_wrong_password_and_unknown_user_look_alike(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    for user, password in (("alice", "wrong"), ("nobody", "wrong")):
        client = await server.raw()
        with pytest.raises(AssertionError) as failed:
            await client.authenticate("a.test", user, password, mechanism="SCRAM-SHA-256")
        assert "not-authorized" in str(failed.value)
        await client.close()


async def test_negotiation_and_idle_timeouts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_server, stop_server
    running = await start_server(tmp_path, "[limits]\nnegotiation_timeout = 1.0\n"
                                           "idle_timeout = 1.5\n")
    try:
        await running.add_user("alice@a.test")
        silent = await running.raw()
        await silent.open("a.test")  # then nothing: negotiation never finishes
        assert await silent.stream_error(timeout=5) == "connection-timeout"
        idle = await running.raw_login("alice@a.test")
        assert await idle.stream_error(timeout=6) == "connection-timeout"
        # Whitespace keepalives keep a session alive past the idle timeout.
        alive = await running.raw_login("alice@a.test", resource="alive")
        for _ in range(4):
            await asyncio.sleep(0.6)
            await alive.send(b" ")
        await alive.send("<iq type='get' id='p' to='a.test'><ping xmlns='urn:xmpp:ping'/></iq>")
        reply = await alive.expect(f"{{{CLIENT}}}iq")
        assert reply.get("id") == "p"
    finally:
        await stop_server(running)


async def test_cli_account_commands_while_running(server: RunningServer) -> None:
    """`presenced adduser` on the running server's config: the account works at once."""
    from tests.process import presenced
    proc = await asyncio.create_subprocess_exec(
        *presenced("adduser", "carol@a.test", "--password", PASSWORD, "--config",
                   str(server.config_path)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await proc.communicate()
    assert proc.returncode == 0, err
    client = await server.raw_login("carol@a.test")
    assert client.jid == "carol@a.test/raw"  # type: ignore[attr-defined]
    await client.close()
    proc = await asyncio.create_subprocess_exec(
        *presenced("passwd", "carol@a.test", "--password", "new-password", "--config",
                   str(server.config_path)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await proc.communicate()
    assert proc.returncode == 0, err
    # The old password is refused at once (RFC 6120 §6.5.10: SASL not-authorized) ...
    client = await server.raw()
    with pytest.raises(AssertionError) as refused:
        await client.authenticate("a.test", "carol", PASSWORD)
    assert re.search(r"SASL failed: b'<failure xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\"[^>]*>"
                     r"<not-authorized/>", str(refused.value)), refused.value
    await client.close()
    # ... and the new one works.
    client = await server.raw_login("carol@a.test", password="new-password")
    assert client.jid == "carol@a.test/raw"  # type: ignore[attr-defined]


def _exporter_login(host: str, port: int, cb_data: bytes | None) -> bytes:
    """A pyOpenSSL client (the stdlib cannot export keying material) logging in with
    SCRAM-SHA-256-PLUS over the tls-exporter binding (RFC 9266) read from its own TLS session.
    cb_data replaces the real binding to test a mismatch. Returns the SASL outcome element."""
    import re
    import socket
    import struct

    from OpenSSL import SSL

    from tests.test_scram import HandClient

    def read_until(recv, marker: bytes) -> bytes:  # type: ignore[no-untyped-def]
        data = b""
        while not re.search(marker, data):
            chunk = recv(65536)
            assert chunk, data
            data += chunk
        return data

    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(header("a.test"))
    read_until(sock.recv, b"</stream:features>")
    sock.sendall(f"<starttls xmlns='{TLS_NS}'/>".encode())
    read_until(sock.recv, b"<proceed")
    sock.settimeout(None)  # pyOpenSSL needs a blocking socket; the kernel bounds each read
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    conn.do_handshake()
    conn.sendall(header("a.test"))
    features = read_until(conn.recv, b"</stream:features>")
    assert b"SCRAM-SHA-256-PLUS" in features and b"tls-exporter" in features
    real = conn.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    client = HandClient("sha256", "alice", PASSWORD, cb_name="tls-exporter",
                        cb_data=real if cb_data is None else cb_data)
    conn.sendall(f"<auth xmlns='{SASL_NS}' mechanism='SCRAM-SHA-256-PLUS'>"
                 f"{base64.b64encode(client.first()).decode()}</auth>".encode())
    challenge = read_until(conn.recv, b"</challenge>")
    server_first = base64.b64decode(re.search(rb"<challenge[^>]*>([^<]*)<", challenge).group(1))  # type: ignore[union-attr]
    conn.sendall(f"<response xmlns='{SASL_NS}'>"
                 f"{base64.b64encode(client.final(server_first)).decode()}</response>".encode())
    outcome = read_until(conn.recv, b"</success>|</failure>|<success[^>]*/>")
    conn.close()
    return outcome


async def test_scram_plus_with_tls_exporter_end_to_end(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    host, port = server.address("c2s")
    outcome = await asyncio.to_thread(_exporter_login, host, port, None)
    assert b"<success" in outcome, outcome
    outcome = await asyncio.to_thread(_exporter_login, host, port, b"\0" * 32)
    assert b"<failure" in outcome and b"not-authorized" in outcome, outcome


async def test_channel_bindings_read_once_per_tls_session(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tls-exporter and tls-server-end-point values are read from OpenSSL once per TLS
    session, not on every features build or SASL step: a STARTTLS login (features before and
    after TLS, SCRAM-SHA-256-PLUS, the restart, bind) and a direct TLS one read each once."""
    from OpenSSL import SSL

    calls = {"export_keying_material": 0, "get_certificate": 0}
    for name in calls:
        original = getattr(SSL.Connection, name)

        def counted(self, *args, _original=original, _name=name):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(SSL.Connection, name, counted)
    await server.add_user("alice@a.test")
    for direct_tls, resource in ((False, "starttls"), (True, "direct")):
        client = await server.raw(direct_tls=direct_tls)
        await client.authenticate("a.test", "alice", PASSWORD, mechanism="SCRAM-SHA-256-PLUS")
        features = await features_of(client)
        assert features.find(f"{{{BIND_NS}}}bind") is not None
        await client.send(f"<iq type='set' id='b'><bind xmlns='{BIND_NS}'>"
                          f"<resource>{resource}</resource></bind></iq>")
        reply = await client.expect(f"{{{CLIENT}}}iq")
        assert reply.get("type") == "result", etree.tostring(reply)
        await client.close()
    # TLS 1.3 here: the exporter is defined, so each session read it once
    assert calls == {"export_keying_material": 2, "get_certificate": 2}, calls
