"""Who is the peer server? PKIX checks of its certificate and XEP-0185 dialback keys.

Pure functions: the TLS layer hands over the peer's chain as DER, we answer with a Verdict.
The certificate path is validated by cryptography's ``x509.verification``; the name check is
ours, because XMPP's identities (SRV-ID, XmppAddr) are beyond what a web PKI verifier knows:
RFC 6125 §6 as profiled by RFC 6120 §13.7.1.2, XEP-0178 §3 and the PKIX prooftype of RFC 7712.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import ssl
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import idna
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

ID_ON_XMPP_ADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")  # RFC 6120 §13.7.1.4
ID_ON_DNS_SRV = ObjectIdentifier("1.3.6.1.5.5.7.8.7")  # RFC 4985 SRVName
XMPP_SERVER_SERVICE = "_xmpp-server"  # RFC 6120 §13.7.1.2: the s2s SRV-ID service
_UTF8_STRING, _IA5_STRING = 0x0C, 0x16  # X.690 universal tags
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")  # a reference identifier: no wildcard
_SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian, Ubuntu, Alpine


@dataclass(frozen=True)
class Trust:
    """Trust anchors; ``store`` is None when there are none (cryptography refuses an empty
    Store), and then no certificate can be valid."""

    store: Store | None
    anchors: int


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str


# -- trust anchors ------------------------------------------------------------------------------


def load_trust(ca_file: Path | None) -> Trust:
    """The PEM certificates in ca_file, or the system store when None. A configured file that
    cannot be read is an error; a missing system bundle is an empty store."""
    pem = ca_file.read_bytes() if ca_file is not None else _system_bundle()
    anchors = []
    with warnings.catch_warnings():  # system bundles hold a few roots with negative serials
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        for block in _PEM_CERTIFICATE.findall(pem):
            with contextlib.suppress(ValueError):  # one bad root must not void the whole bundle
                anchors.append(x509.load_pem_x509_certificate(block))
    return Trust(Store(anchors) if anchors else None, len(anchors))


def _system_bundle() -> bytes:
    paths = ssl.get_default_verify_paths()  # honours SSL_CERT_FILE
    for candidate in filter(None, (paths.cafile, paths.openssl_cafile, _SYSTEM_BUNDLE)):
        with contextlib.suppress(OSError):
            return Path(candidate).read_bytes()
    return b""


# -- path validation ----------------------------------------------------------------------------

_TLS_PURPOSES = frozenset({ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
                           ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE})


def _for_tls(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and _TLS_PURPOSES.isdisjoint(eku):
        raise ValueError("extended key usage is for neither TLS server nor client")


# A peer server is a TLS client on its outbound streams and a TLS server on ours, and many
# deployed XMPP certificates carry serverAuth only (some public CAs no longer issue clientAuth).
# cryptography's client verifier demands clientAuth and its server verifier serverAuth, on the
# leaf and on every intermediate with an EKU; our EE and CA policies accept either. The leaf may
# also lack a
# subjectAltName (RFC 6125 §6.4.4 CN fallback, checked by us) and an authorityKeyIdentifier
# (private CAs often omit it; RFC 5280 path building works on names). Everything else is webpki.
_EE_POLICY = (ExtensionPolicy.webpki_defaults_ee()
              .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _for_tls)
              .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
              .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None))
_CA_POLICY = (ExtensionPolicy.webpki_defaults_ca()
              .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _for_tls))


def _path_failure(exc: VerificationError) -> str:
    text = str(exc).split(" (encountered", 1)[0].removeprefix("validation failed: ")
    if "no interior errors" in text:  # no path to any anchor
        return "unknown issuer"
    if "not valid at validation time" in text:  # the leaf's dates were checked before
        return "chain certificate expired or not yet valid"
    if "EKU" in text or "extended key usage" in text:
        return "extended key usage not for TLS"
    return text


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -- identity (RFC 6125 §6) ---------------------------------------------------------------------


def _a_label(name: str) -> str | None:
    """The comparable form of a domain name: lower-case A-labels (RFC 6125 §6.4.2), or None."""
    if name.isascii():
        return name.lower() or None
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except UnicodeError:
        return None


def _der_string(encoded: bytes, tag: int) -> str | None:
    """The text of one DER string TLV (X.690 §8.1, §10.1: definite, minimal length) of the
    given universal tag, or None when encoded is anything else."""
    if len(encoded) < 2 or encoded[0] != tag:
        return None
    length, offset = encoded[1], 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or len(encoded) < 2 + count or encoded[2] == 0:
            return None
        length, offset = int.from_bytes(encoded[2:2 + count], "big"), 2 + count
        if length < 0x80:
            return None
    if len(encoded) != offset + length:
        return None
    try:
        return encoded[offset:].decode("utf-8" if tag == _UTF8_STRING else "ascii")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class _Presented:
    has_san: bool  # False: no subjectAltName extension at all
    dns_ids: list[str]
    srv_ids: list[str]
    xmpp_addrs: list[str]
    common_names: list[str]


def _presented(cert: x509.Certificate) -> _Presented:
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                    if isinstance(a.value, str)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return _Presented(False, [], [], [], common_names)
    srv_ids, xmpp_addrs = [], []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == ID_ON_DNS_SRV and (srv := _der_string(other.value, _IA5_STRING)):
            srv_ids.append(srv)
        elif other.type_id == ID_ON_XMPP_ADDR and (
                addr := _der_string(other.value, _UTF8_STRING)):
            xmpp_addrs.append(addr)
    return _Presented(True, san.get_values_for_type(x509.DNSName), srv_ids, xmpp_addrs,
                      common_names)


def _dns_id_matches(presented: str, reference: str) -> bool:
    """reference is a checked host name (no `*`), so partial wildcards never match."""
    if presented.startswith("*."):
        # RFC 6125 §6.4.3: the wildcard is the whole left-most label and stands for exactly one
        # label; `*.tld` (fewer than two labels after it) is refused outright.
        base = _a_label(presented[2:])
        return base is not None and "." in base and base == reference.partition(".")[2]
    return _a_label(presented) == reference


def _srv_id_matches(presented: str, reference: str) -> bool:
    service, _, name = presented.partition(".")  # RFC 6125 §6.5.1
    return service.lower() == XMPP_SERVER_SERVICE and _a_label(name) == reference


def _identity_matches(cert: x509.Certificate, reference: str) -> bool:
    ids = _presented(cert)
    if not ids.has_san:  # RFC 6125 §6.4.4, stricter: the CN only without any subjectAltName
        return any(_a_label(cn) == reference for cn in ids.common_names)
    return (any(_dns_id_matches(d, reference) for d in ids.dns_ids)
            or any(_srv_id_matches(s, reference) for s in ids.srv_ids)
            or any(_a_label(a) == reference for a in ids.xmpp_addrs))


def certificate_names(leaf_der: bytes) -> list[str]:
    """The identities the certificate presents, for logging: DNS-IDs, SRV-IDs, XmppAddrs as
    written, or its CNs when it has no subjectAltName. [] when it cannot be parsed."""
    try:
        ids = _presented(x509.load_der_x509_certificate(leaf_der))
    except ValueError:
        return []
    return ids.dns_ids + ids.srv_ids + ids.xmpp_addrs if ids.has_san else ids.common_names


def verify_peer(chain_der: list[bytes], domain: str, trust: Trust, *,
                now: datetime | None = None) -> Verdict:
    """Is chain_der (leaf first) a valid certificate chain for the XMPP server domain?
    A naive ``now`` is taken as UTC."""
    if not chain_der:
        return Verdict(False, "no certificate")
    reference = _a_label(domain)
    if reference is None or not _HOSTNAME.fullmatch(reference):
        return Verdict(False, "invalid domain")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        return Verdict(False, "malformed certificate")
    leaf = chain[0]
    moment = now or datetime.now(UTC)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    # The verifier says only "not valid at validation time"; name the cause for the log.
    if moment > leaf.not_valid_after_utc:
        return Verdict(False, "expired")
    if moment < leaf.not_valid_before_utc:
        return Verdict(False, "not yet valid")
    if _self_signed(leaf):
        return Verdict(False, "self-signed")
    if trust.store is None:
        return Verdict(False, "no trust anchors")
    verifier = (PolicyBuilder().store(trust.store).time(moment)
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
                .build_client_verifier())  # no server name: the identity check is ours
    # A root the peer sends along can only be an anchor, and anchors come from the store; as an
    # "intermediate" it sends path building round in circles ("exceeds max depth").
    intermediates = [cert for cert in chain[1:] if not _self_signed(cert)]
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        return Verdict(False, _path_failure(exc))
    if not _identity_matches(leaf, reference):
        return Verdict(False, "name mismatch")
    return Verdict(True, "ok")


# -- dialback keys (XEP-0185 §2) ----------------------------------------------------------------


def dialback_key(secret: bytes, receiving: str, originating: str, stream_id: str) -> str:
    """HMAC-SHA256 keyed with the hex SHA-256 of the secret over "receiving originating id"
    (XEP-0185 §2; the hex form avoids encoding problems, the spaces ambiguity)."""
    key = hashlib.sha256(secret).hexdigest().encode("ascii")
    text = f"{receiving} {originating} {stream_id}".encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def keys_equal(a: str, b: str) -> bool:
    """Constant-time comparison; bytes, so that a non-ASCII key from the wire is just unequal."""
    return hmac.compare_digest(a.encode(), b.encode())
