"""The s2s negotiation machines, event by event (RFC 6120 §4–§6, XEP-0178, XEP-0220)."""

from __future__ import annotations

import base64

import pytest
from lxml import etree

from federation import negotiation as neg
from server.xml.parser import StreamClosed, StreamOpened, StreamParser

LOCAL, REMOTE = "a.test", "b.test"
STREAMS = "http://etherx.jabber.org/streams"
SERVER = "jabber:server"
DB = "jabber:server:dialback"
KEYS = {("b.test", "a.test", "sid"): "good-key"}


def policy(**overrides: object) -> neg.Policy:
    values: dict[str, object] = {
        "domains": frozenset({LOCAL}),
        "dialback_key": lambda r, o, i: f"key:{r}:{o}:{i}",
        "keys_equal": lambda a, b: a == b,
    }
    values.update(overrides)
    return neg.Policy(**values)  # type: ignore[arg-type]


def opened(to: str | None = LOCAL, from_: str | None = REMOTE, *, version: str | None = "1.0",
           default_ns: str = SERVER, tag: str = f"{{{STREAMS}}}stream",
           id_: str | None = None) -> StreamOpened:
    attrs = {k: v for k, v in (("to", to), ("from", from_), ("version", version), ("id", id_))
             if v is not None}
    return StreamOpened(tag, attrs, default_ns, {None: default_ns, "stream": STREAMS})


def xml(text: str) -> etree._Element:
    """An element as the stream parser would hand it over (inside a jabber:server stream)."""
    parser = StreamParser()
    events = parser.feed(f"<stream:stream xmlns='{SERVER}' xmlns:stream='{STREAMS}' "
                         f"xmlns:db='{DB}'>{text}".encode())
    element = events[-1]
    assert isinstance(element, etree._Element)
    return element


def sent(actions: list[neg.Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, neg.Send))


def closed_with(actions: list[neg.Action]) -> str | None:
    for action in actions:
        if isinstance(action, neg.CloseStream):
            return action.condition
    raise AssertionError(f"no CloseStream in {actions}")


def of(kind: type, actions: list[neg.Action]) -> list:
    return [a for a in actions if isinstance(a, kind)]


# -- inbound ---------------------------------------------------------------------------------

def inbound_after_tls(valid_for: set[str] = frozenset(), **overrides: object
                      ) -> tuple[neg.InboundNegotiation, bytes]:
    machine = neg.InboundNegotiation(policy(**overrides), direct_tls=True,
                                     certificate_valid=lambda d: d in valid_for)
    features = sent(machine.receive(opened())).split(b"<stream:features>")[1]
    return machine, features


@pytest.mark.parametrize(("event", "condition"), [
    (opened(default_ns="jabber:client"), "invalid-namespace"),
    (opened(tag="{urn:wrong}stream"), "invalid-namespace"),
    (opened(tag=f"{{{STREAMS}}}other"), "invalid-xml"),
    (opened(version=None), "unsupported-version"),
    (opened(version="2.0"), "unsupported-version"),
    (opened(to="c.test"), "host-unknown"),
    (opened(to=None), "host-unknown"),
])
def test_inbound_bad_headers(event: StreamOpened, condition: str) -> None:
    machine = neg.InboundNegotiation(policy())
    actions = machine.receive(event)
    assert sent(actions).startswith(b"<?xml")  # our header goes out before the error
    assert closed_with(actions) == condition


def test_inbound_denied_peer() -> None:
    machine = neg.InboundNegotiation(policy(allowed=lambda d: d != REMOTE))
    assert closed_with(machine.receive(opened())) == "policy-violation"


def test_inbound_requires_starttls_first() -> None:
    machine = neg.InboundNegotiation(policy())
    out = sent(machine.receive(opened())).split(b"<stream:features>")[1]
    assert b"<starttls" in out and b"<required/>" in out
    assert b"dialback" not in out and b"mechanisms" not in out
    actions = machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k</db:result>"))
    assert closed_with(actions) == "policy-violation"


