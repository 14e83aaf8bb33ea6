"""The c2s negotiation machine (RFC 6120 §4–§7) driven directly: events in, actions out."""

from __future__ import annotations

import base64

import pytest
from lxml import etree

from server.stream import negotiation as neg
from server.stream.negotiation import C2SNegotiation, Policy, Stage
from server.stream.scram import derive_credentials
from server.xml import ns
from server.xml.parser import StreamOpened

STREAM = ns.q(ns.STREAMS, "stream")
POLICY = Policy(domains=frozenset({"a.test"}))


def opened(to: str | None = "a.test", version: str | None = "1.0", default_ns: str = ns.CLIENT,
           tag: str = STREAM, prefix: str = "stream") -> StreamOpened:
    attrs = {}
    if to is not None:
        attrs["to"] = to
    if version is not None:
        attrs["version"] = version
    return StreamOpened(tag, attrs, default_ns, {None: default_ns, prefix: ns.STREAMS})


def el(xml: str) -> etree._Element:
    return etree.fromstring(xml)


def sent(actions: list[neg.Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, neg.Send))


def closed_with(actions: list[neg.Action]) -> str | None:
    for action in actions:
        if isinstance(action, neg.CloseStream):
            return action.condition or "clean"
    return None


def features(actions: list[neg.Action]) -> etree._Element:
    data = [a.data for a in actions if isinstance(a, neg.Send) and b"features" in a.data]
    return etree.fromstring(data[-1])


@pytest.mark.parametrize(("event", "condition"), [
    (opened(to="other.test"), "host-unknown"),
    (opened(to=None), "host-unknown"),
    (opened(to="bad..domain"), "host-unknown"),
    (opened(default_ns=ns.SERVER), "invalid-namespace"),
    (opened(tag="{urn:x}stream"), "invalid-namespace"),
    (opened(tag=ns.q(ns.STREAMS, "other")), "invalid-xml"),
    (opened(prefix="s"), "bad-namespace-prefix"),
    (opened(tag="stream:stream"), "bad-namespace-prefix"),  # xmlns:stream never declared
    (opened(version=None), "unsupported-version"),
    (opened(version="0.9"), "unsupported-version"),
    (opened(version="2.0"), "unsupported-version"),
])
def test_header_errors_send_our_header_first(event: StreamOpened, condition: str) -> None:
    machine = C2SNegotiation(POLICY)
    actions = machine.receive(event)
    assert sent(actions).startswith(b"<?xml version='1.0'?><stream:stream")
    assert closed_with(actions) == condition
    assert machine.stage is Stage.CLOSED
    assert machine.receive(el("<x/>")) == []  # nothing after the end


def test_header_case_and_minor_version_accepted() -> None:
    machine = C2SNegotiation(POLICY)
    actions = machine.receive(opened(to="A.TEST", version="1.9"))
    assert closed_with(actions) is None
    assert b"version='1.0'" in sent(actions)
    assert features(actions).find(ns.q(ns.TLS, "starttls")) is not None


def test_plaintext_offers_only_required_starttls() -> None:
    machine = C2SNegotiation(POLICY)
    f = features(machine.receive(opened()))
    assert f.find(ns.q(ns.TLS, "starttls")).find(ns.q(ns.TLS, "required")) is not None
    assert f.find(ns.q(ns.SASL, "mechanisms")) is None


def test_optional_starttls_offers_scram_but_not_plain_in_the_clear() -> None:
    machine = C2SNegotiation(Policy(domains=frozenset({"a.test"}), require_starttls=False))
    f = features(machine.receive(opened()))
    assert f.find(ns.q(ns.TLS, "starttls")).find(ns.q(ns.TLS, "required")) is None
    names = [m.text for m in f.iter(ns.q(ns.SASL, "mechanism"))]
    assert names == ["SCRAM-SHA-256", "SCRAM-SHA-1"]


@pytest.mark.parametrize(("xml", "expected"), [
    ("<message xmlns='jabber:client'/>", "not-authorized"),
    ("<iq xmlns='jabber:client' type='get' id='1'/>", "not-authorized"),
    ("<foo xmlns='urn:x'/>", "policy-violation"),
])
def test_before_tls(xml: str, expected: str) -> None:
    machine = C2SNegotiation(POLICY)
    machine.receive(opened())
    assert closed_with(machine.receive(el(xml))) == expected


