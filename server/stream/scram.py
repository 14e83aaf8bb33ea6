"""SCRAM (RFC 5802, RFC 7677) for the server side, with channel binding (RFC 5929, RFC 9266).

Written here rather than with scramp because scramp refuses the `tls-exporter` binding, the
only one defined for TLS 1.3; scramp serves as the independent client in the tests.

Passwords are prepared with the PRECIS OpaqueString profile (RFC 8265 §4.2), which replaces
SASLprep (RFC 4013). The two agree on ordinary passwords (NFC-equal text, non-ASCII spaces);
they differ on compatibility characters (SASLprep applies NFKC, so a client that uses it turns
'ﬁ' into 'fi') and on the characters SASLprep maps to nothing (soft hyphen, ZWJ...).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Literal

import precis_i18n

from server.storage.base import Credentials, ScramKeys

HashName = Literal["sha1", "sha256"]
MIN_ITERATIONS = 4096  # RFC 5802 §5.1, RFC 7677 §4
SALT_SIZE = 16
# What we can bind to, best first: tls-exporter (RFC 9266) is the one defined for TLS 1.3.
CHANNEL_BINDINGS = ("tls-exporter", "tls-server-end-point")

_OPAQUE = precis_i18n.get_profile("OpaqueString")
_DIGEST_SIZES: dict[int, HashName] = {20: "sha1", 32: "sha256"}
# Per process: the fake salts shown for unknown users stay the same for a given name.
_FAKE_SECRET = secrets.token_bytes(32)
_CB_NAME = re.compile(r"[A-Za-z0-9.-]+")  # RFC 5802 §7 cb-name
_ATTRIBUTE = re.compile(r"[A-Za-z]=")


def prepare_password(password: str) -> bytes:
    """RFC 8265 §4.2 OpaqueString, then UTF-8. Raises ValueError (UnicodeError) when the
    password cannot be prepared (empty, control characters...)."""
    return _OPAQUE.enforce(password).encode()


def derive_keys(password: str, hash_name: HashName, *, salt: bytes | None = None,
                iterations: int = MIN_ITERATIONS) -> ScramKeys:
    """The keys stored for a password (RFC 5802 §3). Raises ValueError for a password that
    OpaqueString rejects, an unknown hash or fewer than 4096 iterations."""
    if hash_name not in ("sha1", "sha256"):
        raise ValueError(f"unsupported hash {hash_name!r}")
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"at least {MIN_ITERATIONS} iterations are required")
    if salt is None:
        salt = secrets.token_bytes(SALT_SIZE)
    return _keys(prepare_password(password), hash_name, salt, iterations)


def derive_credentials(password: str, iterations: int = MIN_ITERATIONS) -> Credentials:
    """Keys for both hashes, each with its own salt."""
    return Credentials(sha1=derive_keys(password, "sha1", iterations=iterations),
                       sha256=derive_keys(password, "sha256", iterations=iterations))


def verify_password(password: str, keys: ScramKeys) -> bool:
    """For PLAIN: recompute StoredKey from the password and compare in constant time. The hash
    is told by the key size (20 bytes SHA-1, 32 bytes SHA-256)."""
    hash_name = _DIGEST_SIZES.get(len(keys.stored_key))
    if hash_name is None:
        raise ValueError("stored key is neither SHA-1 nor SHA-256 sized")
    try:
        prepared = prepare_password(password)
    except ValueError:
        return False  # a stored key always comes from a prepared password
    candidate = _keys(prepared, hash_name, keys.salt, keys.iterations)
    return hmac.compare_digest(candidate.stored_key, keys.stored_key)


def fake_keys(seed: str, hash_name: HashName, iterations: int = MIN_ITERATIONS) -> ScramKeys:
    """Keys for an unknown user, so the exchange goes on and fails only at the proof (no user
    probing). The salt is stable per (name, hash) within the process and differs between the
    two hashes, as real accounts' salts do; the keys match no password anyone knows."""
    def part(label: bytes) -> bytes:
        return hmac.digest(_FAKE_SECRET, b"%s\0%s\0%s" % (label, hash_name.encode(),
                                                         seed.encode()), hash_name)
    return ScramKeys(salt=part(b"salt")[:SALT_SIZE], iterations=iterations,
                     stored_key=part(b"stored"), server_key=part(b"server"))


