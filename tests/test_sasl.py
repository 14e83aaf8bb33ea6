"""SASL machine (server/stream/sasl.py): scramp and hand-rolled clients, every failure path."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
import scramp

from server.storage.base import Credentials
from server.stream import scram
from server.stream.sasl import (
    FAILURE_CONDITIONS,
    Challenge,
    Failure,
    NeedCredentials,
    SaslServer,
    Step,
    Success,
    offered_mechanisms,
)
from tests.test_scram import RFC5802, RFC7677, HandClient

EXPORTER = b"\x11" * 32       # what the TLS layer would export (RFC 9266)
END_POINT = b"\x22" * 32      # hash of the server certificate (RFC 5929)
CREDS = scram.derive_credentials("pencil")
ALL = offered_mechanisms(tls=True, channel_bindings=["tls-exporter", "tls-server-end-point"],
                         allow_plain=True)
SCRAM_MECHANISMS = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1"]


def bindings(exporter: bytes | None = EXPORTER,
             end_point: bytes | None = END_POINT) -> Callable[[str], bytes | None]:
    table = {"tls-exporter": exporter, "tls-server-end-point": end_point,
             "tls-unique": b"never asked for"}
    return table.get


def make(mechanisms: list[str] | None = None, *, tls: bool = True,
         binding: Callable[[str], bytes | None] | None = None, **kw: object) -> SaslServer:
    return SaslServer(ALL if mechanisms is None else mechanisms,
                      bindings() if binding is None else binding, tls=tls, **kw)  # type: ignore[arg-type]


def scramp_exchange(server: SaslServer, client: scramp.ScramClient,
                    credentials: Credentials | None, *, initial: bool = True) -> Step:
    """Drive a scramp client through the machine; returns the last step."""
    first = client.get_client_first().encode()
    if initial:
        step = server.start(client.mechanism_name, first)
    else:
        assert server.start(client.mechanism_name, None) == Challenge(b"")
        step = server.respond(first)
    assert isinstance(step, NeedCredentials), step
    step = server.provide_credentials(credentials)
    assert isinstance(step, Challenge), step
    client.set_server_first(step.data.decode())
    step = server.respond(client.get_client_final().encode())
    if isinstance(step, Success):
        assert step.data is not None
        client.set_server_final(step.data.decode())  # raises unless the server proved itself
    return step


def hand_exchange(server: SaslServer, mechanism: str, client: HandClient,
                  credentials: Credentials | None = CREDS) -> Step:
    step = server.start(mechanism, client.first())
    if not isinstance(step, NeedCredentials):
        return step
    step = server.provide_credentials(credentials)
    assert isinstance(step, Challenge), step
    return server.respond(client.final(step.data))


def salt_and_iterations(challenge: Step) -> tuple[bytes, str]:
    assert isinstance(challenge, Challenge)
    attrs = dict(p.split("=", 1) for p in challenge.data.decode().split(","))
    return base64.b64decode(attrs["s"]), attrs["i"]


# -- offered_mechanisms ------------------------------------------------------------------------

@pytest.mark.parametrize(("tls", "cbs", "plain", "expected"), [
    (True, ["tls-exporter"], True,
     ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]),
    (True, ["tls-exporter", "tls-server-end-point"], False,
     ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1"]),
    (True, [], True, ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]),
    (True, ["tls-unique"], True, ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]),  # can't check it
    (False, ["tls-exporter"], True, ["SCRAM-SHA-256", "SCRAM-SHA-1"]),
    (False, [], False, ["SCRAM-SHA-256", "SCRAM-SHA-1"]),
])
def test_offered_mechanisms(tls: bool, cbs: list[str], plain: bool, expected: list[str]) -> None:
    assert offered_mechanisms(tls=tls, channel_bindings=cbs, allow_plain=plain) == expected


# -- scramp as the client ----------------------------------------------------------------------

def scramp_client(mechanism: str, password: str = "pencil", user: str = "user",
                  cb: tuple[str, bytes] | None = None) -> scramp.ScramClient:
    if mechanism.endswith("-PLUS") and cb is None:
        cb = ("tls-server-end-point", END_POINT)
    return scramp.ScramClient([mechanism], user, password, channel_binding=cb)


@pytest.mark.parametrize("mechanism", SCRAM_MECHANISMS)
@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "empty-challenge"])
def test_scramp_success(mechanism: str, initial: bool) -> None:
    step = scramp_exchange(make(), scramp_client(mechanism), CREDS, initial=initial)
    assert isinstance(step, Success) and step.username == "user"


@pytest.mark.parametrize("mechanism", SCRAM_MECHANISMS)
def test_scramp_wrong_password_and_unknown_user_look_alike(mechanism: str) -> None:
    wrong = scramp_exchange(make(), scramp_client(mechanism, "pencil2"), CREDS)
    unknown = scramp_exchange(make(), scramp_client(mechanism, user="nobody"), None)
    assert wrong == unknown == Failure("not-authorized", "invalid proof", b"e=invalid-proof")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_unknown_user_challenge_looks_real(mechanism: str) -> None:
    iterations = 10000
    real = scram.derive_credentials("pencil", iterations)

    def challenge(user: str, credentials: Credentials | None,
                  mech: str = mechanism) -> tuple[bytes, str]:
        server = make(iterations=iterations)
        assert isinstance(server.start(mech, scramp_client(mech, user=user)
                                       .get_client_first().encode()), NeedCredentials)
        return salt_and_iterations(server.provide_credentials(credentials))

    real_salt, real_iterations = challenge("user", real)
    fake_salt, fake_iterations = challenge("nobody", None)
    assert fake_iterations == real_iterations == "10000"
    assert len(fake_salt) == len(real_salt)
    # the same name keeps its salt, as a real account does, also under another spelling
    assert challenge("nobody", None)[0] == challenge("NoBody", None)[0] == fake_salt
    assert challenge("nobody2", None)[0] != fake_salt
    # and the two hashes have different salts, as derive_credentials gives real accounts
    other = "SCRAM-SHA-1" if mechanism == "SCRAM-SHA-256" else "SCRAM-SHA-256"
    assert challenge("nobody", None, other)[0] != fake_salt


def test_scramp_non_ascii_password() -> None:
    creds = scram.derive_credentials("p\u00e4ssw\u00f6rd\u00a0\u00df")
    step = scramp_exchange(make(), scramp_client("SCRAM-SHA-256", "pa\u0308sswo\u0308rd \u00df"),
                           creds)
    assert isinstance(step, Success)


def test_scramp_saslname_escaping() -> None:
    creds = scram.derive_credentials("pencil")
    client = scramp_client("SCRAM-SHA-1", user="we,ird=name")
    assert "n=we=2Cird=3Dname," in client.get_client_first()
    client = scramp_client("SCRAM-SHA-1", user="we,ird=name")
    step = scramp_exchange(make(), client, creds)
    assert step == Success("we,ird=name", step.data if isinstance(step, Success) else None)


def test_scramp_plus_with_wrong_binding_data() -> None:
    client = scramp_client("SCRAM-SHA-256-PLUS", cb=("tls-server-end-point", b"\x33" * 32))
    step = scramp_exchange(make(), client, CREDS)
    assert step == Failure("not-authorized", "channel bindings don't match",
                           b"e=channel-bindings-dont-match")


def test_scramp_downgrade_detected() -> None:
    """A client able to bind that did not see -PLUS sends 'y'; we did offer -PLUS."""
    first = scramp_client("SCRAM-SHA-256", cb=("tls-server-end-point", END_POINT)
                          ).get_client_first()
    assert first.startswith("y,,")
    step = make().start("SCRAM-SHA-256", first.encode())
    assert step == Failure("not-authorized", "channel binding downgrade detected",
                           b"e=server-does-support-channel-binding")


@pytest.mark.parametrize(("mechanisms", "binding", "tls"), [
    (["SCRAM-SHA-256", "SCRAM-SHA-1"], None, True),           # we did not advertise -PLUS
    (ALL, bindings(None, None), True),                        # no binding on this channel
    (ALL, None, False),                                       # no TLS at all
])
def test_y_flag_accepted_without_offered_binding(mechanisms: list[str],
                                                 binding: Callable[[str], bytes | None] | None,
                                                 tls: bool) -> None:
    client = scramp_client("SCRAM-SHA-256", cb=("tls-server-end-point", END_POINT))
    step = scramp_exchange(make(mechanisms, binding=binding, tls=tls), client, CREDS)
    assert isinstance(step, Success)


# -- tls-exporter, hand-rolled -----------------------------------------------------------------

@pytest.mark.parametrize(("mechanism", "hash_name"), [("SCRAM-SHA-256-PLUS", "sha256"),
                                                      ("SCRAM-SHA-1-PLUS", "sha1")])
def test_tls_exporter_success(mechanism: str, hash_name: str) -> None:
    client = HandClient(hash_name, "user", "pencil", cb_name="tls-exporter", cb_data=EXPORTER)
    step = hand_exchange(make(), mechanism, client)
    assert isinstance(step, Success) and step.data is not None and client.verify(step.data)


def test_tls_exporter_other_data_fails() -> None:
    # e.g. a man in the middle: the client's TLS session exports something else
    client = HandClient("sha256", "user", "pencil", cb_name="tls-exporter", cb_data=b"\x99" * 32)
    assert hand_exchange(make(), "SCRAM-SHA-256-PLUS", client) == Failure(
        "not-authorized", "channel bindings don't match", b"e=channel-bindings-dont-match")


def test_tls_exporter_unavailable() -> None:
    # TLS 1.2 without extended master secret: only tls-server-end-point exists
    server = make(binding=bindings(exporter=None))
    client = HandClient("sha256", "user", "pencil", cb_name="tls-exporter", cb_data=EXPORTER)
    assert hand_exchange(server, "SCRAM-SHA-256-PLUS", client) == Failure(
        "malformed-request", "channel binding tls-exporter is not supported",
        b"e=unsupported-channel-binding-type")


def test_unknown_binding_type() -> None:
    client = HandClient("sha256", "user", "pencil", cb_name="tls-unique",
                        cb_data=b"never asked for")
    step = hand_exchange(make(), "SCRAM-SHA-256-PLUS", client)
    assert isinstance(step, Failure) and step.data == b"e=unsupported-channel-binding-type"


def test_y_flag_after_a_try_with_a_binding_we_lack() -> None:
    """Issue 19 item 6: slixmpp 1.8 tries -PLUS with tls-unique (TLS 1.3 has none), then 'y'.
    The failed try marks the exchange; the stream's next exchange, told so, takes 'y'."""
    tried = make()
    client = HandClient("sha256", "user", "pencil", cb_name="tls-unique",
                        cb_data=b"never asked for")
    assert isinstance(hand_exchange(tried, "SCRAM-SHA-256-PLUS", client), Failure)
    assert tried.binding_unusable
    y_client = scramp_client("SCRAM-SHA-256", cb=("tls-server-end-point", END_POINT))
    step = scramp_exchange(make(binding_unusable=True), y_client, CREDS)
    assert isinstance(step, Success)
    # Failures for other reasons mark nothing: 'y' after them is still a downgrade.
    for reason in (bindings(None, None), None):  # no binding at all; the wrong data
        other = make(binding=reason)
        wrong = HandClient("sha256", "user", "pencil", cb_name="tls-server-end-point",
                           cb_data=b"\x33" * 32)
        assert isinstance(hand_exchange(other, "SCRAM-SHA-256-PLUS", wrong), Failure)
        assert not other.binding_unusable