def test_inbound_starttls_then_restart() -> None:
    machine = neg.InboundNegotiation(policy())
    machine.receive(opened())
    actions = machine.receive(xml("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"))
    assert b"<proceed" in sent(actions) and of(neg.StartTLS, actions)
    machine.tls_established()
    features = sent(machine.receive(opened()))
    assert b"starttls" not in features.split(b"<stream:features>")[1]
    assert b"urn:xmpp:features:dialback" in features


def test_inbound_external_offered_only_for_a_valid_certificate() -> None:
    _machine, features = inbound_after_tls(valid_for={REMOTE})
    assert b"<mechanism>EXTERNAL</mechanism>" in features
    _machine, features = inbound_after_tls()
    assert b"EXTERNAL" not in features


@pytest.mark.parametrize(("authzid", "valid", "result"), [
    ("=", True, "success"),
    (base64.b64encode(REMOTE.encode()).decode(), True, "success"),
    (base64.b64encode(b"c.test").decode(), True, "invalid-authzid"),
    ("=", False, "not-authorized"),
    ("***", True, "incorrect-encoding"),
])
def test_inbound_sasl_external(authzid: str, valid: bool, result: str) -> None:
    machine, _ = inbound_after_tls(valid_for={REMOTE} if valid else set())
    actions = machine.receive(xml(
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>{authzid}</auth>"))
    assert f"<{result}".encode() in sent(actions)
    if result == "success":
        assert of(neg.RestartStream, actions)
        assert of(neg.Authenticated, actions) == [neg.Authenticated(LOCAL, REMOTE,
                                                                    "sasl-external")]
        features = sent(machine.receive(opened())).split(b"<stream:features>")[1]
        assert b"EXTERNAL" not in features and b"dialback" not in features
    else:
        assert machine.authenticated == set()


def test_inbound_sasl_other_mechanism_and_too_many_failures() -> None:
    machine, _ = inbound_after_tls()
    auth = xml("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AA==</auth>")
    assert b"invalid-mechanism" in sent(machine.receive(auth))
    machine.receive(auth)
    assert closed_with(machine.receive(auth)) == "policy-violation"


def test_inbound_dialback_verified_by_the_authoritative_server() -> None:
    machine, _ = inbound_after_tls()
    actions = machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>"))
    assert actions == [neg.VerifyKey(LOCAL, REMOTE, "k1")]
    # A repeated request while the first is pending asks nothing more.
    assert machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>")) == []
    stanza = xml(f"<message from='x@{REMOTE}' to='y@{LOCAL}'/>")
    actions = machine.dialback_verified(LOCAL, REMOTE, True)
    assert b"type=\"valid\"" in sent(actions)
    assert of(neg.Authenticated, actions) == [neg.Authenticated(LOCAL, REMOTE, "dialback")]
    assert of(neg.Deliver, machine.receive(stanza)) == [neg.Deliver(stanza)]


def test_inbound_dialback_invalid_closes_the_stream() -> None:
    """XEP-0220 §2.2.1: a refused key is a spoofing attempt: 'invalid', then the stream ends."""
    machine, _ = inbound_after_tls()
    machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>"))
    actions = machine.dialback_verified(LOCAL, REMOTE, False)
    assert b'type="invalid"' in sent(actions) and closed_with(actions) is None
    assert machine.authenticated == set()


def test_inbound_dialback_unverifiable_is_an_error_not_the_end() -> None:
    machine, _ = inbound_after_tls()
    machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>"))
    answer = etree.fromstring(sent(machine.dialback_verified(LOCAL, REMOTE, None)))
    assert answer.get("type") == "error"
    # XEP-0220 §2.4: the error element is in the stream's namespace, like a stanza error.
    assert answer.find(f"{{{SERVER}}}error/{{urn:ietf:params:xml:ns:xmpp-stanzas}}"
                       "remote-connection-failed") is not None
    stanza = xml(f"<message from='x@{REMOTE}' to='y@{LOCAL}'/>")
    assert closed_with(machine.receive(stanza)) == "not-authorized"


def test_inbound_dialback_with_a_valid_certificate_needs_no_callback() -> None:
    machine, _ = inbound_after_tls(valid_for={REMOTE})
    actions = machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>"))
    assert not of(neg.VerifyKey, actions)
    assert of(neg.Authenticated, actions) == [neg.Authenticated(LOCAL, REMOTE,
                                                                "dialback-certificate")]


def test_inbound_dialback_refused_when_certificates_are_required() -> None:
    machine, _ = inbound_after_tls(require_valid_certificates=True)
    actions = machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>"))
    assert b"not-authorized" in sent(actions) and not of(neg.VerifyKey, actions)


@pytest.mark.parametrize(("to", "from_", "error"), [
    ("c.test", REMOTE, "item-not-found"),
    (LOCAL, "evil.test", "forbidden"),
])
def test_inbound_dialback_errors(to: str, from_: str, error: str) -> None:
    machine, _ = inbound_after_tls(allowed=lambda d: d != "evil.test")
    actions = machine.receive(xml(f"<db:result from='{from_}' to='{to}'>k</db:result>"))
    assert error.encode() in sent(actions) and b'type="error"' in sent(actions)


def test_inbound_db_result_without_key_is_improper() -> None:
    machine, _ = inbound_after_tls()
    actions = machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'/>"))
    assert closed_with(actions) == "improper-addressing"


@pytest.mark.parametrize(("key", "type_"), [("key:b.test:a.test:sid", "valid"),
                                            ("forged", "invalid"), ("", "invalid")])
def test_inbound_db_verify_as_authoritative_server(key: str, type_: str) -> None:
    machine, _ = inbound_after_tls()
    out = sent(machine.receive(xml(
        f"<db:verify from='{REMOTE}' to='{LOCAL}' id='sid'>{key}</db:verify>")))
    answer = etree.fromstring(out)
    assert answer.get("type") == type_
    assert (answer.get("from"), answer.get("to"), answer.get("id")) == (LOCAL, REMOTE, "sid")


def test_inbound_db_verify_for_a_domain_not_ours() -> None:
    machine, _ = inbound_after_tls()
    out = sent(machine.receive(xml(f"<db:verify from='{REMOTE}' to='c.test' id='s'>k</db:verify>")))
    assert b"item-not-found" in out


@pytest.mark.parametrize(("stanza", "condition"), [
    (f"<message to='y@{LOCAL}'/>", "improper-addressing"),
    (f"<message from='x@{REMOTE}'/>", "improper-addressing"),
    (f"<message from='x@c.test' to='y@{LOCAL}'/>", "invalid-from"),
    (f"<message from='x@{REMOTE}' to='y@c.test'/>", "host-unknown"),
    ("<message from='@@' to='y@a.test'/>", "improper-addressing"),
])
def test_inbound_stanza_addressing(stanza: str, condition: str) -> None:
    machine, _ = inbound_after_tls()
    machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>"))
    machine.dialback_verified(LOCAL, REMOTE, True)
    assert closed_with(machine.receive(xml(stanza))) == condition


def test_inbound_other_elements_and_close() -> None:
    machine, _ = inbound_after_tls()
    assert closed_with(machine.receive(xml("<foo xmlns='urn:x'/>"))) == "unsupported-stanza-type"
    machine, _ = inbound_after_tls()
    assert machine.receive(StreamClosed()) == [neg.CloseStream()]


# -- outbound --------------------------------------------------------------------------------

def outbound(**overrides: object) -> neg.OutboundNegotiation:
    machine = neg.OutboundNegotiation(policy(**overrides), LOCAL, REMOTE)
    header = sent(machine.start())
    assert b"xmlns='jabber:server'" in header or b'xmlns="jabber:server"' in header
    assert b"jabber:server:dialback" in header and b"a.test" in header
    return machine


FEATURES_PRE_TLS = ("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
                    "<required/></starttls></stream:features>")
FEATURES_TLS = ("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                "<mechanism>EXTERNAL</mechanism></mechanisms>"
                "<dialback xmlns='urn:xmpp:features:dialback'/></stream:features>")
FEATURES_DIALBACK = ("<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>"
                     "</stream:features>")


def to_tls(machine: neg.OutboundNegotiation, certificate_valid: bool) -> list[neg.Action]:
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid1"))
    assert b"<starttls" in sent(machine.receive(xml(FEATURES_PRE_TLS)))
    assert of(neg.StartTLS, machine.receive(xml(
        "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")))
    return machine.tls_established(certificate_valid)


def test_outbound_sasl_external() -> None:
    machine = outbound()
    actions = to_tls(machine, True)
    assert of(neg.RestartStream, actions) and b"<?xml" in sent(actions)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    actions = machine.receive(xml(FEATURES_TLS))
    assert of(neg.CanVerify, actions)
    auth = etree.fromstring(sent(actions))
    assert auth.get("mechanism") == "EXTERNAL"
    assert base64.b64decode(auth.text or "") == LOCAL.encode()
    actions = machine.receive(xml("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"))
    assert of(neg.RestartStream, actions)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid3"))
    assert machine.receive(xml("<stream:features/>")) == [neg.Ready("sasl-external")]


def test_outbound_dialback_when_certificate_invalid() -> None:
    machine = outbound()
    to_tls(machine, False)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    actions = machine.receive(xml(FEATURES_TLS))
    result = etree.fromstring(sent(actions))
    assert result.tag == f"{{{DB}}}result"
    # XEP-0185: the key is bound to the receiving server, us, and the peer's stream id.
    assert result.text == f"key:{REMOTE}:{LOCAL}:sid2"
    assert machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>")) == [
        neg.Ready("dialback")]


def test_outbound_sasl_failure_falls_back_to_dialback() -> None:
    machine = outbound()
    to_tls(machine, True)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    machine.receive(xml(FEATURES_TLS))
    actions = machine.receive(xml("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                                  "<not-authorized/></failure>"))
    assert b"db:result" in sent(actions)


@pytest.mark.parametrize(("answer", "bounce"), [
    ("type='invalid'/>", "internal-server-error"),
    ("type='error'><error type='cancel'><item-not-found "
     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>", "remote-server-timeout"),
])
def test_outbound_dialback_refused(answer: str, bounce: str) -> None:
    """XEP-0220 §2.1.1: queued stanzas go back as internal-server-error (invalid) or
    remote-server-timeout (error)."""
    machine = outbound()
    to_tls(machine, False)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    machine.receive(xml(FEATURES_DIALBACK))
    actions = machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}' {answer}"))
    assert of(neg.Failed, actions)[0].condition == bounce


def test_outbound_required_valid_certificate() -> None:
    machine = outbound(require_valid_certificates=True)
    actions = to_tls(machine, False)
    assert of(neg.Failed, actions) and of(neg.CloseStream, actions)


def test_outbound_no_tls_offered() -> None:
    machine = outbound()
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid1"))
    actions = machine.receive(xml(FEATURES_DIALBACK))
    assert "no TLS" in of(neg.Failed, actions)[0].text
    machine = outbound(require_tls=False)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid1"))
    assert b"db:result" in sent(machine.receive(xml(FEATURES_DIALBACK)))


@pytest.mark.parametrize(("event", "condition"), [
    (opened(to=LOCAL, from_=REMOTE, id_=None), "invalid-xml"),
    (opened(to=LOCAL, from_="c.test", id_="x"), "host-unknown"),
    (opened(to=LOCAL, from_=REMOTE, id_="x", version=None), "unsupported-version"),
])
def test_outbound_bad_response_headers(event: StreamOpened, condition: str) -> None:
    machine = outbound()
    actions = machine.receive(event)
    assert closed_with(actions) == condition and of(neg.Failed, actions)


def test_outbound_stream_error_and_close_fail() -> None:
    machine = outbound()
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid1"))
    actions = machine.receive(xml(
        "<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        "</stream:error>"))
    assert "host-unknown" in of(neg.Failed, actions)[0].text
    machine = outbound()
    assert of(neg.Failed, machine.receive(StreamClosed()))


def test_outbound_verify_request_and_answer() -> None:
    machine = outbound()
    request = etree.fromstring(machine.verify_request("their-id", "k"))
    assert (request.get("from"), request.get("to"), request.get("id"), request.text) == (
        LOCAL, REMOTE, "their-id", "k")
    answer = xml(f"<db:verify from='{REMOTE}' to='{LOCAL}' id='their-id' type='valid'/>")
    assert machine.receive(answer) == [neg.VerifyAnswer(LOCAL, REMOTE, "their-id", True)]
    wrong = xml(f"<db:verify from='c.test' to='{LOCAL}' id='x' type='valid'/>")
    assert closed_with(machine.receive(wrong)) == "improper-addressing"


def test_outbound_refuses_stanzas_without_bidi() -> None:
    machine = outbound()
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid1"))
    actions = machine.receive(xml(f"<message from='x@{REMOTE}' to='y@{LOCAL}'/>"))
    assert closed_with(actions) == "unsupported-stanza-type"


def test_inbound_limits_verifications_under_way() -> None:
    machine, _ = inbound_after_tls(allowed=lambda _d: True)
    for n in range(neg.MAX_PENDING_VERIFICATIONS):
        actions = machine.receive(xml(f"<db:result from='d{n}.test' to='{LOCAL}'>k</db:result>"))
        assert of(neg.VerifyKey, actions)
    actions = machine.receive(xml(f"<db:result from='more.test' to='{LOCAL}'>k</db:result>"))
    assert b"resource-constraint" in sent(actions) and not of(neg.VerifyKey, actions)


def test_outbound_peer_closing_a_ready_stream_is_no_failure() -> None:
    machine = outbound()
    to_tls(machine, True)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    machine.receive(xml(FEATURES_TLS))
    machine.receive(xml("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"))
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid3"))
    assert machine.receive(xml("<stream:features/>")) == [neg.Ready("sasl-external")]
    assert machine.receive(StreamClosed()) == [neg.CloseStream()]


# -- XEP-0288 bidirectional streams -----------------------------------------------------------

BIDI_REQUEST = "<bidi xmlns='urn:xmpp:bidi'/>"
FEATURES_BIDI = ("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                 "<mechanism>EXTERNAL</mechanism></mechanisms>"
                 "<bidi xmlns='urn:xmpp:features:bidi'/></stream:features>")


def test_inbound_offers_and_accepts_bidi_before_authentication() -> None:
    machine, features = inbound_after_tls(valid_for={REMOTE})
    assert b"urn:xmpp:features:bidi" in features
    assert machine.receive(xml(BIDI_REQUEST)) == [] and machine.bidi
    machine, _ = inbound_after_tls(bidi=False)
    assert closed_with(machine.receive(xml(BIDI_REQUEST))) == "policy-violation"
    machine, features = inbound_after_tls(bidi=False)
    assert b"bidi" not in features


def test_inbound_bidi_after_authentication_is_refused() -> None:
    machine, _ = inbound_after_tls(valid_for={REMOTE})
    machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k1</db:result>"))
    assert closed_with(machine.receive(xml(BIDI_REQUEST))) == "policy-violation"


def ready_bidi_outbound() -> neg.OutboundNegotiation:
    machine = outbound()
    to_tls(machine, True)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    out = sent(machine.receive(xml(FEATURES_BIDI)))
    # XEP-0288 §2.2: <bidi/> goes before the authentication.
    assert out.index(b"urn:xmpp:bidi") < out.index(b"<auth")
    machine.receive(xml("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"))
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid3"))
    assert machine.receive(xml("<stream:features/>")) == [neg.Ready("sasl-external")]
    assert machine.bidi
    return machine


def test_outbound_bidi_carries_the_peers_stanzas() -> None:
    machine = ready_bidi_outbound()
    stanza = xml(f"<message from='x@{REMOTE}' to='y@{LOCAL}'/>")
    assert machine.receive(stanza) == [neg.Deliver(stanza)]


@pytest.mark.parametrize(("stanza", "condition"), [
    (f"<message from='x@c.test' to='y@{LOCAL}'/>", "invalid-from"),
    (f"<message from='x@{REMOTE}' to='y@c.test'/>", "host-unknown"),
    (f"<message to='y@{LOCAL}'/>", "improper-addressing"),
])
def test_outbound_bidi_checks_addresses(stanza: str, condition: str) -> None:
    machine = ready_bidi_outbound()
    assert closed_with(machine.receive(xml(stanza))) == condition


def test_outbound_bidi_not_before_ready_nor_unasked() -> None:
    machine = outbound(bidi=False)
    to_tls(machine, True)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    assert b"urn:xmpp:bidi" not in sent(machine.receive(xml(FEATURES_BIDI)))
    stanza = xml(f"<message from='x@{REMOTE}' to='y@{LOCAL}'/>")
    assert closed_with(machine.receive(stanza)) == "unsupported-stanza-type"


def test_outbound_bidi_answers_verify_and_declines_piggyback() -> None:
    machine = ready_bidi_outbound()
    answer = etree.fromstring(sent(machine.receive(xml(
        f"<db:verify from='{REMOTE}' to='{LOCAL}' id='sid'>key:b.test:a.test:sid</db:verify>"))))
    assert answer.get("type") == "valid"
    out = sent(machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}'>k</db:result>")))
    assert b"feature-not-implemented" in out


def test_inbound_refuses_unrequested_dialback_answers() -> None:
    """A forged <db:result type='valid'/> or verify answer on an inbound stream is no
    authentication (XEP-0288 §4): the stream ends."""
    for forged in (f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>",
                   f"<db:verify from='{REMOTE}' to='{LOCAL}' id='x' type='valid'/>"):
        machine, _ = inbound_after_tls()
        assert closed_with(machine.receive(xml(forged))) == "unsupported-stanza-type"
        assert machine.authenticated == set()


def test_outbound_ignores_a_valid_result_it_did_not_ask_for() -> None:
    machine = outbound()
    to_tls(machine, True)
    machine.receive(opened(to=LOCAL, from_=REMOTE, id_="sid2"))
    machine.receive(xml(FEATURES_TLS))  # SASL under way, no dialback request sent
    actions = machine.receive(xml(f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>"))
    assert not of(neg.Ready, actions) and closed_with(actions) == "unsupported-stanza-type"


@pytest.mark.parametrize(("kind", "attrs", "key", "error"), [
    ("result", {"from": LOCAL, "to": REMOTE}, "k", None),
    ("result", {"from": LOCAL, "to": REMOTE, "type": "valid"}, None, None),
    ("result", {"from": LOCAL, "to": REMOTE, "type": "error"}, None, "item-not-found"),
    ("verify", {"from": LOCAL, "to": REMOTE, "id": "i1", "type": "invalid"}, None, None),
    ("verify", {"from": LOCAL, "to": REMOTE, "id": "i1", "type": "error"}, None, "forbidden"),
])
def test_dialback_elements_validate(kind: str, attrs: dict[str, str], key: str | None,
                                    error: str | None) -> None:
    """What we send is what XEP-0220's schema (schemas/dialback.xsd) allows."""
    from tests.schema import validate_element
    validate_element(etree.fromstring(neg.dialback_element(kind, attrs, key, error)))
    wrong = etree.fromstring(f"<db:result xmlns:db='{DB}' from='a' to='b' type='error'>"
                             "<db:error/></db:result>")
    with pytest.raises(AssertionError):
        validate_element(wrong)


def test_inbound_nobody_speaks_for_our_own_domains() -> None:
    machine, _ = inbound_after_tls(valid_for={LOCAL})
    out = sent(machine.receive(xml(f"<db:result from='{LOCAL}' to='{LOCAL}'>k</db:result>")))
    assert b"forbidden" in out and machine.authenticated == set()
    authzid = base64.b64encode(LOCAL.encode()).decode()
    machine = neg.InboundNegotiation(policy(), direct_tls=True, certificate_valid=lambda _d: True)
    machine.receive(opened(from_=None))
    actions = machine.receive(xml("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                                  f"mechanism='EXTERNAL'>{authzid}</auth>"))
    assert b"not-authorized" in sent(actions) and machine.authenticated == set()
