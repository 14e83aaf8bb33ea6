"""SASL for c2s (RFC 6120 §6) as a sans-IO machine: SCRAM-SHA-1/256(-PLUS) and PLAIN.

The caller decodes base64 itself (bad base64 -> its own `incorrect-encoding` failure), looks
up credentials when asked (NeedCredentials) and normalises the username it gets in Success.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.storage.base import Credentials
from server.stream.scram import ScramError, ScramServer, verify_password


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Success:
    username: str
    data: bytes | None


@dataclass(frozen=True)
class Failure:
    condition: str
    text: str | None = None


@dataclass(frozen=True)
class NeedCredentials:
    username: str


Step = Challenge | Success | Failure | NeedCredentials

_SCRAM = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
_BINDINGS = ("tls-exporter", "tls-server-end-point")


def offered_mechanisms(*, tls: bool, channel_bindings: Sequence[str],
                       allow_plain: bool) -> list[str]:
    out = []
    if tls and channel_bindings:
        out += ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"]
    out += ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    if tls and allow_plain:
        out.append("PLAIN")  # RFC 6120 §13.8.3: PLAIN only over TLS
    return out


class SaslServer:
    def __init__(self, mechanisms: Sequence[str],
                 channel_binding: Callable[[str], bytes | None], *, tls: bool) -> None:
        self._mechanisms = list(mechanisms)
        self._binding = channel_binding
        self._tls = tls
        self._mechanism = ""
        self._scram: ScramServer | None = None
        self._plain: tuple[str, str] | None = None  # (authcid, password)
        self._state = "new"  # new -> started -> credentials -> final -> done
        self._known_user = False

    def start(self, mechanism: str, initial_response: bytes | None) -> Step:
        if self._state != "new":
            return self._fail("malformed-request", "exchange already started")
        if mechanism not in self._mechanisms:
            return self._fail("invalid-mechanism", None)
        self._mechanism = mechanism
        self._state = "started"
        if initial_response is None:
            return Challenge(b"")
        return self._first(initial_response)

    def respond(self, data: bytes) -> Step:
        if self._state == "started":
            return self._first(data)
        if self._state == "final" and self._scram is not None:
            try:
                verifier = self._scram.client_final(data, self._known_user)
            except ScramError as err:
                return self._fail(err.condition, err.text)
            self._state = "done"
            return Success(self._scram.username, verifier)
        return self._fail("malformed-request", "unexpected response")

    def abort(self) -> Failure:
        self._state = "done"
        return Failure("aborted")

    def provide_credentials(self, credentials: Credentials | None) -> Step:
        if self._state != "credentials":
            return self._fail("malformed-request", "no credentials were requested")
        self._known_user = credentials is not None
        if self._plain is not None:
            user, password = self._plain
            self._plain = None
            self._state = "done"
            if credentials is None or not verify_password(password, credentials.sha256):
                return Failure("not-authorized")
            return Success(user, None)
        assert self._scram is not None
        keys = None
        if credentials is not None:
            keys = credentials.sha1 if self._scram.hash_name == "sha1" else credentials.sha256
        self._state = "final"
        return Challenge(self._scram.server_first(keys))

    def _first(self, data: bytes) -> Step:
        if self._mechanism == "PLAIN":
            return self._plain_first(data)
        base = self._mechanism.removesuffix("-PLUS")
        plus = base != self._mechanism
        bindings = {name: self._binding(name) for name in _BINDINGS}
        offered = self._tls and any(v is not None for v in bindings.values())
        self._scram = ScramServer(_SCRAM[base], plus=plus,  # type: ignore[arg-type]
                                  binding_offered=offered, channel_binding=bindings)
        try:
            username = self._scram.client_first(data)
        except ScramError as err:
            return self._fail(err.condition, err.text)
        authzid = self._scram.authzid
        if authzid is not None and authzid != username and not authzid.startswith(username + "@"):
            return self._fail("invalid-authzid", None)
        self._state = "credentials"
        return NeedCredentials(username)

    def _plain_first(self, data: bytes) -> Step:
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            return self._fail("malformed-request", "bad PLAIN message")
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return self._fail("malformed-request", "not UTF-8")
        if authzid and authzid != authcid and not authzid.startswith(authcid + "@"):
            return self._fail("invalid-authzid", None)
        self._plain = (authcid, password)
        self._state = "credentials"
        return NeedCredentials(authcid)

    def _fail(self, condition: str, text: str | None) -> Failure:
        self._state = "done"
        return Failure(condition, text)