def test_plus_without_any_binding() -> None:
    server = make(binding=bindings(None, None))
    client = HandClient("sha256", "user", "pencil", cb_name="tls-exporter", cb_data=EXPORTER)
    step = hand_exchange(server, "SCRAM-SHA-256-PLUS", client)
    assert step == Failure("malformed-request", "no channel binding on this connection",
                           b"e=channel-binding-not-supported")


def test_bindings_not_consulted_without_tls() -> None:
    asked: list[str] = []

    def binding(kind: str) -> bytes | None:
        asked.append(kind)
        return EXPORTER

    client = HandClient("sha256", "user", "pencil", flag="y")
    assert isinstance(hand_exchange(make(binding=binding, tls=False), "SCRAM-SHA-256", client),
                      Success)
    assert asked == []


def test_plus_flag_mismatches() -> None:
    client = HandClient("sha256", "user", "pencil", cb_name="tls-exporter", cb_data=EXPORTER)
    step = hand_exchange(make(), "SCRAM-SHA-256", client)
    assert isinstance(step, Failure) and step.condition == "malformed-request"
    client = HandClient("sha256", "user", "pencil")
    step = hand_exchange(make(), "SCRAM-SHA-256-PLUS", client)
    assert isinstance(step, Failure) and step.condition == "malformed-request"


