"""SCRAM server (server/stream/scram.py): RFC 5802 / RFC 7677 vectors, key derivation, parsing.

HandClient is an RFC 5802 client written from the RFC alone (scramp cannot do tls-exporter);
tests/test_sasl.py uses it too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest
from scramp.utils import saslprep

from server.storage.base import ScramKeys
from server.stream import scram
from server.stream.scram import (
    MIN_ITERATIONS,
    ScramError,
    ScramServer,
    derive_credentials,
    derive_keys,
    fake_keys,
    verify_password,
)


def escape(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


class HandClient:
    """Client side of one SCRAM exchange, straight from RFC 5802 §3 and §7."""

    def __init__(self, hash_name: str, username: str, password: str, *, flag: str = "n",
                 cb_name: str | None = None, cb_data: bytes = b"", authzid: str | None = None,
                 nonce: str = "clientnonce0123456789", first_extension: str = "") -> None:
        self.hash_name = hash_name
        self.username = username
        self.password = password
        cbind_flag = f"p={cb_name}" if cb_name is not None else flag
        self.gs2_header = f"{cbind_flag},{'a=' + escape(authzid) if authzid else ''},"
        self.cb_data = cb_data
        self.nonce = nonce
        self.first_extension = first_extension
        self.server_signature = b""

    @property
    def first_bare(self) -> str:
        return f"n={escape(self.username)},r={self.nonce}{self.first_extension}"

    def first(self) -> bytes:
        return (self.gs2_header + self.first_bare).encode()

    def final(self, server_first: bytes, *, cbind_input: bytes | None = None,
              nonce: str | None = None, extension: str = "") -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce) and len(attrs["r"]) > len(self.nonce)
        salted = hashlib.pbkdf2_hmac(self.hash_name, saslprep(self.password).encode(),
                                     base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", self.hash_name).digest()
        stored_key = hashlib.new(self.hash_name, client_key).digest()
        server_key = hmac.new(salted, b"Server Key", self.hash_name).digest()
        if cbind_input is None:
            cbind_input = self.gs2_header.encode() + self.cb_data
        without_proof = (f"c={base64.b64encode(cbind_input).decode()},"
                         f"r={attrs['r'] if nonce is None else nonce}{extension}")
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, self.hash_name).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac.new(server_key, auth_message, self.hash_name).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> bool:
        return server_final == b"v=" + base64.b64encode(self.server_signature)


def make_server(hash_name: scram.HashName = "sha256", *, plus: bool = False,
                bindings: dict[str, bytes] | None = None, offered: bool = False,
                nonce: str | None = None) -> ScramServer:
    return ScramServer(hash_name, plus=plus, channel_bindings=bindings or {},
                       binding_offered=offered, nonce=nonce)


def run(server: ScramServer, client: HandClient, keys: ScramKeys | None) -> bytes:
    assert server.client_first(client.first()) == client.username
    return server.client_final(client.final(server.server_first(keys)))


# -- RFC test vectors ------------------------------------------------------------------------

RFC5802: dict[str, Any] = {  # RFC 5802 §5, SCRAM-SHA-1, user/pencil
    "hash": "sha1", "salt": "QSXCR+Q6sek8bf92", "server_nonce": "3rfcNHYJY1ZVvWVs7j",
    "client_first": b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    "server_first": b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    "client_final": b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                    b"p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    "server_final": b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
}
RFC7677: dict[str, Any] = {  # RFC 7677 §3, SCRAM-SHA-256, user/pencil
    "hash": "sha256", "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
    "server_nonce": "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
    "client_first": b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_first": b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "client_final": b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    "server_final": b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}


@pytest.mark.parametrize("vector", [RFC5802, RFC7677], ids=["rfc5802", "rfc7677"])
def test_rfc_vector(vector: dict[str, Any]) -> None:
    keys = derive_keys("pencil", vector["hash"], salt=base64.b64decode(vector["salt"]))
    server = make_server(vector["hash"], nonce=vector["server_nonce"])
    assert server.client_first(vector["client_first"]) == "user"
    assert server.authzid is None
    assert server.server_first(keys) == vector["server_first"]
    assert server.client_final(vector["client_final"]) == vector["server_final"]


@pytest.mark.parametrize("vector", [RFC5802, RFC7677], ids=["rfc5802", "rfc7677"])
def test_rfc_vector_wrong_password(vector: dict[str, Any]) -> None:
    keys = derive_keys("pencil2", vector["hash"], salt=base64.b64decode(vector["salt"]))
    server = make_server(vector["hash"], nonce=vector["server_nonce"])
    server.client_first(vector["client_first"])
    assert server.server_first(keys) == vector["server_first"]  # same salt, same challenge
    with pytest.raises(ScramError) as err:
        server.client_final(vector["client_final"])
    assert (err.value.condition, err.value.server_error) == ("not-authorized", "invalid-proof")


def test_rfc_vector_tampered_proof() -> None:
    keys = derive_keys("pencil", "sha1", salt=base64.b64decode(RFC5802["salt"]))
    server = make_server("sha1", nonce=RFC5802["server_nonce"])
    server.client_first(RFC5802["client_first"])
    server.server_first(keys)
    final = RFC5802["client_final"].replace(b"p=v0X8", b"p=v0X9")
    with pytest.raises(ScramError) as err:
        server.client_final(final)
    assert err.value.server_error == "invalid-proof"


# -- keys --------------------------------------------------------------------------------------

def test_derive_keys_matches_rfc5802_definitions() -> None:
    salt = b"0123456789abcdef"
    keys = derive_keys("pencil", "sha256", salt=salt, iterations=5000)
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 5000)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert keys == ScramKeys(salt=salt, iterations=5000,
                             stored_key=hashlib.sha256(client_key).digest(),
                             server_key=hmac.new(salted, b"Server Key", "sha256").digest())


def test_derive_keys_fresh_salt() -> None:
    a, b = derive_keys("pencil", "sha1"), derive_keys("pencil", "sha1")
    assert len(a.salt) == 16 and a.salt != b.salt and a.stored_key != b.stored_key
    assert a.iterations == MIN_ITERATIONS
    assert len(a.stored_key) == len(a.server_key) == 20


@pytest.mark.parametrize(("password", "hash_name", "iterations"), [
    ("pencil", "sha256", 4095),
    ("pencil", "md5", 4096),
    ("", "sha256", 4096),             # OpaqueString: empty is not a password
    ("bell\x07", "sha256", 4096),     # control characters are disallowed
])
def test_derive_keys_rejects(password: str, hash_name: str, iterations: int) -> None:
    with pytest.raises(ValueError):
        derive_keys(password, hash_name, iterations=iterations)  # type: ignore[arg-type]


def test_derive_credentials() -> None:
    creds = derive_credentials("pencil", 5000)
    assert len(creds.sha1.stored_key) == 20 and len(creds.sha256.stored_key) == 32
    assert creds.sha1.iterations == creds.sha256.iterations == 5000
    assert creds.sha1.salt != creds.sha256.salt
    assert verify_password("pencil", creds.sha1) and verify_password("pencil", creds.sha256)
    assert not verify_password("Pencil", creds.sha1)
    assert not verify_password("Pencil", creds.sha256)


def test_verify_password_edge_cases() -> None:
    keys = derive_keys("pencil", "sha256")
    assert not verify_password("", keys)
    assert not verify_password("pencil\x07", keys)
    assert not verify_password("pencil ", keys)
    with pytest.raises(ValueError):
        verify_password("pencil", ScramKeys(b"s", 4096, b"x" * 16, b"y" * 16))


@pytest.mark.parametrize(("stored", "typed"), [
    ("p\u00e4ssw\u00f6rd", "pa\u0308sswo\u0308rd"),   # NFC makes the decomposed form equal
    ("correct\u00a0horse", "correct horse"),           # non-ASCII space maps to U+0020
    ("\u30d1\u30b9\u30ef\u30fc\u30c9", "\u30d1\u30b9\u30ef\u30fc\u30c9"),
])
def test_prepared_passwords(stored: str, typed: str) -> None:
    creds = derive_credentials(stored)
    assert verify_password(typed, creds.sha1) and verify_password(typed, creds.sha256)
    # and a SASLprep client (RFC 4013) derives the same keys from what the user typed
    client = HandClient("sha256", "user", typed)
    assert client.verify(run(make_server(), client, creds.sha256))


def test_fake_keys() -> None:
    a = fake_keys("ghost", "sha256")
    assert a == fake_keys("ghost", "sha256")  # stable: repeated probes see one salt
    assert a.salt != fake_keys("ghost", "sha1").salt  # like real accounts: a salt per hash
    assert a.salt != fake_keys("ghost2", "sha256").salt
    assert len(a.salt) == 16 and len(a.stored_key) == 32
    assert len(fake_keys("ghost", "sha1").stored_key) == 20
    assert fake_keys("ghost", "sha256", 10000).iterations == 10000


# -- exchange ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_exchange(hash_name: scram.HashName) -> None:
    creds = derive_credentials("secret")
    keys = creds.sha1 if hash_name == "sha1" else creds.sha256
    client = HandClient(hash_name, "user", "secret")
    assert client.verify(run(make_server(hash_name), client, keys))


def test_server_nonce_is_fresh_and_printable() -> None:
    keys = derive_keys("secret", "sha256")
    nonces = set()
    for _ in range(3):
        server = make_server()
        server.client_first(HandClient("sha256", "user", "secret").first())
        first = server.server_first(keys).decode()
        nonce = first.split(",")[0][2:]
        assert nonce.startswith("clientnonce0123456789")
        assert all("\x21" <= c <= "\x7e" and c != "," for c in nonce)
        nonces.add(nonce)
    assert len(nonces) == 3


def test_wrong_password() -> None:
    client = HandClient("sha256", "user", "wrong")
    with pytest.raises(ScramError) as err:
        run(make_server(), client, derive_keys("secret", "sha256"))
    assert (err.value.condition, err.value.server_error) == ("not-authorized", "invalid-proof")


def test_unknown_user_fails_at_proof_only() -> None:
    server = make_server()
    client = HandClient("sha256", "ghost", "secret")
    server.client_first(client.first())
    first = server.server_first(None, fake_iterations=8192)
    assert first.endswith(b",i=8192")
    with pytest.raises(ScramError) as err:
        server.client_final(client.final(first))
    assert (err.value.condition, err.value.text, err.value.server_error) == \
        ("not-authorized", "invalid proof", "invalid-proof")


def test_unknown_user_salt_uses_seed() -> None:
    def salt(username: str, seed: str | None) -> bytes:
        server = make_server()
        server.client_first(HandClient("sha256", username, "x").first())
        attrs = dict(p.split("=", 1) for p in server.server_first(None, fake_seed=seed)
                     .decode().split(","))
        return base64.b64decode(attrs["s"])
    assert salt("Ghost", "ghost") == salt("ghost", None) == fake_keys("ghost", "sha256").salt


def test_saslname_escaping() -> None:
    server = make_server()
    client = HandClient("sha256", "a,b=c", "secret", authzid="x=y,z")
    keys = derive_keys("secret", "sha256")
    assert client.first().startswith(b"n,a=x=3Dy=2Cz,n=a=2Cb=3Dc,")
    assert client.verify(run(server, client, keys))
    assert (server.username, server.authzid) == ("a,b=c", "x=y,z")


def test_extensions_after_nonce_are_ignored() -> None:
    server = make_server()
    client = HandClient("sha256", "user", "secret", first_extension=",x=ext")
    assert server.client_first(client.first()) == "user"
    client_final = client.final(server.server_first(derive_keys("secret", "sha256")))
    assert client.verify(server.client_final(client_final))


def test_client_final_extension_is_signed() -> None:
    server = make_server()
    client = HandClient("sha256", "user", "secret")
    server.client_first(client.first())
    final = client.final(server.server_first(derive_keys("secret", "sha256")),
                         extension=",x=ext")
    assert client.verify(server.client_final(final))


def _first_error(data: bytes, **kw: object) -> ScramError:
    with pytest.raises(ScramError) as err:
        make_server(**kw).client_first(data)  # type: ignore[arg-type]
    return err.value


@pytest.mark.parametrize(("data", "server_error"), [
    (b"", "other-error"),
    (b"n,,", "other-error"),
    (b"n", "other-error"),
    (b"x,,n=user,r=abc", "other-error"),              # bad gs2-cbind-flag
    (b"nn,,n=user,r=abc", "other-error"),
    (b"n,b=x,n=user,r=abc", "other-error"),           # authzid must be a=
    (b"n,a=,n=user,r=abc", "invalid-username-encoding"),
    (b"n,,r=abc,n=user", "other-error"),              # order matters
    (b"n,,n=user", "other-error"),                    # no nonce
    (b"n,,n=user,r=", "other-error"),
    (b"n,,n=,r=abc", "invalid-username-encoding"),
    (b"n,,n=us=41er,r=abc", "invalid-username-encoding"),  # '=' must be =2C or =3D
    (b"n,,n=user=2,r=abc", "invalid-username-encoding"),
    (b"n,,n=us\0er,r=abc", "invalid-username-encoding"),
    (b"n,,n=user,r=ab c", "other-error"),             # nonce must be printable
    (b"n,,n=user,r=ab\x7fc", "other-error"),
    ("n,,n=user,r=ab\u00e9".encode(), "other-error"),
    (b"n,,m=ext,n=user,r=abc", "extensions-not-supported"),
    (b"n,,n=user,r=abc,", "other-error"),
    (b"n,,n=user,r=abc,1=x", "other-error"),
    (b"n,,n=user,r=abc,xx", "other-error"),
    (b"n,,n=\xff,r=abc", "invalid-encoding"),         # not UTF-8
])
def test_malformed_client_first(data: bytes, server_error: str) -> None:
    err = _first_error(data)
    assert (err.condition, err.server_error) == ("malformed-request", server_error)


def test_non_ascii_username_is_fine() -> None:
    assert make_server().client_first("n,,n=j\u00fcrgen,r=abc".encode()) == "j\u00fcrgen"


def test_channel_binding_flag_checks() -> None:
    cb = {"tls-exporter": b"E" * 32}
    # p= with a non-PLUS mechanism
    err = _first_error(b"p=tls-exporter,,n=user,r=abc", bindings=cb, offered=True)
    assert err.condition == "malformed-request"
    # -PLUS without p=
    for flag in (b"n", b"y"):
        err = _first_error(flag + b",,n=user,r=abc", plus=True, bindings=cb, offered=True)
        assert err.condition == "malformed-request"
    # RFC 5802 §6: 'y' while we advertise binding is a downgrade
    err = _first_error(b"y,,n=user,r=abc", bindings=cb, offered=True)
    assert (err.condition, err.server_error) == \
        ("not-authorized", "server-does-support-channel-binding")
    # 'y' is honest when no binding was advertised
    assert make_server(bindings=cb, offered=False).client_first(b"y,,n=user,r=abc") == "user"
    err = _first_error(b"p=tls-unique,,n=user,r=abc", plus=True, bindings=cb, offered=True)
    assert (err.condition, err.server_error) == \
        ("malformed-request", "unsupported-channel-binding-type")
    err = _first_error(b"p=tls-exporter,,n=user,r=abc", plus=True, bindings={}, offered=False)
    assert (err.condition, err.server_error) == \
        ("malformed-request", "channel-binding-not-supported")
    err = _first_error(b"p=tls exporter,,n=user,r=abc", plus=True, bindings=cb, offered=True)
    assert err.condition == "malformed-request"


@pytest.mark.parametrize("cb_name", ["tls-exporter", "tls-server-end-point"])
def test_channel_binding_exchange(cb_name: str) -> None:
    bindings = {"tls-exporter": b"E" * 32, "tls-server-end-point": b"S" * 32}
    keys = derive_keys("secret", "sha256")
    client = HandClient("sha256", "user", "secret", cb_name=cb_name, cb_data=bindings[cb_name])
    server = make_server(plus=True, bindings=bindings, offered=True)
    assert client.verify(run(server, client, keys))
    assert server.cb_name == cb_name
    # the other binding's data, or our data under the wrong name, does not match
    other = "tls-server-end-point" if cb_name == "tls-exporter" else "tls-exporter"
    client = HandClient("sha256", "user", "secret", cb_name=cb_name, cb_data=bindings[other])
    with pytest.raises(ScramError) as err:
        run(make_server(plus=True, bindings=bindings, offered=True), client, keys)
    assert (err.value.condition, err.value.server_error) == \
        ("not-authorized", "channel-bindings-dont-match")


def _final_error(client_final: bytes | None = None, **final_kw: object) -> ScramError:
    server = make_server()
    client = HandClient("sha256", "user", "secret")
    server.client_first(client.first())
    first = server.server_first(derive_keys("secret", "sha256"))
    data = client_final if client_final is not None else client.final(first, **final_kw)  # type: ignore[arg-type]
    with pytest.raises(ScramError) as err:
        server.client_final(data)
    return err.value


def test_client_final_nonce_mismatch() -> None:
    err = _final_error(nonce="clientnonce0123456789forged")
    assert (err.condition, err.server_error) == ("not-authorized", "other-error")


def test_client_final_gs2_header_mismatch() -> None:
    # the client claims 'y' in c= after sending 'n' in client-first
    err = _final_error(cbind_input=b"y,,")
    assert err.server_error == "channel-bindings-dont-match"
    err = _final_error(cbind_input=b"n,,extra")
    assert err.server_error == "channel-bindings-dont-match"


@pytest.mark.parametrize("data", [
    b"c=biws,r=x",                 # no proof
    b"r=x,c=biws,p=AAAA",          # order
    b"c=biws,p=AAAA",              # no nonce
    b"c=bi$s,r=x,p=AAAA",          # bad base64 in c=
    b"c=biws,r=x,p=AA#A",          # bad base64 in p=
    b"c=biws,r=x,p=AAA",           # bad padding
    b"c=biws,r=x,p=AAAA,x=1",      # proof must be last
    b"c=biws,,r=x,p=AAAA",
    b"\xff",
])
def test_malformed_client_final(data: bytes) -> None:
    assert _final_error(data).condition == "malformed-request"


def test_short_proof() -> None:
    server = make_server()
    client = HandClient("sha256", "user", "secret")
    server.client_first(client.first())
    nonce = server.server_first(derive_keys("secret", "sha256")).split(b",")[0][2:]
    with pytest.raises(ScramError) as err:
        server.client_final(b"c=biws,r=" + nonce + b",p=AAAA")
    assert (err.value.condition, err.value.server_error) == ("not-authorized", "invalid-proof")


def test_out_of_order_calls() -> None:
    keys = derive_keys("secret", "sha256")
    client = HandClient("sha256", "user", "secret")
    server = make_server()
    with pytest.raises(ScramError):
        server.server_first(keys)
    with pytest.raises(ScramError):  # a failed step ended the exchange
        server.client_first(client.first())

    server = make_server()
    server.client_first(client.first())
    with pytest.raises(ScramError):
        server.client_first(client.first())

    server = make_server()
    first = (server.client_first(client.first()), server.server_first(keys))[1]
    final = client.final(first)
    assert server.client_final(final).startswith(b"v=")
    with pytest.raises(ScramError) as err:  # no replay after success
        server.client_final(final)
    assert err.value.condition == "malformed-request"


def test_no_retry_after_failed_proof() -> None:
    keys = derive_keys("secret", "sha256")
    server = make_server()
    wrong = HandClient("sha256", "user", "wrong")
    server.client_first(wrong.first())
    first = server.server_first(keys)
    with pytest.raises(ScramError):
        server.client_final(wrong.final(first))
    right = HandClient("sha256", "user", "secret")
    with pytest.raises(ScramError) as err:
        server.client_final(right.final(first))
    assert err.value.condition == "malformed-request"
