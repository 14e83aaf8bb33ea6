"""SASL2 (XEP-0388) + Bind 2 (XEP-0386) + FAST (XEP-0484) + SCRAM downgrade protection
(XEP-0474): the negotiation machine driven directly, every path, with the wire as the XEPs'
examples write it; then real sockets (a raw client, scramp as the SCRAM client) for logins,
inline stream management (enable, resume after a TCP drop) and FAST tokens before and after
`presenced passwd`. slixmpp 1.17 has no SASL2 (no 'urn:xmpp:sasl:2' in its source), so no
slixmpp test here."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import scramp
from lxml import etree

from server.errors import StanzaError
from server.jid import JID
from server.stream import negotiation as neg
from server.stream import sasl2
from server.stream.negotiation import C2SNegotiation, Policy, Stage
from server.stream.scram import ScramServer, derive_credentials, derive_keys, downgrade_protection
from server.xml import ns
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.rawclient import CLIENT, STREAMS, TLS_NS, RawClient
from tests.test_negotiation import closed_with, el, features, opened, sent

S2 = sasl2.SASL2
B2 = sasl2.BIND2
FAST = sasl2.FAST
SM = "urn:xmpp:sm:3"
CARBONS = "urn:xmpp:carbons:2"
SASL = ns.SASL
UA = "d4565fa7-4d72-4749-b3d3-740edbf87770"  # XEP-0388's example user agent
EXPORTER = b"E" * 32
INLINE = sasl2.Inline(bind2=(CARBONS, SM), sm=True, fast=True)


def q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def machine(*, inline: sasl2.Inline = INLINE, exporter: bool = True,
            policy: Policy | None = None) -> C2SNegotiation:
    """Direct TLS, stream opened; tls-exporter available when `exporter`."""
    m = C2SNegotiation(policy or Policy(domains=frozenset({"a.test"})), direct_tls=True,
                       channel_binding=lambda kind: EXPORTER
                       if exporter and kind == "tls-exporter" else None,
                       post_bind_features=lambda: [etree.Element(q(SM, "sm"), nsmap={None: SM})],
                       sasl2_inline=lambda: inline)
    m.receive(opened())
    return m


def authenticate(mechanism: str, initial: bytes | None = None, *, user_agent: str | None = UA,
                 bind: str | None = None, extra: str = "") -> etree._Element:
    ir = f"<initial-response>{b64(initial)}</initial-response>" if initial is not None else ""
    ua = (f"<user-agent id='{user_agent}'><software>AwesomeXMPP</software>"
          f"<device>Kiva's Phone</device></user-agent>" if user_agent else "")
    bind_xml = f"<bind xmlns='{B2}'>{bind}</bind>" if bind is not None else ""
    return el(f"<authenticate xmlns='{S2}' mechanism='{mechanism}'>{ir}{ua}{bind_xml}{extra}"
              "</authenticate>")


def only(actions: list[neg.Action], kind: type) -> object:
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def top(actions: list[neg.Action], tag: str) -> etree._Element:
    for action in actions:
        if isinstance(action, neg.Send) and action.data.startswith(f"<{tag}".encode()):
            return etree.fromstring(action.data)
    raise AssertionError(f"no <{tag}/> in {actions}")


def scram_login(m: C2SNegotiation, bind: str | None = "<tag>AwesomeXMPP</tag>",
                extra: str = "", password: str = "pw",
                mechanism: str = "SCRAM-SHA-256") -> tuple[list[neg.Action], scramp.ScramClient]:
    """A SCRAM exchange up to the first action after the proof (the machine's inline work)."""
    client = scramp.ScramClient([mechanism], "alice", password)
    actions = m.receive(authenticate(mechanism, client.get_client_first().encode(), bind=bind,
                                     extra=extra))
    assert only(actions, neg.LookupCredentials) == neg.LookupCredentials("alice", "a.test")
    challenge = top(m.credentials(derive_credentials("pw")), "challenge")
    assert challenge.tag == q(S2, "challenge")
    server_first = base64.b64decode(challenge.text or "").decode()
    client.set_server_first(server_first)
    final = client.get_client_final()
    return m.receive(el(f"<response xmlns='{S2}'>{b64(final.encode())}</response>")), client


# -- the feature ---------------------------------------------------------------------------------

def test_authentication_feature_after_tls() -> None:
    m = C2SNegotiation(Policy(domains=frozenset({"a.test"})), direct_tls=True,
                       channel_binding=lambda kind: EXPORTER if kind == "tls-exporter" else None,
                       sasl2_inline=lambda: INLINE)
    got = features(m.receive(opened()))
    auth = got.find(q(S2, "authentication"))
    assert auth is not None
    sasl1 = [x.text for x in got.iter(q(SASL, "mechanism"))]
    assert [x.text for x in auth.findall(q(S2, "mechanism"))] == sasl1  # the same mechanisms
    assert "SCRAM-SHA-256-PLUS" in sasl1
    inline = auth.find(q(S2, "inline"))
    assert inline is not None
    assert [f.get("var") for f in inline.iterfind(f"{q(B2, 'bind')}/{q(B2, 'inline')}/"
                                                  f"{q(B2, 'feature')}")] == [CARBONS, SM]
    assert inline.find(q(SM, "sm")) is not None
    # XEP-0484 §3.1: -EXPR (tls-exporter is there), -NONE; no -ENDP without its binding
    assert [x.text for x in inline.iterfind(f"{q(FAST, 'fast')}/{q(FAST, 'mechanism')}")] == [
        "HT-SHA-256-EXPR", "HT-SHA-256-NONE"]


def test_wire_forms_of_the_xeps_examples() -> None:
    """XEP-0386 §3.1 / XEP-0484 §3.1 feature and XEP-0388 §2.6.2 failure, byte by byte."""
    feature = sasl2.authentication_feature(
        ["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"], sasl2.Inline(bind2=(CARBONS, SM), sm=True,
                                                          fast=True),
        ["HT-SHA-256-ENDP", "HT-SHA-256-NONE"])
    assert etree.tostring(feature) == (
        b'<authentication xmlns="urn:xmpp:sasl:2"><mechanism>SCRAM-SHA-1</mechanism>'
        b"<mechanism>SCRAM-SHA-1-PLUS</mechanism><inline>"
        b'<bind xmlns="urn:xmpp:bind:0"><inline><feature var="urn:xmpp:carbons:2"/>'
        b'<feature var="urn:xmpp:sm:3"/></inline></bind><sm xmlns="urn:xmpp:sm:3"/>'
        b'<fast xmlns="urn:xmpp:fast:0"><mechanism>HT-SHA-256-ENDP</mechanism>'
        b"<mechanism>HT-SHA-256-NONE</mechanism></fast></inline></authentication>")
    assert sasl2.failure("aborted", "This is a terrible example.") == (
        b'<failure xmlns="urn:xmpp:sasl:2"><aborted xmlns="urn:ietf:params:xml:ns:xmpp-sasl"/>'
        b"<text>This is a terrible example.</text></failure>")
    token = sasl2.token_element("WXZzciBwYmFmdmZnZiBqdmd1IGp2eXFhcmZm", "2020-03-12T14:36:15Z")
    assert etree.tostring(token) == (
        b'<token xmlns="urn:xmpp:fast:0" expiry="2020-03-12T14:36:15Z" '
        b'token="WXZzciBwYmFmdmZnZiBqdmd1IGp2eXFhcmZm"/>')


def test_no_sasl2_without_tls_or_when_disabled() -> None:
    plain = C2SNegotiation(Policy(domains=frozenset({"a.test"}), require_starttls=False,
                                  tls_available=False))
    got = features(plain.receive(opened()))
    assert got.find(q(S2, "authentication")) is None  # XEP-0388 §4: after TLS only
    assert closed_with(plain.receive(authenticate("SCRAM-SHA-256", b"x"))) == \
        "unsupported-stanza-type"
    off = C2SNegotiation(Policy(domains=frozenset({"a.test"}), sasl2=False), direct_tls=True)
    assert features(off.receive(opened())).find(q(S2, "authentication")) is None


def test_without_modules_only_bind2_is_inline() -> None:
    got = features(C2SNegotiation(Policy(domains=frozenset({"a.test"})),
                                  direct_tls=True).receive(opened()))
    inline = got.find(f"{q(S2, 'authentication')}/{q(S2, 'inline')}")
    assert inline is not None and [c.tag for c in inline] == [q(B2, "bind")]


# -- SCRAM + Bind 2 ------------------------------------------------------------------------------

def test_scram_bind2_sm_carbons_token_in_one_round_trip() -> None:
    m = machine()
    actions, client = scram_login(
        m, bind=f"<tag>AwesomeXMPP</tag><enable xmlns='{CARBONS}'/>"
                f"<enable xmlns='{SM}' resume='true'/>",
        extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-EXPR'/>")
    assert only(actions, neg.Authenticated) == neg.Authenticated("alice", "a.test",
                                                                 "SCRAM-SHA-256")
    assert not [a for a in actions if isinstance(a, neg.Send)]  # nothing before the bind
    bind = only(actions, neg.BindInline)
    assert isinstance(bind, neg.BindInline)
    resource = bind.resource
    assert resource.startswith("AwesomeXMPP/") and UA not in resource
    assert [f.tag for f in bind.features] == [q(CARBONS, "enable"), q(SM, "enable")]
    assert m.stage is Stage.INLINE
    enabled = etree.Element(q(SM, "enabled"), id="sm1", resume="true", nsmap={None: SM})
    actions = m.inline_bound(f"alice@a.test/{resource}", [enabled])
    issue = only(actions, neg.IssueToken)
    assert issue == neg.IssueToken("alice", "a.test", UA, "HT-SHA-256-EXPR")
    actions = m.token_issued("WXZzciBwYmFmdmZnZiBqdmd1IGp2eXFhcmZm", "2020-03-12T14:36:15Z")
    success = top(actions, "success")
    # XEP-0388 §2.6.1: additional data, the full JID, then the inline answers
    assert [c.tag for c in success] == [q(S2, "additional-data"),
                                        q(S2, "authorization-identifier"),
                                        q(B2, "bound"), q(FAST, "token")]
    client.set_server_final(base64.b64decode(success.findtext(q(S2, "additional-data")) or "")
                            .decode())  # the server proved it knows the password
    assert success.findtext(q(S2, "authorization-identifier")) == f"alice@a.test/{resource}"
    assert success.find(f"{q(B2, 'bound')}/{q(SM, 'enabled')}").get("id") == "sm1"
    token = success.find(q(FAST, "token"))
    assert token.attrib == {"expiry": "2020-03-12T14:36:15Z",
                            "token": "WXZzciBwYmFmdmZnZiBqdmd1IGp2eXFhcmZm"}
    # no stream restart: the post-bind features follow at once, then stanzas flow
    after = features(actions)
    assert after.find(q(SM, "sm")) is not None
    assert after.find(q(ns.BIND, "bind")) is None
    assert only(actions, neg.Sasl2Complete) == neg.Sasl2Complete(f"alice@a.test/{resource}",
                                                                 False)
    assert not any(isinstance(a, neg.RestartStream) for a in actions)
    assert m.stage is Stage.BOUND


def test_xep0474_hash_in_server_first_is_what_the_client_computes() -> None:
    # The XEP's own vector (SHA-1 of the mechanisms and bindings of its example)
    assert downgrade_protection("sha1", ["SCRAM-SHA-1-PLUS", "SCRAM-SHA-1"],
                                ["tls-server-end-point", "tls-exporter"]) == \
        "G6k/rBLDqgOhRRaCuuatSDFkJ08="
    m = C2SNegotiation(Policy(domains=frozenset({"a.test"})), direct_tls=True,
                       channel_binding=lambda kind: EXPORTER if kind == "tls-exporter" else None)
    got = features(m.receive(opened()))
    advertised = [x.text or "" for x in got.iterfind(f"{q(S2, 'authentication')}/"
                                                     f"{q(S2, 'mechanism')}")]
    bindings = [x.get("type", "") for x in got.iter("{urn:xmpp:sasl-cb:0}channel-binding")]
    assert bindings == ["tls-exporter"]
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pw")
    m.receive(authenticate("SCRAM-SHA-256", client.get_client_first().encode()))
    first = base64.b64decode(top(m.credentials(derive_credentials("pw")), "challenge").text
                             or "").decode()
    attrs = dict(part.split("=", 1) for part in first.split(","))
    # the client side of XEP-0474 §5.2: recompute from what the features said
    text = "\x1e".join(sorted(advertised)) + "\x1f" + "\x1e".join(sorted(bindings))
    assert attrs["h"] == b64(hashlib.sha256(text.encode()).digest())
    # a stripped -PLUS would give another value: the client would notice
    assert attrs["h"] != downgrade_protection("sha256", [a for a in advertised
                                                         if not a.endswith("-PLUS")], None)
    client.set_server_first(first)
    actions = m.receive(el(f"<response xmlns='{S2}'>"
                           f"{b64(client.get_client_final().encode())}</response>"))
    success = top(actions, "success")  # 'h' is signed by the proof and verifies
    assert success.findtext(q(S2, "authorization-identifier")) == "alice@a.test"


def test_xep0474_full_example_byte_by_byte() -> None:
    """XEP-0474 §5.3 (on XEP-0388's example): the same challenge, proof and success bytes."""
    nonce = "a09117a6-ac50-4f2f-93f1-93799c2bddf6"
    scram = ScramServer("sha1", plus=True, channel_bindings={"tls-exporter":
                                                             b"THIS IS FAKE CB DATA"},
                        binding_offered=True, nonce=nonce,
                        ssdp=(["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"],
                              ["tls-server-end-point", "tls-exporter"]))
    initial = sasl2.parse_authenticate(el(
        f"<authenticate xmlns='{S2}' mechanism='SCRAM-SHA-1-PLUS'><initial-response>"
        "cD10bHMtZXhwb3J0ZXIsLG49dXNlcixyPTEyQzRDRDVDLUUzOEUtNEE5OC04RjZELTE1QzM4RjUxQ0NDNg=="
        f"</initial-response><user-agent id='{UA}'><software>AwesomeXMPP</software>"
        "<device>Kiva's Phone</device></user-agent></authenticate>"))
    assert initial.user_agent == UA and initial.software == "AwesomeXMPP"
    assert scram.client_first(initial.initial_response or b"") == "user"
    keys = derive_keys("pencil", "sha1", salt=base64.b64decode("QSXCR+Q6sek8bf92"))
    assert sasl2.challenge(scram.server_first(keys)) == (
        b'<challenge xmlns="urn:xmpp:sasl:2">cj0xMkM0Q0Q1Qy1FMzhFLTRBOTgtOEY2RC0xNUMzOEY1MUNDQz'
        b"ZhMDkxMTdhNi1hYzUwLTRmMmYtOTNmMS05Mzc5OWMyYmRkZjYscz1RU1hDUitRNnNlazhiZjkyLGk9NDA5Nix"
        b"oPUc2ay9yQkxEcWdPaFJSYUN1dWF0U0RGa0owOD0=</challenge>")
    final = sasl2.decode(
        "Yz1jRDEwYkhNdFpYaHdiM0owWlhJc0xGUklTVk1nU1ZNZ1JrRkxSU0JEUWlCRVFWUkIscj0xMkM0Q0Q1Qy1F"
        "MzhFLTRBOTgtOEY2RC0xNUMzOEY1MUNDQzZhMDkxMTdhNi1hYzUwLTRmMmYtOTNmMS05Mzc5OWMyYmRkZjYs"
        "eD0xOUM2NTMyRi0xQ0Y0LTRBMjctQTE4RC1EQzlDRUE0MUJCQjMscD1NL1NJRGpUK2RmY3hVaDg5alpFeXBS"
        "dkZ4QjQ9")
    verifier = scram.client_final(final or b"")
    assert sasl2.success("user@example.org", verifier, []) == (
        b'<success xmlns="urn:xmpp:sasl:2"><additional-data>'
        b"dj1NUXJNUHZ2N3l2NHg0Q3E0VzRJaDI1RXFTMmM9</additional-data>"
        b"<authorization-identifier>user@example.org</authorization-identifier></success>")


def test_rfc6120_sasl_gets_the_hash_too() -> None:
    m = machine()
    client = scramp.ScramClient(["SCRAM-SHA-1"], "alice", "pw")
    m.receive(el(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'>"
                 f"{b64(client.get_client_first().encode())}</auth>"))
    first = base64.b64decode(etree.fromstring(sent(m.credentials(derive_credentials("pw"))))
                             .text or "").decode()
    mechanisms = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1",
                  "PLAIN"]
    assert first.endswith(",h=" + downgrade_protection("sha1", mechanisms, ["tls-exporter"]))


def test_stable_resource_per_user_agent() -> None:
    def resource(tag: str | None, ua: str | None, account: str = "alice@a.test") -> str:
        return sasl2.bind2_resource(tag, ua, account)
    assert resource("Conv", UA) == resource("Conv", UA)
    assert resource("Conv", UA) != resource("Conv", str(uuid.uuid4()))
    assert resource("Conv", UA) != resource("Conv", UA, "bob@a.test")
    assert resource("Conv", UA).split("/")[1] == resource(None, UA)
    assert resource("Conv", None) != resource("Conv", None)  # no id: random
    assert "\x07" not in resource("bad\x07tag", UA) and resource("bad\x07tag", UA) == \
        resource(None, UA)


def test_plain_without_bind_then_rfc6120_bind_without_restart() -> None:
    m = machine()
    actions = m.receive(authenticate("PLAIN", b"\0alice\0pw"))
    only(actions, neg.LookupCredentials)
    actions = m.credentials(derive_credentials("pw"))
    success = top(actions, "success")
    assert success.find(q(S2, "additional-data")) is None  # PLAIN has none
    assert success.findtext(q(S2, "authorization-identifier")) == "alice@a.test"
    assert features(actions).find(q(ns.BIND, "bind")) is not None
    assert m.stage is Stage.BIND
    actions = m.receive(el(f"<iq xmlns='{ns.CLIENT}' type='set' id='b'>"
                           f"<bind xmlns='{ns.BIND}'/></iq>"))
    assert isinstance(actions[0], neg.BindResource)


@pytest.mark.parametrize(("request_xml", "condition"), [
    (f"<authenticate xmlns='{S2}' mechanism='X-UNKNOWN'/>", "invalid-mechanism"),
    (f"<authenticate xmlns='{S2}'/>", "invalid-mechanism"),
    (f"<authenticate xmlns='{S2}' mechanism='PLAIN'><initial-response>!!</initial-response>"
     "</authenticate>", "incorrect-encoding"),
    (f"<authenticate xmlns='{S2}' mechanism='PLAIN'><initial-response>AGFsaWNl"
     "</initial-response></authenticate>", "malformed-request"),
])
def test_failures_are_sasl2_failures(request_xml: str, condition: str) -> None:
    m = machine()
    failure = top(m.receive(el(request_xml)), "failure")
    assert failure.tag == q(S2, "failure")
    assert failure.find(q(SASL, condition)) is not None  # XEP-0388 §2.6.2: RFC 6120 conditions
    assert m.stage is Stage.PRE_AUTH


def test_wrong_password_then_retry_then_too_many() -> None:
    m = machine()
    for _ in range(2):
        actions, _client = scram_login(m, password="wrong")
        failure = top(actions, "failure")
        assert failure.find(q(SASL, "not-authorized")) is not None
        assert not any(isinstance(a, (neg.BindInline, neg.Authenticated)) for a in actions)
    actions, _client = scram_login(m, password="wrong")
    assert closed_with(actions) == "policy-violation"


def test_abort_and_other_traffic_during_the_exchange() -> None:
    m = machine()
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pw")
    m.receive(authenticate("SCRAM-SHA-256", client.get_client_first().encode()))
    m.credentials(derive_credentials("pw"))
    failure = top(m.receive(el(f"<abort xmlns='{S2}'/>")), "failure")
    assert failure.find(q(SASL, "aborted")) is not None
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pw")
    m.receive(authenticate("SCRAM-SHA-256", client.get_client_first().encode()))
    m.credentials(derive_credentials("pw"))
    # XEP-0388 §2.5: anything but <response/>/<abort/> ends the stream
    assert closed_with(m.receive(el(f"<response xmlns='{SASL}'>eA==</response>"))) == \
        "unsupported-stanza-type"


def test_empty_challenge_without_initial_response() -> None:
    m = machine()
    challenge = top(m.receive(authenticate("PLAIN")), "challenge")
    assert challenge.tag == q(S2, "challenge") and not challenge.text
    response = b64(b"\0alice\0pw")
    only(m.receive(el(f"<response xmlns='{S2}'>{response}</response>")), neg.LookupCredentials)


def test_waiting_for_the_inline_work_is_not_a_time_to_talk() -> None:
    m = machine()
    scram_login(m)
    assert closed_with(m.receive(el(f"<response xmlns='{S2}'>eA==</response>"))) == \
        "policy-violation"


def test_bind_failure_fails_the_authentication() -> None:
    m = machine()
    scram_login(m)
    actions = m.inline_bind_failed(StanzaError("resource-constraint", "too many sessions"))
    failure = top(actions, "failure")
    assert failure.find(q(SASL, "aborted")) is not None
    assert failure.findtext(q(S2, "text")) == "too many sessions"
    assert m.stage is Stage.PRE_AUTH


# -- inline resumption (XEP-0198 in SASL2) -------------------------------------------------------

def test_inline_resume_skips_bind() -> None:
    m = machine()
    actions, _client = scram_login(m, extra=f"<resume xmlns='{SM}' previd='some-id' h='3'/>")
    resume = only(actions, neg.ResumeInline)
    assert isinstance(resume, neg.ResumeInline) and resume.element.get("previd") == "some-id"
    resumed = etree.Element(q(SM, "resumed"), previd="some-id", h="5", nsmap={None: SM})
    m.resumed()  # the module attaches the stream meanwhile: no early BOUND
    assert m.stage is Stage.INLINE
    actions = m.inline_resumed(resumed, "alice@a.test/phone")
    assert not any(isinstance(a, neg.BindInline) for a in actions)  # XEP-0386 §3.2 note
    success = top(actions, "success")
    assert success.findtext(q(S2, "authorization-identifier")) == "alice@a.test/phone"
    assert success.find(q(SM, "resumed")).get("h") == "5"
    assert success.find(q(B2, "bound")) is None
    assert only(actions, neg.Sasl2Complete) == neg.Sasl2Complete("alice@a.test/phone", True)
    assert m.stage is Stage.BOUND


def test_failed_resume_is_reported_and_bind_goes_on() -> None:
    m = machine()
    actions, _client = scram_login(m, extra=f"<resume xmlns='{SM}' previd='gone' h='0'/>")
    failed = etree.Element(q(SM, "failed"), nsmap={None: SM})
    actions = m.inline_resumed(failed, None)
    bind = only(actions, neg.BindInline)
    assert isinstance(bind, neg.BindInline)
    actions = m.inline_bound(f"alice@a.test/{bind.resource}", [])
    success = top(actions, "success")
    assert [c.tag for c in success][-2:] == [q(SM, "failed"), q(B2, "bound")]


def test_resume_is_ignored_when_not_offered() -> None:
    m = machine(inline=sasl2.Inline())
    actions, _client = scram_login(m, extra=f"<resume xmlns='{SM}' previd='x' h='0'/>")
    assert not any(isinstance(a, neg.ResumeInline) for a in actions)
    only(actions, neg.BindInline)


# -- FAST (XEP-0484) -----------------------------------------------------------------------------

TOKEN = "WXZzciBwYmFmdmZnZiBqdmd1IGp2eXFhcmZm"


def fast_request(mechanism: str, cb: bytes = b"", *, user_agent: str | None = UA,
                 fast: str = f"<fast xmlns='{FAST}' count='123'/>", user: str = "alice",
                 bind: str | None = "<tag>AwesomeXMPP</tag>") -> etree._Element:
    proof = hmac.digest(TOKEN.encode(), b"Initiator" + cb, "sha256")
    return authenticate(mechanism, user.encode() + b"\0" + proof, user_agent=user_agent,
                        bind=bind, extra=fast)


@pytest.mark.parametrize(("mechanism", "cb"), [("HT-SHA-256-NONE", b""),
                                                ("HT-SHA-256-EXPR", EXPORTER)])
def test_fast_login(mechanism: str, cb: bytes) -> None:
    m = machine()
    actions = m.receive(fast_request(mechanism, cb))
    verify = only(actions, neg.VerifyToken)
    assert verify == neg.VerifyToken(
        "alice", "a.test", mechanism, UA, hmac.digest(TOKEN.encode(), b"Initiator" + cb,
                                                      "sha256"), cb, False)
    assert m.stage is Stage.AWAIT_TOKEN
    responder = hmac.digest(TOKEN.encode(), b"Responder" + cb, "sha256")
    actions = m.token_verified(responder)
    assert only(actions, neg.Authenticated) == neg.Authenticated("alice", "a.test", mechanism)
    bind = only(actions, neg.BindInline)
    assert isinstance(bind, neg.BindInline)
    actions = m.inline_bound(f"alice@a.test/{bind.resource}", [])
    success = top(actions, "success")
    # the server's half of the mutual authentication
    assert base64.b64decode(success.findtext(q(S2, "additional-data")) or "") == responder
    assert success.find(q(FAST, "token")) is None  # not due for rotation, not asked


def test_fast_token_rotation_and_invalidation() -> None:
    m = machine()
    m.receive(fast_request("HT-SHA-256-NONE"))
    actions = m.token_verified(b"r" * 32, rotate=True)
    only(actions, neg.BindInline)
    assert only(m.inline_bound("alice@a.test/x", []), neg.IssueToken) == \
        neg.IssueToken("alice", "a.test", UA, "HT-SHA-256-NONE")
    m = machine()
    verify = only(m.receive(fast_request(
        "HT-SHA-256-NONE", fast=f"<fast xmlns='{FAST}' invalidate='true'/>", bind=None)),
        neg.VerifyToken)
    assert isinstance(verify, neg.VerifyToken) and verify.invalidate
    actions = m.token_verified(b"r" * 32, rotate=True)  # §3.6: no new token after invalidate
    assert not any(isinstance(a, neg.IssueToken) for a in actions)
    top(actions, "success")


@pytest.mark.parametrize("kwargs", [{"user_agent": None}, {"user": "nobody@other.test"},
                                    {"user": "bad user"}])
def test_fast_refused_before_storage(kwargs: dict[str, str | None]) -> None:
    m = machine()
    actions = m.receive(fast_request("HT-SHA-256-NONE", **kwargs))  # type: ignore[arg-type]
    assert not any(isinstance(a, neg.VerifyToken) for a in actions)
    assert top(actions, "failure").find(q(SASL, "not-authorized")) is not None


def test_fast_bad_token_and_unoffered_mechanisms() -> None:
    m = machine()
    m.receive(fast_request("HT-SHA-256-NONE"))
    failure = top(m.token_verified(None), "failure")
    assert failure.find(q(SASL, "not-authorized")) is not None
    assert m.stage is Stage.PRE_AUTH
    # -ENDP is not offered on this connection; nor is FAST without the module
    assert top(m.receive(fast_request("HT-SHA-256-ENDP")), "failure").find(
        q(SASL, "invalid-mechanism")) is not None
    off = machine(inline=sasl2.Inline())
    assert top(off.receive(fast_request("HT-SHA-256-NONE")), "failure").find(
        q(SASL, "invalid-mechanism")) is not None


def test_fast_storage_down_is_a_temporary_failure() -> None:
    m = machine()
    m.receive(fast_request("HT-SHA-256-NONE"))
    failure = top(m.token_check_failed(), "failure")
    assert failure.find(q(SASL, "temporary-auth-failure")) is not None
    assert m.token_check_failed() == [] and m.token_verified(b"x") == []  # once only


def test_token_requested_for_an_unoffered_mechanism_is_not_issued() -> None:
    m = machine(exporter=False)
    actions, _client = scram_login(
        m, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-EXPR'/>")
    actions = m.inline_bound("alice@a.test/x", [])
    assert not any(isinstance(a, neg.IssueToken) for a in actions)
    top(actions, "success")


def test_token_without_user_agent_is_not_issued() -> None:
    m = machine()
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "pw")
    m.receive(authenticate("SCRAM-SHA-256", client.get_client_first().encode(), user_agent=None,
                           extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>"))
    client.set_server_first(base64.b64decode(top(m.credentials(derive_credentials("pw")),
                                                 "challenge").text or "").decode())
    actions = m.receive(el(f"<response xmlns='{S2}'>"
                           f"{b64(client.get_client_final().encode())}</response>"))
    assert not any(isinstance(a, neg.IssueToken) for a in actions)
    assert top(actions, "success").find(q(FAST, "token")) is None


# -- over real sockets ---------------------------------------------------------------------------

async def secure(client: RawClient, domain: str = "a.test") -> etree._Element:
    """STARTTLS; the features of the secured stream."""
    await client.open(domain)
    await client.send(f"<starttls xmlns='{TLS_NS}'/>")
    await client.expect(f"{{{TLS_NS}}}proceed")
    await client.starttls()
    return await client.open(domain)


def end_point(client: RawClient) -> bytes:
    """RFC 5929 tls-server-end-point of the client's TLS connection."""
    from scramp.core import CBindData  # scramp's own RFC 5929 hash choice
    der = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return bytes(CBindData.from_der(der))


async def scram_sasl2(client: RawClient, *, user: str = "alice", password: str = PASSWORD,
                      mechanism: str = "SCRAM-SHA-256", user_agent: str | None = UA,
                      bind: str | None = "<tag>Test</tag>",
                      extra: str = "") -> tuple[etree._Element, etree._Element]:
    """SASL2 SCRAM after STARTTLS, checking XEP-0474's 'h' like a client does; returns
    (<success/>, the features after it)."""
    got = await secure(client)
    auth = got.find(q(S2, "authentication"))
    assert auth is not None, etree.tostring(got)
    advertised = [m.text or "" for m in auth.iterfind(q(S2, "mechanism"))]
    bindings = [c.get("type", "") for c in got.iter("{urn:xmpp:sasl-cb:0}channel-binding")]
    binding = None
    if mechanism.endswith("-PLUS"):
        binding = ("tls-server-end-point", client.writer.get_extra_info("ssl_object"))
    scram = scramp.ScramClient([mechanism], user, password, channel_binding=binding)
    await client.send(etree.tostring(authenticate(
        mechanism, scram.get_client_first().encode(), user_agent=user_agent, bind=bind,
        extra=extra)))
    challenge = await client.expect(q(S2, "challenge"))
    first = base64.b64decode(challenge.text or "").decode()
    h = dict(part.split("=", 1) for part in first.split(","))["h"]
    hash_name = "sha1" if mechanism.startswith("SCRAM-SHA-1") else "sha256"
    assert h == downgrade_protection(hash_name, advertised, bindings or None)  # no MITM here
    scram.set_server_first(first)
    await client.send(f"<response xmlns='{S2}'>{b64(scram.get_client_final().encode())}"
                      "</response>")
    success = await client.next()
    assert success.tag == q(S2, "success"), etree.tostring(success)
    scram.set_server_final(base64.b64decode(success.findtext(q(S2, "additional-data")) or "")
                           .decode())
    after = await client.expect(f"{{{STREAMS}}}features")
    return success, after


async def ping(client: RawClient, ident: str = "p1") -> None:
    reply = await client.ask(f"<iq type='get' id='{ident}' to='a.test'>"
                             "<ping xmlns='urn:xmpp:ping'/></iq>", skip_others=True)
    assert reply.get("type") == "result" and reply.get("id") == ident, etree.tostring(reply)


async def test_sasl2_scram_bind2_login(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    success, after = await scram_sasl2(client)
    jid = success.findtext(q(S2, "authorization-identifier")) or ""
    assert jid.startswith("alice@a.test/Test/") and UA not in jid
    assert success.find(q(B2, "bound")) is not None
    assert after.find(q(ns.BIND, "bind")) is None  # bound already; no restart either
    assert after.find(q(SM, "sm")) is not None
    await ping(client)
    # the same client again: the same resource, and the earlier session ends (XEP-0386 §3.2)
    again = await server.raw()
    success2, _after = await scram_sasl2(again)
    assert success2.findtext(q(S2, "authorization-identifier")) == jid
    assert await client.stream_error() == "conflict"
    await ping(again, "p2")
    # another device of the same user: another resource
    other = await server.raw()
    success3, _after = await scram_sasl2(other, user_agent=str(uuid.uuid4()))
    assert success3.findtext(q(S2, "authorization-identifier")) != jid
    await again.close()
    await other.close()


async def test_sasl2_without_bind_then_rfc6120_bind_and_plus(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    success, after = await scram_sasl2(client, mechanism="SCRAM-SHA-256-PLUS", bind=None)
    assert success.findtext(q(S2, "authorization-identifier")) == "alice@a.test"
    assert after.find(q(ns.BIND, "bind")) is not None
    reply = await client.ask(f"<iq type='set' id='b1'><bind xmlns='{ns.BIND}'>"
                             "<resource>desk</resource></bind></iq>")
    assert reply.findtext(f".//{q(ns.BIND, 'jid')}") == "alice@a.test/desk"
    await ping(client)
    await client.close()


async def test_sasl2_wrong_password(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    await secure(client)
    scram = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "wrong")
    await client.send(etree.tostring(authenticate("SCRAM-SHA-256",
                                                  scram.get_client_first().encode(),
                                                  bind="<tag>Test</tag>")))
    challenge = await client.expect(q(S2, "challenge"))
    scram.set_server_first(base64.b64decode(challenge.text or "").decode())
    await client.send(f"<response xmlns='{S2}'>{b64(scram.get_client_final().encode())}"
                      "</response>")
    failure = await client.expect(q(S2, "failure"))
    assert failure.find(q(SASL, "not-authorized")) is not None
    assert server.server.sessions.resources(JID.parse("alice@a.test")) == []
    await client.close()


async def test_inline_sm_enable(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    success, _after = await scram_sasl2(
        client, bind=f"<tag>Test</tag><enable xmlns='{SM}' resume='true'/>")
    enabled = success.find(f"{q(B2, 'bound')}/{q(SM, 'enabled')}")
    assert enabled is not None and enabled.get("resume") == "true" and enabled.get("id")
    await ping(client)
    await client.send(f"<r xmlns='{SM}'/>")
    ack = await client.expect(q(SM, "a"))
    assert ack.get("h") == "1"  # the ping counted: SM was on from the bind
    await client.close()


async def test_inline_carbons_enable_fires_the_hook(server: RunningServer) -> None:
    """bind2/enable reaches the modules with the session and the element (the carbons module
    answers it for <enable xmlns='urn:xmpp:carbons:2'/>; here a recorder stands beside)."""
    await server.add_user("alice@a.test")
    seen: list[tuple[str, str]] = []

    def record(session: object, element: etree._Element) -> None:
        seen.append((getattr(session, "jid_str", ""), element.tag))
    server.server.hooks.add("bind2/enable", record, priority=1000)
    client = await server.raw()
    success, _after = await scram_sasl2(client, bind=f"<tag>Test</tag><enable xmlns='{CARBONS}'/>")
    jid = success.findtext(q(S2, "authorization-identifier"))
    assert seen == [(jid, q(CARBONS, "enable"))]
    await client.close()


async def test_inline_resume_after_tcp_drop(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    bob = await server.raw_login("bob@a.test")
    alice = await server.raw()
    success, _after = await scram_sasl2(
        alice, bind=f"<tag>Test</tag><enable xmlns='{SM}' resume='true'/>")
    jid = success.findtext(q(S2, "authorization-identifier")) or ""
    previd = success.find(f"{q(B2, 'bound')}/{q(SM, 'enabled')}").get("id")
    await bob.send(f"<message to='{jid}' type='chat' id='m1'><body>one</body></message>")
    first = await alice.next_of("message")
    assert first.findtext(f"{{{CLIENT}}}body") == "one"
    alice.writer.transport.abort()  # the TCP connection drops; nothing acknowledged
    await bob.send(f"<message to='{jid}' type='chat' id='m2'><body>two</body></message>")
    await ping(bob, "pb")
    back = await server.raw()
    success, _after = await scram_sasl2(
        back, bind="<tag>Test</tag>", extra=f"<resume xmlns='{SM}' previd='{previd}' h='0'/>")
    resumed = success.find(q(SM, "resumed"))
    assert resumed is not None and resumed.get("previd") == previd, etree.tostring(success)
    assert success.findtext(q(S2, "authorization-identifier")) == jid
    assert success.find(q(B2, "bound")) is None  # XEP-0386: no bind after a resumption
    bodies = [(await back.next_of("message")).findtext(f"{{{CLIENT}}}body") for _ in range(2)]
    assert bodies == ["one", "two"]  # redelivered after <success/> and the features
    await back.send(f"<r xmlns='{SM}'/>")
    await back.expect(q(SM, "a"))
    await back.close()
    await bob.close()


async def fast_login(client: RawClient, token: str, mechanism: str = "HT-SHA-256-NONE", *,
                     fast: str = f"<fast xmlns='{FAST}'/>", user_agent: str = UA,
                     extra: str = "") -> etree._Element:
    await secure(client)
    cb = end_point(client) if mechanism == "HT-SHA-256-ENDP" else b""
    proof = hmac.digest(token.encode(), b"Initiator" + cb, "sha256")
    await client.send(etree.tostring(authenticate(
        mechanism, b"alice\0" + proof, user_agent=user_agent, bind="<tag>Test</tag>",
        extra=fast + extra)))
    answer = await client.next()
    if answer.tag == q(S2, "success"):
        responder = base64.b64decode(answer.findtext(q(S2, "additional-data")) or "")
        assert responder == hmac.digest(token.encode(), b"Responder" + cb, "sha256")
        await client.expect(f"{{{STREAMS}}}features")
    return answer


async def test_fast_token_then_fast_login_then_passwd(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    success, _after = await scram_sasl2(
        client, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-ENDP'/>")
    token_el = success.find(q(FAST, "token"))
    assert token_el is not None, etree.tostring(success)
    token, expiry = token_el.get("token", ""), token_el.get("expiry", "")
    assert len(token) >= 32 and expiry.endswith("Z")
    await client.close()
    # the token is not in the database, nor anything it could be computed from
    rows = await server.server.storage.db.fetch("SELECT * FROM fast_tokens")
    assert len(rows) == 1 and not any(token.encode() in bytes(v) if isinstance(v, bytes)
                                      else token in str(v) for v in rows[0])
    fast = await server.raw()
    answer = await fast_login(fast, token, "HT-SHA-256-ENDP")
    assert answer.tag == q(S2, "success"), etree.tostring(answer)
    assert (answer.findtext(q(S2, "authorization-identifier")) or "").startswith(
        "alice@a.test/Test/")
    await ping(fast)
    await fast.close()
    # XEP-0484 §3.4: bound to its mechanism; another client id has no token
    for mechanism, ua in (("HT-SHA-256-NONE", UA), ("HT-SHA-256-ENDP", str(uuid.uuid4()))):
        other = await server.raw()
        refused = await fast_login(other, token, mechanism, user_agent=ua)
        assert refused.tag == q(S2, "failure") and refused.find(q(SASL, "not-authorized")) \
            is not None
        await other.close()
    # presenced passwd (while the server runs) ends every token of the account
    result = subprocess.run(
        [sys.executable, "-m", "server", "passwd", "alice@a.test", "-p", "n3w-password", "-c",
         str(server.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    after_passwd = await server.raw()
    refused = await fast_login(after_passwd, token, "HT-SHA-256-ENDP")
    assert refused.tag == q(S2, "failure"), etree.tostring(refused)
    assert refused.find(q(SASL, "not-authorized")) is not None
    await after_passwd.close()
    fresh = await server.raw()
    success, _after = await scram_sasl2(fresh, password="n3w-password")
    await fresh.close()


async def test_fast_none_and_invalidate(server: RunningServer) -> None:
    await server.add_user("alice@a.test")
    client = await server.raw()
    success, _after = await scram_sasl2(
        client, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>")
    token = success.find(q(FAST, "token")).get("token", "")
    await client.close()
    logout = await server.raw()
    answer = await fast_login(logout, token, fast=f"<fast xmlns='{FAST}' invalidate='true'/>")
    assert answer.tag == q(S2, "success") and answer.find(q(FAST, "token")) is None
    await logout.close()
    again = await server.raw()
    refused = await fast_login(again, token)
    assert refused.tag == q(S2, "failure")
    await again.close()


async def test_fast_rotation_keeps_the_old_token_until_the_new_one_is_used(
        tmp_path: Path) -> None:
    """XEP-0484 §3.5 with two slots (§5.1): a rotated token stays valid until its successor
    is used; an unused successor is replaced by the next one."""
    running = await start_server(tmp_path, "[fast]\nrotate_after = 0.001\n")
    try:
        await running.add_user("alice@a.test")
        client = await running.raw()
        success, _after = await scram_sasl2(
            client, extra=f"<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/>")
        await client.close()
        tokens = [success.find(q(FAST, "token")).get("token", "")]

        async def use(token: str) -> str | None:
            """A FAST login: the rotated token it brought, or None when refused."""
            conn = await running.raw()
            await asyncio.sleep(1.05)  # older than rotate_after (tokens keep whole seconds)
            answer = await fast_login(conn, token)
            await conn.close()
            if answer.tag != q(S2, "success"):
                return None
            new = answer.find(q(FAST, "token"))
            assert new is not None, etree.tostring(answer)  # due for rotation: a new one
            return new.get("token", "")
        t1 = tokens[0]
        t2 = await use(t1)             # t1 becomes current; t2 waits in 'new'
        assert t2 is not None and t2 != t1
        t3 = await use(t1)             # t1 still good (t2 may never have arrived); t3 replaces t2
        assert t3 is not None and t3 not in (t1, t2)
        assert await use(t2) is None   # replaced before it was ever used
        t4 = await use(t3)             # t3 used: now the current one, t1 is gone
        assert t4 is not None
        assert await use(t1) is None
        assert await use(t3) is not None
    finally:
        await stop_server(running)


async def test_inline_carbons_enable_gets_carbons(server: RunningServer) -> None:
    """Carbons enabled inline in Bind 2 (XEP-0386 §3) work like the iq (XEP-0280): a message
    to the account's other resource comes to this one as a <received/> copy."""
    await server.add_user("alice@a.test")
    await server.add_user("bob@a.test")
    phone = await server.raw()
    await scram_sasl2(phone, bind=f"<tag>Phone</tag><enable xmlns='{CARBONS}'/>")
    await ping(phone)
    desk = await server.raw_login("alice@a.test", "desk")
    await desk.send("<presence/>")
    bob = await server.raw_login("bob@a.test")
    await bob.send("<message to='alice@a.test/desk' type='chat' id='c1'><body>hi</body></message>")
    copy = await phone.next_of("message")
    received = copy.find(q(CARBONS, "received"))
    assert received is not None, etree.tostring(copy)
    inner = received.find("{urn:xmpp:forward:0}forwarded/" + q(CLIENT, "message"))
    assert inner is not None and inner.findtext(q(CLIENT, "body")) == "hi"
    assert inner.get("to") == "alice@a.test/desk"