# -- RFC vectors through the whole machine -----------------------------------------------------

@pytest.mark.parametrize("vector", [RFC5802, RFC7677], ids=["rfc5802", "rfc7677"])
def test_rfc_vectors(vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scram, "server_nonce", lambda: vector["server_nonce"])
    salt = base64.b64decode(vector["salt"])
    creds = Credentials(sha1=scram.derive_keys("pencil", "sha1", salt=salt),
                        sha256=scram.derive_keys("pencil", "sha256", salt=salt))
    mechanism = "SCRAM-SHA-1" if vector["hash"] == "sha1" else "SCRAM-SHA-256"
    server = make()
    assert server.start(mechanism, None) == Challenge(b"")
    assert server.respond(vector["client_first"]) == NeedCredentials("user")
    assert server.provide_credentials(creds) == Challenge(vector["server_first"])
    assert server.respond(vector["client_final"]) == Success("user", vector["server_final"])


# -- mechanism selection -----------------------------------------------------------------------

@pytest.mark.parametrize(("mechanisms", "mechanism", "condition"), [
    (ALL, "X-UNKNOWN", "invalid-mechanism"),
    (ALL, "scram-sha-256", "invalid-mechanism"),     # names are case-sensitive
    (ALL, "", "invalid-mechanism"),
    (["SCRAM-SHA-256", "SCRAM-SHA-1"], "PLAIN", "invalid-mechanism"),
    (["SCRAM-SHA-256", "SCRAM-SHA-1"], "SCRAM-SHA-256-PLUS", "invalid-mechanism"),
    (["EXTERNAL", "SCRAM-SHA-1"], "EXTERNAL", "invalid-mechanism"),  # not implemented here
])
def test_invalid_mechanism(mechanisms: list[str], mechanism: str, condition: str) -> None:
    server = make(mechanisms)
    step = server.start(mechanism, b"n,,n=user,r=abc")
    assert isinstance(step, Failure) and step.condition == condition
    assert server.respond(b"n,,n=user,r=abc") == Failure("malformed-request",
                                                         "no response is expected now")


