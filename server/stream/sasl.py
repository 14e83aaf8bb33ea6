"""SASL for c2s (RFC 6120 §6) as a sans-IO machine: SCRAM-SHA-1/256(-PLUS) and PLAIN.

The caller:
- decodes the base64 of <auth/> and <response/> itself and answers bad base64 with its own
  Failure('incorrect-encoding') (RFC 6120 §6.5.5) without calling this machine; '=' is b'';
- looks the user up when asked (NeedCredentials) and calls provide_credentials, with None
  for an unknown user (or a name the JID module rejects);
- normalises the username it gets in Success with the JID module (RFC 7622);
- sends Success.data in <success/> (RFC 6120 §6.3.10), and advertises the bindings it can
  provide with XEP-0440 <sasl-channel-binding/> next to <mechanisms/>.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from server.jid import JID, InvalidJID, normalize_domain, normalize_localpart
from server.storage.base import Credentials
from server.stream.scram import (
    CHANNEL_BINDINGS,
    MIN_ITERATIONS,
    HashName,
    ScramError,
    ScramServer,
    fake_keys,
    verify_password,
)

# RFC 6120 §6.5: the defined <failure/> conditions.
FAILURE_CONDITIONS = frozenset({
    "aborted", "account-disabled", "credentials-expired", "encryption-required",
    "incorrect-encoding", "invalid-authzid", "invalid-mechanism", "malformed-request",
    "mechanism-too-weak", "not-authorized", "temporary-auth-failure",
})

# Everything this machine implements, best first.
MECHANISMS = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")
_SCRAM: dict[str, HashName] = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Success:
    username: str          # as the client sent it; the caller normalises it
    data: bytes | None     # additional data with success (RFC 6120 §6.3.10): SCRAM's 'v='


@dataclass(frozen=True)
class Failure:
    """condition: one of RFC 6120 §6.5. data: for SCRAM, the RFC 5802 server-final 'e=...'
    message explaining the failure; RFC 6120's <failure/> has no place for data, so the
    caller may log it or leave it out."""

    condition: str
    text: str | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if self.condition not in FAILURE_CONDITIONS:
            raise ValueError(f"unknown SASL failure condition {self.condition!r}")


@dataclass(frozen=True)
class NeedCredentials:
    username: str


Step = Challenge | Success | Failure | NeedCredentials


def offered_mechanisms(*, tls: bool, channel_bindings: Sequence[str],
                       allow_plain: bool, sha256: bool = True) -> list[str]:
    """What to list in <mechanisms/>, best first. -PLUS only when TLS gives a binding we know
    how to check; PLAIN only over TLS (RFC 6120 §13.8.3) and when the policy allows it;
    SCRAM-SHA-256 unless sha256 is False (accounts imported with SHA-1 keys only)."""
    out = []
    if tls and any(kind in CHANNEL_BINDINGS for kind in channel_bindings):
        out += ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"] if sha256 else ["SCRAM-SHA-1-PLUS"]
    out += ["SCRAM-SHA-256", "SCRAM-SHA-1"] if sha256 else ["SCRAM-SHA-1"]
    if tls and allow_plain:
        out.append("PLAIN")
    return out


class _State(Enum):
    NEW = "new"
    FIRST = "first"                # empty challenge sent, the client's first message is due
    CREDENTIALS = "credentials"    # NeedCredentials returned, provide_credentials is due
    FINAL = "final"                # SCRAM server-first sent, client-final is due
    DONE = "done"


class SaslServer:
    """One SASL exchange on one stream.

    mechanisms: those advertised (offered_mechanisms); anything else is invalid-mechanism.
    channel_binding(kind) -> data, or None where this connection has no such binding.
    domain: the stream's domain; an authzid naming another domain is invalid-authzid. Without
      it the authzid's domain is not checked.
    iterations: the SCRAM iteration count new accounts get; an unknown user is shown it (with
      a fake salt) so that the challenge does not tell that the account is missing.
    ssdp: send the XEP-0474 downgrade protection hash of `mechanisms` and `listed_bindings`
      (the channel bindings listed with XEP-0440; None when the list was not sent) in SCRAM's
      server-first-message.
    binding_unusable: on this stream the client already tried a -PLUS mechanism with a
      channel binding type we do not have (slixmpp 1.8 asks for tls-unique, which TLS 1.3
      lacks, and ignores XEP-0440): it has shown it cannot bind with us, so its 'y' flag that
      follows is no downgrade (RFC 5802 §6 refuses 'y' only when the client could have bound
      with what we offered). A client that saw no -PLUS at all (a stripping in the middle)
      and says 'y' is still refused. After a failure, `binding_unusable` tells whether this
      exchange was such a try.
    """

    def __init__(self, mechanisms: Sequence[str], channel_binding: Callable[[str], bytes | None],
                 *, tls: bool, domain: str | None = None,
                 iterations: int = MIN_ITERATIONS,
                 ssdp: bool = False, listed_bindings: Sequence[str] | None = None,
                 binding_unusable: bool = False) -> None:
        self.binding_unusable = binding_unusable
        self._ssdp: tuple[list[str], list[str] | None] | None = None
        if ssdp:
            self._ssdp = (list(mechanisms),
                          None if listed_bindings is None else list(listed_bindings))
        self._mechanisms = [m for m in mechanisms if m in MECHANISMS]
        self._binding = channel_binding
        self._tls = tls
        self._domain = domain
        self._iterations = iterations
        self._state = _State.NEW
        self._mechanism = ""
        self._scram: ScramServer | None = None
        self._plain: tuple[str, str] | None = None  # (authcid, password) until checked

    # -- inputs ------------------------------------------------------------------------------

    def start(self, mechanism: str, initial_response: bytes | None) -> Step:
        """The client's <auth/>: initial_response is the decoded payload, None when absent."""
        if self._state is not _State.NEW:
            return self.fail("malformed-request", "an exchange was already started")
        if mechanism not in self._mechanisms:
            return self.fail("invalid-mechanism")
        if mechanism == "PLAIN" and not self._tls:
            # RFC 6120 §6.5.4: the password would travel in the clear.
            return self.fail("encryption-required", "PLAIN needs TLS")
        self._mechanism = mechanism
        if initial_response is None:
            # RFC 6120 §6.4.2: no initial response, so an empty challenge asks for it.
            self._state = _State.FIRST
            return Challenge(b"")
        return self._first(initial_response)

    def respond(self, data: bytes) -> Step:
        """The client's <response/>, decoded."""
        if self._state is _State.FIRST:
            return self._first(data)
        if self._state is _State.FINAL and self._scram is not None:
            try:
                verifier = self._scram.client_final(data)
            except ScramError as err:
                return self._scram_failure(err)
            self._state = _State.DONE
            return Success(self._scram.username, verifier)
        return self.fail("malformed-request", "no response is expected now")

    def provide_credentials(self, credentials: Credentials | None) -> Step:
        """Answer to NeedCredentials: the account's keys, or None when there is no account."""
        if self._state is not _State.CREDENTIALS:
            return self.fail("malformed-request", "no credentials were asked for")
        if self._plain is not None:
            user, password = self._plain
            self._plain = None
            self._state = _State.DONE
            # Unknown user: check against fake keys anyway, so the answer takes as long.
            keys = (credentials.sha256 or credentials.sha1 if credentials is not None
                    else None) or fake_keys(self._seed(user), "sha256", self._iterations)
            if verify_password(password, keys) and credentials is not None:
                return Success(user, None)
            return Failure("not-authorized", "wrong username or password")
        assert self._scram is not None
        stored = None  # an account without keys for this hash (imported) fails as unknown
        if credentials is not None:
            stored = credentials.sha1 if self._scram.hash_name == "sha1" else credentials.sha256
        self._state = _State.FINAL
        return Challenge(self._scram.server_first(
            stored, fake_iterations=self._iterations, fake_seed=self._seed(self._scram.username)))

    def abort(self) -> Failure:
        """The client's <abort/> (RFC 6120 §6.4.4)."""
        return self.fail("aborted")

    def fail(self, condition: str, text: str | None = None) -> Failure:
        """End the exchange with the caller's own reason, e.g. temporary-auth-failure when the
        account store is down, account-disabled or credentials-expired by policy."""
        self._state = _State.DONE
        self._plain = None
        return Failure(condition, text)

    # -- mechanisms --------------------------------------------------------------------------

    def _first(self, data: bytes) -> Step:
        if self._mechanism == "PLAIN":
            return self._plain_first(data)
        base = self._mechanism.removesuffix("-PLUS")
        bindings: dict[str, bytes] = {}
        if self._tls:
            for kind in CHANNEL_BINDINGS:
                found = self._binding(kind)
                if found is not None:
                    bindings[kind] = found
        offered = (bool(bindings) and any(m.endswith("-PLUS") for m in self._mechanisms)
                   and not self.binding_unusable)
        self._scram = ScramServer(_SCRAM[base], plus=base != self._mechanism,
                                  channel_bindings=bindings, binding_offered=offered,
                                  ssdp=self._ssdp)
        try:
            username = self._scram.client_first(data)
        except ScramError as err:
            return self._scram_failure(err)
        if self._scram.authzid is not None and not self._authzid_ok(self._scram.authzid,
                                                                     username):
            return self.fail("invalid-authzid", "authorization identity is not the user's")
        self._state = _State.CREDENTIALS
        return NeedCredentials(username)

    def _plain_first(self, data: bytes) -> Step:
        # RFC 4616 §2: message = [authzid] NUL authcid NUL passwd, all UTF-8 without NUL.
        parts = data.split(b"\0")
        if len(parts) != 3:
            return self.fail("malformed-request", "PLAIN needs exactly two NUL separators")
        if not parts[1] or not parts[2]:
            return self.fail("malformed-request", "empty authcid or password")
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return self.fail("malformed-request", "PLAIN message is not UTF-8")
        if authzid and not self._authzid_ok(authzid, authcid):
            return self.fail("invalid-authzid", "authorization identity is not the user's")
        self._plain = (authcid, password)
        self._state = _State.CREDENTIALS
        return NeedCredentials(authcid)

    def _authzid_ok(self, authzid: str, username: str) -> bool:
        """RFC 6120 §6.3.8: we authorise no one to act for another, so the authzid may only
        name the user: the same string, or the bare JID username@domain."""
        if authzid == username:
            return True
        try:
            jid = JID.parse(authzid)
            local = normalize_localpart(username)
            domain = normalize_domain(self._domain) if self._domain is not None else None
        except InvalidJID:
            return False
        return (jid.resource is None and jid.local == local
                and (domain is None or jid.domain == domain))

    def _scram_failure(self, err: ScramError) -> Failure:
        self._state = _State.DONE
        if err.server_error == "unsupported-channel-binding-type":
            self.binding_unusable = True
        data = f"e={err.server_error}".encode() if err.server_error else None
        return Failure(err.condition, err.text, data)

    @staticmethod
    def _seed(username: str) -> str:
        # Fake salts follow the account the name maps to: 'User' and 'user' share one, as
        # they share a real account.
        try:
            return normalize_localpart(username)
        except InvalidJID:
            return username