def _keys(prepared: bytes, hash_name: HashName, salt: bytes, iterations: int) -> ScramKeys:
    salted = hashlib.pbkdf2_hmac(hash_name, prepared, salt, iterations)  # Hi() of RFC 5802 §2.2
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    return ScramKeys(salt=salt, iterations=iterations,
                     stored_key=hashlib.new(hash_name, client_key).digest(),
                     server_key=hmac.digest(salted, b"Server Key", hash_name))


def downgrade_protection(hash_name: HashName, mechanisms: Sequence[str],
                         channel_bindings: Sequence[str] | None) -> str:
    """XEP-0474 §5.1 (SSDP, 0.4+): base64 of the hash of the advertised mechanisms, sorted by
    octets and joined with %x1E, then — when XEP-0440 listed channel bindings — %x1F and the
    sorted binding types joined with %x1E. Sent as 'h=' in server-first-message, where the
    client's proof signs it."""
    text = "\x1e".join(sorted(mechanisms, key=str.encode))
    if channel_bindings is not None:
        text += "\x1f" + "\x1e".join(sorted(channel_bindings, key=str.encode))
    return base64.b64encode(hashlib.new(hash_name, text.encode()).digest()).decode()


def server_nonce() -> str:
    """The server's part of the nonce: printable, no ',' (RFC 5802 §5.1 'r')."""
    return secrets.token_urlsafe(18)


class ScramError(Exception):
    """The exchange failed. condition: the XMPP SASL failure condition (RFC 6120 §6.5);
    server_error: the RFC 5802 §7 server-error-value for an 'e=' attribute, when one fits."""

    def __init__(self, condition: str, text: str, server_error: str | None = None) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text
        self.server_error = server_error


def _malformed(text: str, server_error: str | None = "other-error") -> ScramError:
    return ScramError("malformed-request", text, server_error)


def _unescape(saslname: str) -> str:
    """RFC 5802 §5.1: ',' and '=' travel as '=2C' and '=3D'; any other '=' fails."""
    if not saslname or "," in saslname or "\0" in saslname:
        raise _malformed("bad saslname", "invalid-username-encoding")
    parts = saslname.split("=")
    out = [parts[0]]
    for part in parts[1:]:
        code = part[:2]
        if code == "2C":
            out.append(",")
        elif code == "3D":
            out.append("=")
        else:
            raise _malformed("bad '=' escape in saslname", "invalid-username-encoding")
        out.append(part[2:])
    return "".join(out)


def _attributes(message: str) -> list[tuple[str, str]]:
    """attr-val *("," attr-val), each a single ASCII letter, '=' and a value (RFC 5802 §7)."""
    out = []
    for part in message.split(","):
        if not _ATTRIBUTE.match(part):
            raise _malformed(f"bad attribute {part[:16]!r}")
        out.append((part[0], part[2:]))
    return out