def test_plain_needs_tls() -> None:
    step = make(["PLAIN"], tls=False).start("PLAIN", b"\0user\0pencil")
    assert step == Failure("encryption-required", "PLAIN needs TLS")


# -- PLAIN -------------------------------------------------------------------------------------

def plain(message: bytes, credentials: Credentials | None = CREDS, *,
          domain: str | None = None) -> Step:
    server = make(domain=domain)
    step = server.start("PLAIN", message)
    if isinstance(step, NeedCredentials):
        return server.provide_credentials(credentials)
    return step


@pytest.mark.parametrize("message", [
    b"\0user\0pencil",
    b"user\0user\0pencil",
    b"user@example.com\0user\0pencil",
    b"User@EXAMPLE.com\0user\0pencil",     # the JID module's normalisation applies
])
def test_plain_success(message: bytes) -> None:
    assert plain(message, domain="example.com") == Success("user", None)


def test_plain_username_as_sent() -> None:
    assert plain(b"\0User\0pencil") == Success("User", None)  # the caller normalises


def test_plain_non_ascii_password() -> None:
    creds = scram.derive_credentials("p\u00e4ssw\u00f6rd")
    assert plain("\0user\0pa\u0308sswo\u0308rd".encode(), creds) == Success("user", None)


def test_plain_empty_challenge_first() -> None:
    server = make()
    assert server.start("PLAIN", None) == Challenge(b"")
    assert server.respond(b"\0user\0pencil") == NeedCredentials("user")
    assert server.provide_credentials(CREDS) == Success("user", None)


@pytest.mark.parametrize("message", [
    b"user\0other\0pencil",
    b"other@example.com\0user\0pencil",
    b"user@elsewhere.example\0user\0pencil",   # another domain
    b"user@example.com/res\0user\0pencil",      # a full JID
    b"@example.com\0user\0pencil",
    b"example.com\0user\0pencil",
])
def test_plain_invalid_authzid(message: bytes) -> None:
    assert plain(message, domain="example.com") == Failure(
        "invalid-authzid", "authorization identity is not the user's")


def test_plain_authzid_domain_unchecked_without_domain() -> None:
    assert plain(b"user@anywhere.example\0user\0pencil") == Success("user", None)


def test_plain_wrong_password_and_unknown_user_look_alike() -> None:
    wrong = plain(b"\0user\0pencil2")
    unknown = plain(b"\0nobody\0pencil", None)
    assert wrong == unknown == Failure("not-authorized", "wrong username or password")
    # a known user's password is no key to an unknown one
    assert plain(b"\0nobody\0pencil", None) == unknown


@pytest.mark.parametrize("message", [
    b"",
    b"user",
    b"\0user",
    b"\0user\0",
    b"\0\0pencil",
    b"\0user\0pencil\0",
    b"\0user\0pen\0cil",
    b"\0us\xffer\0pencil",
    b"\xff\0user\0pencil",
])
def test_plain_malformed(message: bytes) -> None:
    step = plain(message)
    assert isinstance(step, Failure) and step.condition == "malformed-request"


def test_plain_unpreparable_password() -> None:
    assert plain(b"\0user\0pen\x07cil") == Failure("not-authorized",
                                                    "wrong username or password")


# -- SCRAM authzid -----------------------------------------------------------------------------