def test_auth_before_tls_gets_encryption_required() -> None:
    machine = C2SNegotiation(POLICY)
    machine.receive(opened())
    actions = machine.receive(el(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>AGEAYg==</auth>"))
    assert b"encryption-required" in sent(actions)
    assert closed_with(actions) is None


def tls_machine() -> C2SNegotiation:
    machine = C2SNegotiation(POLICY, channel_binding=lambda kind: b"x" * 32
                             if kind == "tls-exporter" else None)
    machine.receive(opened())
    actions = machine.receive(el(f"<starttls xmlns='{ns.TLS}'/>"))
    assert b"<proceed" in sent(actions) and any(isinstance(a, neg.StartTLS) for a in actions)
    assert machine.stage is Stage.STARTING_TLS
    machine.tls_established()
    return machine


def test_after_tls_mechanisms_and_channel_bindings() -> None:
    machine = tls_machine()
    f = features(machine.receive(opened()))
    names = [m.text for m in f.iter(ns.q(ns.SASL, "mechanism"))]
    assert names == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1",
                     "PLAIN"]
    types = [c.get("type") for c in f.iter("{urn:xmpp:sasl-cb:0}channel-binding")]
    assert types == ["tls-exporter"]
    assert f.find(ns.q(ns.TLS, "starttls")) is None
    # A second STARTTLS is a policy violation.
    assert closed_with(machine.receive(el(f"<starttls xmlns='{ns.TLS}'/>"))) == "policy-violation"


def plain(user: str, password: str) -> etree._Element:
    payload = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return el(f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{payload}</auth>")


def test_plain_success_restart_bind() -> None:
    machine = tls_machine()
    machine.receive(opened())
    actions = machine.receive(plain("Alice", "pw"))
    assert actions == [neg.LookupCredentials("alice", "a.test")]
    assert machine.stage is Stage.AWAIT_CREDENTIALS
    # Anything while the lookup runs is a violation... but first finish this one.
    actions = machine.credentials(derive_credentials("pw"))
    assert b"<success" in sent(actions)
    assert any(isinstance(a, neg.RestartStream) for a in actions)
    assert neg.Authenticated("alice", "a.test", "PLAIN") in actions
    f = features(machine.receive(opened()))
    assert f.find(ns.q(ns.BIND, "bind")) is not None
    session = f.find(ns.q(ns.SESSION, "session"))
    assert session is not None and session.find(ns.q(ns.SESSION, "optional")) is not None
    bind = el(f"<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='{ns.BIND}'>"
              "<resource> desk </resource></bind></iq>")
    actions = machine.receive(bind)
    assert isinstance(actions[0], neg.BindResource) and actions[0].resource == "desk"
    assert machine.stage is Stage.BINDING
    out = sent(machine.bound(bind, "alice@a.test/desk"))
    assert b"<jid>alice@a.test/desk</jid>" in out and b"type=\"result\"" in out
    assert machine.stage is Stage.BOUND


def test_stanza_before_bind_and_unexpected_elements() -> None:
    machine = tls_machine()
    machine.receive(opened())
    machine.receive(plain("alice", "pw"))
    machine.credentials(derive_credentials("pw"))
    machine.receive(opened())
    assert closed_with(machine.receive(el("<message xmlns='jabber:client'/>"))) == "not-authorized"


def test_bind_failure_allows_retry() -> None:
    from server.errors import StanzaError
    machine = tls_machine()
    machine.receive(opened())
    machine.receive(plain("alice", "pw"))
    machine.credentials(derive_credentials("pw"))
    machine.receive(opened())
    bind = el(f"<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='{ns.BIND}'/></iq>")
    machine.receive(bind)
    out = sent(machine.bind_failed(bind, StanzaError("resource-constraint")))
    assert b"resource-constraint" in out
    assert machine.stage is Stage.BIND
    assert isinstance(machine.receive(bind)[0], neg.BindResource)


@pytest.mark.parametrize(("element", "condition"), [
    (f"<auth xmlns='{ns.SASL}' mechanism='X-FOO'/>", b"invalid-mechanism"),
    (f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>!!!</auth>", b"incorrect-encoding"),
    (f"<auth xmlns='{ns.SASL}' mechanism='PLAIN'>{base64.b64encode(b'x').decode()}</auth>",
     b"malformed-request"),
])
def test_sasl_failures_and_retry_limit(element: str, condition: bytes) -> None:
    machine = tls_machine()
    machine.receive(opened())
    for attempt in range(neg.MAX_SASL_FAILURES):
        actions = machine.receive(el(element))
        assert condition in sent(actions)
        last = attempt == neg.MAX_SASL_FAILURES - 1
        assert (closed_with(actions) == "policy-violation") is last


def test_wrong_password_and_unknown_user() -> None:
    machine = tls_machine()
    machine.receive(opened())
    machine.receive(plain("alice", "wrong"))
    assert b"not-authorized" in sent(machine.credentials(derive_credentials("pw")))
    machine.receive(plain("nobody", "x"))
    assert b"not-authorized" in sent(machine.credentials(None))
    assert machine.stage is Stage.PRE_AUTH


def test_invalid_username_never_looked_up() -> None:
    machine = tls_machine()
    machine.receive(opened())
    actions = machine.receive(plain("bad user@x", "pw"))
    assert not any(isinstance(a, neg.LookupCredentials) for a in actions)
    assert b"not-authorized" in sent(actions)


def test_abort_and_stream_close() -> None:
    machine = tls_machine()
    machine.receive(opened())
    first = base64.b64encode(b"n,,n=alice,r=abcdef").decode()
    machine.receive(el(f"<auth xmlns='{ns.SASL}' mechanism='SCRAM-SHA-1'>{first}</auth>"))
    assert b"<challenge" in sent(machine.credentials(derive_credentials("pw")))
    assert b"aborted" in sent(machine.receive(el(f"<abort xmlns='{ns.SASL}'/>")))
    from server.xml.parser import StreamClosed
    assert closed_with(machine.receive(StreamClosed())) == "clean"


def test_direct_tls_starts_at_sasl() -> None:
    machine = C2SNegotiation(POLICY, direct_tls=True)
    f = features(machine.receive(opened()))
    assert f.find(ns.q(ns.TLS, "starttls")) is None
    assert "PLAIN" in [m.text for m in f.iter(ns.q(ns.SASL, "mechanism"))]


def test_restart_keeps_the_domain() -> None:
    machine = C2SNegotiation(Policy(domains=frozenset({"a.test", "b.test"})), direct_tls=True)
    machine.receive(opened(to="a.test"))
    machine.receive(plain("alice", "pw"))
    machine.credentials(derive_credentials("pw"))
    assert closed_with(machine.receive(opened(to="b.test"))) == "host-unknown"