def _b64decode(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _malformed("bad base64 in attribute", "invalid-encoding") from exc


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed("message is not UTF-8", "invalid-encoding") from exc


class ScramServer:
    """One SCRAM exchange, pure: client_first() -> username; server_first(keys) -> the
    challenge; client_final() -> server-final 'v=' (or ScramError). Call them in that order.

    channel_bindings: binding type -> data for the bindings this channel has (empty without
    TLS). binding_offered: whether a -PLUS mechanism was advertised with a binding, which
    makes a client's 'y' flag a sign of a downgrade (RFC 5802 §6). ssdp: the XEP-0474
    (mechanisms, channel bindings or None) advertised, to send their hash as 'h='.
    """

    def __init__(self, hash_name: HashName, *, plus: bool,
                 channel_bindings: Mapping[str, bytes], binding_offered: bool,
                 nonce: str | None = None,
                 ssdp: tuple[Sequence[str], Sequence[str] | None] | None = None) -> None:
        self.hash_name = hash_name
        self.ssdp = ssdp
        self.plus = plus
        self.channel_bindings = channel_bindings
        self.binding_offered = binding_offered
        self.username = ""
        self.authzid: str | None = None
        self.cb_name: str | None = None
        self._server_part = nonce if nonce is not None else server_nonce()
        self._cbind_input = b""    # gs2-header + channel-binding data, as 'c=' must carry
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._keys: ScramKeys | None = None
        self._known = False
        self._stage = "client-first"

    def client_first(self, data: bytes) -> str:
        """Parse client-first-message; returns the username as sent (unescaped)."""
        self._advance("client-first")
        text = _text(data)
        flag, _, rest = text.partition(",")
        authzid, sep, bare = rest.partition(",")
        if not sep:
            raise _malformed("no gs2-header")
        cb_data = b""
        if flag.startswith("p="):
            cb_name = flag[2:]
            if not _CB_NAME.fullmatch(cb_name):
                raise _malformed("bad channel binding name")
            if not self.plus:
                raise _malformed("channel binding requested with a non-PLUS mechanism")
            if not self.channel_bindings:
                raise _malformed("no channel binding on this connection",
                                 "channel-binding-not-supported")
            found = self.channel_bindings.get(cb_name)
            if found is None:
                raise _malformed(f"channel binding {cb_name} is not supported",
                                 "unsupported-channel-binding-type")
            self.cb_name, cb_data = cb_name, found
        elif flag in ("n", "y"):
            if self.plus:
                raise _malformed("a -PLUS mechanism needs 'p=' channel binding")
            if flag == "y" and self.binding_offered:
                # RFC 5802 §6: the client supports binding but believes we do not, though we
                # advertised it: someone stripped the -PLUS mechanisms on the way.
                raise ScramError("not-authorized", "channel binding downgrade detected",
                                 "server-does-support-channel-binding")
        else:
            raise _malformed("bad gs2-cbind-flag")
        if authzid:
            if not authzid.startswith("a="):
                raise _malformed("bad authzid in gs2-header")
            self.authzid = _unescape(authzid[2:])
        attrs = _attributes(bare)
        if attrs[0][0] == "m":
            raise _malformed("mandatory extension not supported", "extensions-not-supported")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise _malformed("client-first-message needs n= then r=")
        self.username = _unescape(attrs[0][1])
        client_nonce = attrs[1][1]
        # RFC 5802 §7: printable = %x21-2B / %x2D-7E (',' is already excluded by the split).
        if not client_nonce or not all("\x21" <= c <= "\x7e" for c in client_nonce):
            raise _malformed("bad client nonce")
        self._cbind_input = f"{flag},{authzid},".encode() + cb_data
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_part
        self._stage = "credentials"
        return self.username

    def server_first(self, keys: ScramKeys | None, *,
                     fake_iterations: int = MIN_ITERATIONS, fake_seed: str | None = None) -> bytes:
        """server-first-message for the stored keys; None for an unknown user, who gets fake
        keys (salt from fake_seed, default the username) and fails at the proof."""
        self._advance("credentials")
        self._known = keys is not None
        if keys is None:
            seed = self.username if fake_seed is None else fake_seed
            keys = fake_keys(seed, self.hash_name, fake_iterations)
        self._keys = keys
        salt = base64.b64encode(keys.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={keys.iterations}"
        if self.ssdp is not None:  # XEP-0474: an extension attribute (RFC 5802 §7)
            self._server_first += ",h=" + downgrade_protection(self.hash_name, *self.ssdp)
        self._stage = "client-final"
        return self._server_first.encode()

    def client_final(self, data: bytes) -> bytes:
        """Verify client-final-message; returns server-final-message 'v=ServerSignature'."""
        self._advance("client-final")
        assert self._keys is not None
        text = _text(data)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise _malformed("client-final-message has no proof")
        attrs = _attributes(without_proof)
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise _malformed("client-final-message needs c= then r=")
        cbind_input = _b64decode(attrs[0][1])
        proof = _b64decode(proof_b64)
        if attrs[1][1] != self._nonce:
            raise ScramError("not-authorized", "nonce mismatch", "other-error")
        if not hmac.compare_digest(cbind_input, self._cbind_input):
            raise ScramError("not-authorized", "channel bindings don't match",
                             "channel-bindings-dont-match")
        keys = self._keys
        auth_message = ",".join((self._client_first_bare, self._server_first,
                                 without_proof)).encode()
        client_signature = hmac.digest(keys.stored_key, auth_message, self.hash_name)
        if len(proof) != len(client_signature):
            raise ScramError("not-authorized", "invalid proof", "invalid-proof")
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        matches = hmac.compare_digest(hashlib.new(self.hash_name, client_key).digest(),
                                      keys.stored_key)
        # An unknown user fails here with the same words as a wrong password (no
        # 'e=unknown-user': RFC 5802 §7 lets the server hide the real reason).
        if not (matches and self._known):
            raise ScramError("not-authorized", "invalid proof", "invalid-proof")
        server_signature = hmac.digest(keys.server_key, auth_message, self.hash_name)
        return b"v=" + base64.b64encode(server_signature)

    def _advance(self, expected: str) -> None:
        # Until the step succeeds the exchange counts as over: a failed step ends it.
        stage, self._stage = self._stage, "done"
        if stage != expected:
            raise _malformed(f"SCRAM {expected} message out of order")