@pytest.mark.parametrize(("authzid", "ok"), [
    ("user", True),
    ("user@example.com", True),
    ("USER@example.com", True),
    ("other@example.com", False),
    ("user@other.example", False),
    ("user@example.com/phone", False),
    ("other", False),
])
def test_scram_authzid(authzid: str, ok: bool) -> None:
    client = HandClient("sha256", "user", "pencil", authzid=authzid)
    step = hand_exchange(make(domain="example.com"), "SCRAM-SHA-256", client)
    if ok:
        assert isinstance(step, Success) and step.username == "user"
    else:
        assert step == Failure("invalid-authzid", "authorization identity is not the user's")


def test_scram_malformed_first_message() -> None:
    step = make().start("SCRAM-SHA-256", b"n,,n=us=41er,r=abc")
    assert step == Failure("malformed-request", "bad '=' escape in saslname",
                           b"e=invalid-username-encoding")
    step = make().start("SCRAM-SHA-256", b"")  # '=' from the client: empty initial response
    assert isinstance(step, Failure) and step.condition == "malformed-request"
    step = make().start("SCRAM-SHA-1", b"n,,m=x,n=user,r=abc")
    assert isinstance(step, Failure) and step.data == b"e=extensions-not-supported"


def test_scram_tampered_nonce() -> None:
    server = make()
    client = HandClient("sha256", "user", "pencil")
    server.start("SCRAM-SHA-256", client.first())
    challenge = server.provide_credentials(CREDS)
    assert isinstance(challenge, Challenge)
    step = server.respond(client.final(challenge.data, nonce=client.nonce + "mine"))
    assert step == Failure("not-authorized", "nonce mismatch", b"e=other-error")


# -- order of steps ----------------------------------------------------------------------------

def test_steps_after_success() -> None:
    server = make()
    assert isinstance(scramp_exchange(server, scramp_client("SCRAM-SHA-256"), CREDS), Success)
    assert server.respond(b"") == Failure("malformed-request", "no response is expected now")
    assert server.provide_credentials(CREDS) == Failure("malformed-request",
                                                        "no credentials were asked for")
    assert server.start("SCRAM-SHA-256", None) == Failure("malformed-request",
                                                          "an exchange was already started")


def test_steps_after_failure() -> None:
    server = make()
    step = scramp_exchange(server, scramp_client("SCRAM-SHA-256", "wrong"), CREDS)
    assert isinstance(step, Failure)
    step = server.respond(b"c=biws,r=x,p=AAAA")
    assert step == Failure("malformed-request", "no response is expected now")


def test_response_while_credentials_pending() -> None:
    server = make()
    assert isinstance(server.start("PLAIN", b"\0user\0pencil"), NeedCredentials)
    assert server.respond(b"\0user\0pencil") == Failure("malformed-request",
                                                        "no response is expected now")
    # the exchange is over: credentials arriving late do not log anyone in
    assert isinstance(server.provide_credentials(CREDS), Failure)


def test_credentials_before_asked() -> None:
    server = make()
    assert server.provide_credentials(CREDS) == Failure("malformed-request",
                                                        "no credentials were asked for")
    server = make()
    assert server.start("SCRAM-SHA-256", None) == Challenge(b"")
    assert isinstance(server.provide_credentials(CREDS), Failure)


@pytest.mark.parametrize("stage", ["started", "credentials", "final"])
def test_abort(stage: str) -> None:
    server = make()
    client = HandClient("sha256", "user", "pencil")
    if stage == "started":
        server.start("SCRAM-SHA-256", None)
    else:
        server.start("SCRAM-SHA-256", client.first())
        if stage == "final":
            server.provide_credentials(CREDS)
    assert server.abort() == Failure("aborted")
    assert isinstance(server.respond(client.first()), Failure)
    assert isinstance(server.provide_credentials(CREDS), Failure)


def test_caller_failure() -> None:
    server = make()
    assert isinstance(server.start("PLAIN", b"\0user\0pencil"), NeedCredentials)
    # the account store is down
    assert server.fail("temporary-auth-failure") == Failure("temporary-auth-failure")
    assert isinstance(server.provide_credentials(CREDS), Failure)


@pytest.mark.parametrize("condition", sorted(FAILURE_CONDITIONS))
def test_failure_conditions(condition: str) -> None:
    assert make().fail(condition, "why").condition == condition


def test_failure_conditions_are_rfc6120() -> None:
    assert len(FAILURE_CONDITIONS) == 11
    with pytest.raises(ValueError):
        Failure("bad-auth")
    with pytest.raises(ValueError):
        make().fail("internal-server-error")
