"""SCRAM (RFC 5802, RFC 7677) for the server side, with channel binding (RFC 5929, RFC 9266).

Written here rather than with scramp because scramp refuses the `tls-exporter` binding, the
only one defined for TLS 1.3; scramp serves as the independent client in the tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Literal

import precis_i18n

from server.storage.base import Credentials, ScramKeys

HashName = Literal["sha1", "sha256"]
_OPAQUE = precis_i18n.get_profile("OpaqueString")
MIN_ITERATIONS = 4096
_FAKE_SECRET = secrets.token_bytes(32)  # per process: unknown users get stable fake salts


def prepare_password(password: str) -> bytes:
    """RFC 7677 §4 / RFC 8265 §4.2: passwords are OpaqueString-prepared, then UTF-8."""
    try:
        return _OPAQUE.enforce(password).encode()
    except UnicodeError:
        return password.encode()  # unpreparable: can never equal a prepared password


def derive_keys(password: str, hash_name: HashName, *, salt: bytes | None = None,
                iterations: int = MIN_ITERATIONS) -> ScramKeys:
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac(hash_name, prepare_password(password), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    return ScramKeys(salt=salt, iterations=iterations,
                     stored_key=hashlib.new(hash_name, client_key).digest(),
                     server_key=hmac.digest(salted, b"Server Key", hash_name))


def derive_credentials(password: str, iterations: int = MIN_ITERATIONS) -> Credentials:
    return Credentials(sha1=derive_keys(password, "sha1", iterations=iterations),
                       sha256=derive_keys(password, "sha256", iterations=iterations))


def verify_password(password: str, keys: ScramKeys, hash_name: HashName = "sha256") -> bool:
    candidate = derive_keys(password, hash_name, salt=keys.salt, iterations=keys.iterations)
    return hmac.compare_digest(candidate.stored_key, keys.stored_key)


def fake_keys(username: str, hash_name: HashName) -> ScramKeys:
    """Keys for an unknown user: the exchange goes on and fails at the proof (no user probing)."""
    seed = hmac.digest(_FAKE_SECRET, username.encode(), "sha256")
    return ScramKeys(salt=seed[:16], iterations=MIN_ITERATIONS,
                     stored_key=secrets.token_bytes(hashlib.new(hash_name).digest_size),
                     server_key=secrets.token_bytes(hashlib.new(hash_name).digest_size))


class ScramError(Exception):
    """condition: the XMPP SASL failure condition (RFC 6120 §6.4.5)."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition
        self.text = text


def _unescape(saslname: str) -> str:
    # RFC 5802 §5.1: ',' and '=' are sent as '=2C' and '=3D'; any other '=' is malformed.
    out = []
    i = 0
    while i < len(saslname):
        ch = saslname[i]
        if ch == "=":
            code = saslname[i + 1:i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise ScramError("malformed-request", "bad saslname escape")
            i += 3
        else:
            if ch == ",":
                raise ScramError("malformed-request", "unescaped ',' in saslname")
            out.append(ch)
            i += 1
    return "".join(out)


def _attributes(message: str) -> list[tuple[str, str]]:
    out = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise ScramError("malformed-request", f"bad attribute {part[:10]!r}")
        out.append((part[0], part[2:]))
    return out


class ScramServer:
    """One SCRAM exchange: client-first -> server-first -> client-final -> server-final."""

    def __init__(self, hash_name: HashName, *, plus: bool, binding_offered: bool,
                 channel_binding: dict[str, bytes | None]) -> None:
        self.hash_name = hash_name
        self.plus = plus
        self.binding_offered = binding_offered
        self.channel_binding = channel_binding
        self.username = ""
        self.authzid: str | None = None
        self._gs2_header = b""
        self._cb_data = b""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._keys: ScramKeys | None = None

    def client_first(self, data: bytes) -> str:
        """Parse client-first; returns the username (then call server_first with keys)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ScramError("malformed-request", "not UTF-8") from exc
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ScramError("malformed-request", "bad client-first-message")
        flag, authzid, bare = parts
        if flag.startswith("p="):
            cb_name = flag[2:]
            if not self.plus:
                raise ScramError("malformed-request", "channel binding with a non-PLUS mechanism")
            data_for_cb = self.channel_binding.get(cb_name)
            if data_for_cb is None:
                raise ScramError("malformed-request", f"unsupported channel binding {cb_name}")
            self._cb_data = data_for_cb
        elif flag in ("n", "y"):
            if self.plus:
                raise ScramError("malformed-request", "a -PLUS mechanism needs channel binding")
            if flag == "y" and self.binding_offered:
                # RFC 5802 §6: the client thinks we lack binding, but we offered it: downgrade.
                raise ScramError("not-authorized", "channel binding downgrade detected")
        else:
            raise ScramError("malformed-request", "bad gs2 flag")
        if authzid:
            if not authzid.startswith("a="):
                raise ScramError("malformed-request", "bad authzid")
            self.authzid = _unescape(authzid[2:])
        self._gs2_header = f"{flag},{authzid},".encode()
        attrs = _attributes(bare)
        if attrs and attrs[0][0] == "m":
            raise ScramError("malformed-request", "mandatory extensions are not supported")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise ScramError("malformed-request", "expected n= and r=")
        self.username = _unescape(attrs[0][1])
        nonce = attrs[1][1]
        if not self.username or not nonce or not all(0x21 <= ord(c) <= 0x7E for c in nonce):
            raise ScramError("malformed-request", "bad username or nonce")
        self._client_first_bare = bare
        self._nonce = nonce + secrets.token_urlsafe(18)
        return self.username

    def server_first(self, keys: ScramKeys | None) -> bytes:
        self._keys = keys if keys is not None else fake_keys(self.username, self.hash_name)
        self._server_first = (f"r={self._nonce},s={base64.b64encode(self._keys.salt).decode()},"
                              f"i={self._keys.iterations}")
        return self._server_first.encode()

    def client_final(self, data: bytes, known_user: bool) -> bytes:
        """Verify; returns server-final (v=...). Raises ScramError."""
        assert self._keys is not None
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ScramError("malformed-request", "not ASCII") from exc
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed-request", "no proof")
        attrs = _attributes(without_proof)
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise ScramError("malformed-request", "expected c= and r=")
        try:
            binding = base64.b64decode(attrs[0][1], validate=True)
            proof = base64.b64decode(proof_attr, validate=True)
        except ValueError as exc:
            raise ScramError("malformed-request", "bad base64") from exc
        if attrs[1][1] != self._nonce:
            raise ScramError("not-authorized", "nonce mismatch")
        if not hmac.compare_digest(binding, self._gs2_header + self._cb_data):
            raise ScramError("not-authorized", "channel bindings don't match")
        auth_message = ",".join((self._client_first_bare, self._server_first,
                                 without_proof)).encode()
        keys = self._keys
        signature = hmac.digest(keys.stored_key, auth_message, self.hash_name)
        if len(proof) != len(signature):
            raise ScramError("not-authorized", "bad proof")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        stored = hashlib.new(self.hash_name, client_key).digest()
        if not known_user or not hmac.compare_digest(stored, keys.stored_key):
            raise ScramError("not-authorized", "wrong password")
        verifier = hmac.digest(keys.server_key, auth_message, self.hash_name)
        return b"v=" + base64.b64encode(verifier)
