"""federation/auth.py: PKIX path validation, RFC 6125 identity checks for XMPP servers, the DER
otherName reader and XEP-0185 dialback keys, against real certificates built here."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import ssl
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from cryptography.x509.verification import Store

from bench.peers import make_ca, make_certificates
from federation import auth
from federation.auth import (
    ID_ON_DNS_SRV,
    ID_ON_XMPP_ADDR,
    Trust,
    Verdict,
    certificate_names,
    dialback_key,
    keys_equal,
    load_trust,
    verify_peer,
)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
HOUR, DAY = dt.timedelta(hours=1), dt.timedelta(days=1)
SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
BOTH = (SERVER, CLIENT)
UTF8, IA5 = 0x0C, 0x16


# -- certificate factory --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])


def make_authority(cn: str = "Test CA", *, parent: Authority | None = None,
                   eku: Sequence[ObjectIdentifier] | None = None,
                   not_after: dt.datetime = NOW + DAY) -> Authority:
    """A root (parent None) or an intermediate CA, EC P-256."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(parent.cert.subject if parent else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - DAY).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
            critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return Authority(builder.sign(parent.key if parent else key, hashes.SHA256()), key)


def make_leaf(issuer: Authority | None, *, dns: Sequence[str] = ("a.test",),
              others: Sequence[x509.OtherName] = (), san: bool = True, cn: str | None = None,
              eku: Sequence[ObjectIdentifier] | None = BOTH, not_before: dt.datetime = NOW - HOUR,
              not_after: dt.datetime = NOW + DAY, aki: bool = True) -> x509.Certificate:
    """An end-entity certificate; issuer None makes it self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if san:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(names + list(others)),
                                        critical=cn is None)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if issuer is not None and aki:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False)
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def tlv(tag: int, value: bytes) -> bytes:
    """DER TLV, written independently of the module's reader."""
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(body)]) + body + value


def srv_id(text: str) -> x509.OtherName:
    return x509.OtherName(ID_ON_DNS_SRV, tlv(IA5, text.encode("ascii")))


def xmpp_addr(text: str) -> x509.OtherName:
    return x509.OtherName(ID_ON_XMPP_ADDR, tlv(UTF8, text.encode("utf-8")))


def der(*certs: x509.Certificate) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in certs]


def trust(*authorities: Authority | x509.Certificate) -> Trust:
    certs = [a.cert if isinstance(a, Authority) else a for a in authorities]
    return Trust(Store(certs), len(certs))


@pytest.fixture(scope="module")
def ca() -> Authority:
    return make_authority()


def check(chain: list[bytes], domain: str, anchors: Trust, **kw: dt.datetime) -> Verdict:
    return verify_peer(chain, domain, anchors, now=kw.get("now", NOW))


# -- load_trust -----------------------------------------------------------------------------------


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def test_load_trust_reads_every_certificate_in_the_file(tmp_path: Path) -> None:
    first, second = make_authority("CA one"), make_authority("CA two")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(b"# a comment\n" + _pem(first.cert) + b"\nnoise\n" + _pem(second.cert))
    anchors = load_trust(bundle)
    assert anchors.anchors == 2
    assert check(der(make_leaf(first)), "a.test", anchors) == Verdict(True, "ok")
    assert check(der(make_leaf(second)), "a.test", anchors) == Verdict(True, "ok")


def test_load_trust_skips_a_malformed_block(tmp_path: Path, ca: Authority) -> None:
    bundle = tmp_path / "ca.pem"
    broken = b"-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    bundle.write_bytes(broken + _pem(ca.cert))
    anchors = load_trust(bundle)
    assert anchors.anchors == 1
    assert check(der(make_leaf(ca)), "a.test", anchors).valid


def test_load_trust_without_certificates_trusts_nothing(tmp_path: Path, ca: Authority) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    anchors = load_trust(empty)
    assert anchors == Trust(None, 0)
    assert check(der(make_leaf(ca)), "a.test", anchors) == Verdict(False, "no trust anchors")


def test_load_trust_configured_file_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_trust(tmp_path / "absent.pem")


def test_load_trust_none_reads_the_default_cafile(tmp_path: Path, ca: Authority,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "system.pem"
    bundle.write_bytes(_pem(ca.cert))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # what ssl.get_default_verify_paths honours
    anchors = load_trust(None)
    assert anchors.anchors == 1
    assert check(der(make_leaf(ca)), "a.test", anchors).valid


def test_load_trust_none_tolerates_a_missing_system_store(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    absent = str(tmp_path / "absent.pem")
    paths = ssl.DefaultVerifyPaths(absent, "", "SSL_CERT_FILE", absent, "SSL_CERT_DIR", "")
    monkeypatch.setattr(auth.ssl, "get_default_verify_paths", lambda: paths)
    monkeypatch.setattr(auth, "_SYSTEM_BUNDLE", str(tmp_path / "also-absent.crt"))
    assert load_trust(None) == Trust(None, 0)


# -- the project's own test certificates (bench/peers.py), used by the interop tests ---------------


def test_bench_certificate_is_valid_for_its_domain_only(tmp_path: Path) -> None:
    bench_ca = make_ca(tmp_path / "ca")
    files = make_certificates(tmp_path / "peer", ["peer.test", "conference.peer.test"], ca=bench_ca)
    chain = der(*x509.load_pem_x509_certificates(files.certificate.read_bytes()))
    assert len(chain) == 2  # leaf, then the CA
    anchors = load_trust(bench_ca.certificate)
    assert check(chain, "peer.test", anchors) == Verdict(True, "ok")
    assert check(chain, "conference.peer.test", anchors) == Verdict(True, "ok")
    assert check(chain[:1], "peer.test", anchors) == Verdict(True, "ok")
    assert check(chain, "other.test", anchors) == Verdict(False, "name mismatch")
    assert check(chain, "x.peer.test", anchors) == Verdict(False, "name mismatch")


def test_bench_self_signed_certificate_is_rejected(tmp_path: Path) -> None:
    bench_ca = make_ca(tmp_path / "ca")
    files = make_certificates(tmp_path / "peer", ["peer.test"])
    chain = der(x509.load_pem_x509_certificate(files.certificate.read_bytes()))
    assert check(chain, "peer.test", load_trust(bench_ca.certificate)) == Verdict(False,
                                                                                  "self-signed")


# -- path validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("eku", [(SERVER,), (CLIENT,), BOTH, None],
                         ids=["serverAuth", "clientAuth", "both", "no-eku"])
def test_leaf_for_tls_server_or_client_is_valid(ca: Authority, eku: tuple | None) -> None:
    assert check(der(make_leaf(ca, eku=eku)), "a.test", trust(ca)) == Verdict(True, "ok")


def test_leaf_with_only_a_non_tls_purpose_is_rejected(ca: Authority) -> None:
    leaf = make_leaf(ca, eku=(ExtendedKeyUsageOID.CODE_SIGNING,))
    assert check(der(leaf), "a.test", trust(ca)) == Verdict(False, "extended key usage not for TLS")


def test_leaf_without_authority_key_identifier_is_valid(ca: Authority) -> None:
    assert check(der(make_leaf(ca, aki=False)), "a.test", trust(ca)).valid


def test_expired_leaf(ca: Authority) -> None:
    leaf = make_leaf(ca, not_before=NOW - 3 * DAY, not_after=NOW - DAY)
    assert check(der(leaf), "a.test", trust(ca)) == Verdict(False, "expired")


def test_not_yet_valid_leaf(ca: Authority) -> None:
    leaf = make_leaf(ca, not_before=NOW + HOUR, not_after=NOW + DAY)
    assert check(der(leaf), "a.test", trust(ca)) == Verdict(False, "not yet valid")


def test_validation_time_is_the_given_now(ca: Authority) -> None:
    chain = der(make_leaf(ca, not_after=NOW + DAY))
    assert check(chain, "a.test", trust(ca), now=NOW + 2 * DAY) == Verdict(False, "expired")
    assert check(chain, "a.test", trust(ca), now=NOW - 2 * HOUR) == Verdict(False, "not yet valid")
    naive = NOW.replace(tzinfo=None)
    assert verify_peer(chain, "a.test", trust(ca), now=naive).valid  # naive means UTC
    assert verify_peer(chain, "a.test", trust(ca)).valid  # default: the current time


def test_leaf_of_another_ca_has_an_unknown_issuer(ca: Authority) -> None:
    stranger = make_authority("Stranger CA")
    leaf = make_leaf(stranger)
    assert check(der(leaf), "a.test", trust(ca)) == Verdict(False, "unknown issuer")
    # with its (untrusted) root sent along, as bench/peers.py and many servers do
    assert check(der(leaf, stranger.cert), "a.test", trust(ca)) == Verdict(False, "unknown issuer")


def test_bench_certificate_against_another_store_has_an_unknown_issuer(tmp_path: Path,
                                                                      ca: Authority) -> None:
    files = make_certificates(tmp_path / "peer", ["peer.test"], ca=make_ca(tmp_path / "ca"))
    chain = der(*x509.load_pem_x509_certificates(files.certificate.read_bytes()))
    assert check(chain, "peer.test", trust(ca)) == Verdict(False, "unknown issuer")


def test_self_signed_leaf_is_rejected_even_when_trusted() -> None:
    leaf = make_leaf(None, cn="a.test")
    assert check(der(leaf), "a.test", trust(make_authority())) == Verdict(False, "self-signed")
    assert check(der(leaf), "a.test", trust(leaf)) == Verdict(False, "self-signed")


def test_ca_certificate_presented_as_leaf_is_rejected(ca: Authority) -> None:
    assert not check(der(ca.cert), "a.test", trust(ca)).valid


@pytest.mark.parametrize("eku", [None, (SERVER,), BOTH], ids=["no-eku", "serverAuth", "both"])
def test_chain_through_an_intermediate(ca: Authority, eku: tuple | None) -> None:
    intermediate = make_authority("Intermediate", parent=ca, eku=eku)
    leaf = make_leaf(intermediate, eku=(SERVER,))
    assert check(der(leaf, intermediate.cert), "a.test", trust(ca)) == Verdict(True, "ok")
    assert check(der(leaf), "a.test", trust(ca)) == Verdict(False, "unknown issuer")


def test_intermediate_for_another_purpose_is_rejected(ca: Authority) -> None:
    intermediate = make_authority("Mail CA", parent=ca,
                                  eku=(ExtendedKeyUsageOID.EMAIL_PROTECTION,))
    chain = der(make_leaf(intermediate), intermediate.cert)
    assert check(chain, "a.test", trust(ca)) == Verdict(False, "extended key usage not for TLS")


def test_expired_intermediate_is_rejected(ca: Authority) -> None:
    intermediate = make_authority("Old CA", parent=ca, not_after=NOW - HOUR)
    chain = der(make_leaf(intermediate), intermediate.cert)
    assert check(chain, "a.test", trust(ca)) == Verdict(
        False, "chain certificate expired or not yet valid")


def test_no_certificate_or_garbage(ca: Authority) -> None:
    assert check([], "a.test", trust(ca)) == Verdict(False, "no certificate")
    assert check([b"\x30\x03\x02\x01\x00"], "a.test", trust(ca)) == Verdict(
        False, "malformed certificate")


def test_verdict_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Verdict(True, "ok").valid = False  # type: ignore[misc]


# -- identity: DNS-ID ------------------------------------------------------------------------------


def test_dns_id_is_compared_case_insensitively(ca: Authority) -> None:
    chain = der(make_leaf(ca, dns=("Im.Example.ORG",)))
    assert check(chain, "im.example.org", trust(ca)).valid
    assert check(chain, "IM.EXAMPLE.org", trust(ca)).valid
    assert check(chain, "example.org", trust(ca)) == Verdict(False, "name mismatch")


def test_dns_id_matches_an_idn_domain_by_its_a_label(ca: Authority) -> None:
    chain = der(make_leaf(ca, dns=("xn--bcher-kva.example",)))
    assert check(chain, "bücher.example", trust(ca)).valid
    assert check(chain, "BÜCHER.example", trust(ca)).valid
    assert check(chain, "xn--bcher-kva.example", trust(ca)).valid
    assert not check(chain, "bucher.example", trust(ca)).valid


def test_any_of_several_dns_ids_matches(ca: Authority) -> None:
    chain = der(make_leaf(ca, dns=("one.test", "two.test")))
    assert check(chain, "two.test", trust(ca)).valid
    assert not check(chain, "three.test", trust(ca)).valid


@pytest.mark.parametrize(("pattern", "domain", "valid"), [
    ("*.a.test", "x.a.test", True),
    ("*.a.test", "X.A.TEST", True),
    ("*.a.test", "xn--bcher-kva.a.test", True),
    ("*.a.test", "a.test", False),            # the wildcard stands for one label, not none
    ("*.a.test", "y.x.a.test", False),        # ... nor for two (RFC 6125 §6.4.3 rule 2)
    ("*.a.test", "x.b.test", False),
    ("*.test", "a.test", False),              # no wildcard directly above a TLD
    ("*.A.Test", "x.a.test", True),
    ("x*.a.test", "xy.a.test", False),        # only a complete left-most label
    ("*x.a.test", "yx.a.test", False),
    ("a.*.test", "a.b.test", False),          # rule 1: only the left-most label
    ("*.*.test", "a.b.test", False),
    ("*", "a", False),
])
def test_wildcard_dns_id(ca: Authority, pattern: str, domain: str, valid: bool) -> None:
    chain = der(make_leaf(ca, dns=(pattern,)))
    assert check(chain, domain, trust(ca)).valid is valid


def test_reference_domain_with_a_wildcard_is_refused(ca: Authority) -> None:
    chain = der(make_leaf(ca, dns=("*.a.test",)))
    for bad in ("*.a.test", "", "a..test", "a test"):
        assert check(chain, bad, trust(ca)) == Verdict(False, "invalid domain")


# -- identity: SRV-ID and XmppAddr otherNames ------------------------------------------------------


@pytest.mark.parametrize(("presented", "domain", "valid"), [
    ("_xmpp-server.a.test", "a.test", True),
    ("_XMPP-Server.A.Test", "a.test", True),
    ("_xmpp-server.xn--bcher-kva.example", "bücher.example", True),
    ("_xmpp-client.a.test", "a.test", False),   # a client service proves nothing for s2s
    ("_xmpp-server.b.test", "a.test", False),
    ("_xmpp-server.a.test", "x.a.test", False),
    ("_xmpp-server.*.test", "a.test", False),   # SRV-IDs have no wildcards
    ("a.test", "a.test", False),
])
def test_srv_id(ca: Authority, presented: str, domain: str, valid: bool) -> None:
    chain = der(make_leaf(ca, dns=(), others=(srv_id(presented),)))
    assert check(chain, domain, trust(ca)).valid is valid


@pytest.mark.parametrize(("presented", "domain", "valid"), [
    ("a.test", "a.test", True),
    ("A.Test", "a.test", True),
    ("bücher.example", "xn--bcher-kva.example", True),
    ("user@a.test", "a.test", False),
    ("a.test/resource", "a.test", False),
    ("b.test", "a.test", False),
])
def test_xmpp_addr(ca: Authority, presented: str, domain: str, valid: bool) -> None:
    chain = der(make_leaf(ca, dns=(), others=(xmpp_addr(presented),)))
    assert check(chain, domain, trust(ca)).valid is valid


def test_other_names_with_the_wrong_string_type_are_ignored(ca: Authority) -> None:
    wrong = (x509.OtherName(ID_ON_XMPP_ADDR, tlv(IA5, b"a.test")),
             x509.OtherName(ID_ON_DNS_SRV, tlv(UTF8, b"_xmpp-server.a.test")),
             x509.OtherName(ObjectIdentifier("1.2.3.4"), tlv(UTF8, b"a.test")))
    chain = der(make_leaf(ca, dns=(), others=wrong))
    assert check(chain, "a.test", trust(ca)) == Verdict(False, "name mismatch")


# -- identity: the common name, only without subjectAltName ------------------------------------------


def test_common_name_counts_when_there_is_no_subject_alt_name(ca: Authority) -> None:
    chain = der(make_leaf(ca, san=False, cn="A.Test"))
    assert check(chain, "a.test", trust(ca)) == Verdict(True, "ok")
    assert check(chain, "b.test", trust(ca)) == Verdict(False, "name mismatch")


def test_common_name_is_never_a_wildcard(ca: Authority) -> None:
    chain = der(make_leaf(ca, san=False, cn="*.a.test"))
    assert check(chain, "x.a.test", trust(ca)) == Verdict(False, "name mismatch")


def test_common_name_is_ignored_when_a_subject_alt_name_exists(ca: Authority) -> None:
    chain = der(make_leaf(ca, dns=("other.test",), cn="a.test"))
    assert check(chain, "a.test", trust(ca)) == Verdict(False, "name mismatch")
    assert check(chain, "other.test", trust(ca)).valid
    unknown_only = (x509.OtherName(ObjectIdentifier("1.2.3.4"), tlv(UTF8, b"x")),)
    chain = der(make_leaf(ca, dns=(), others=unknown_only, cn="a.test"))
    assert check(chain, "a.test", trust(ca)) == Verdict(False, "name mismatch")


def test_valid_chain_with_no_matching_name(ca: Authority) -> None:
    leaf = make_leaf(ca, dns=("b.test", "*.c.test"), others=(srv_id("_xmpp-server.d.test"),
                                                               xmpp_addr("e.test")), cn="a.test")
    assert check(der(leaf), "a.test", trust(ca)) == Verdict(False, "name mismatch")


# -- certificate_names ------------------------------------------------------------------------------


def test_certificate_names_lists_every_identity(ca: Authority) -> None:
    leaf = make_leaf(ca, dns=("a.test", "*.a.test"),
                     others=(srv_id("_xmpp-server.a.test"), xmpp_addr("bücher.example"),
                             x509.OtherName(ObjectIdentifier("1.2.3.4"), tlv(UTF8, b"x"))),
                     cn="ignored.test")
    assert certificate_names(der(leaf)[0]) == ["a.test", "*.a.test", "_xmpp-server.a.test",
                                               "bücher.example"]


def test_certificate_names_falls_back_to_the_common_name(ca: Authority) -> None:
    assert certificate_names(der(make_leaf(ca, san=False, cn="a.test"))[0]) == ["a.test"]
    assert certificate_names(der(make_leaf(ca, san=False))[0]) == []


def test_certificate_names_of_garbage_is_empty() -> None:
    assert certificate_names(b"not a certificate") == []


# -- the DER string reader behind otherName values ------------------------------------------------


@pytest.mark.parametrize(("encoded", "tag", "text"), [
    (b"\x0c\x06a.test", UTF8, "a.test"),
    (b"\x16\x13_xmpp-server.a.test", IA5, "_xmpp-server.a.test"),
    ("\x0c\x0fbücher.example".encode(), UTF8, "bücher.example"),
    (b"\x0c\x00", UTF8, ""),
    (b"\x16\x81\x80" + b"a" * 128, IA5, "a" * 128),           # long form, one length octet
    (b"\x0c\x82\x01\x2c" + b"b" * 300, UTF8, "b" * 300),       # long form, two length octets
    (b"\x16\x06a.test", UTF8, None),                          # another string type
    (b"\x0c\x06a.tes", UTF8, None),                           # truncated
    (b"\x0c\x05a.test", UTF8, None),                          # trailing octet
    (b"\x0c\x81\x06a.test", UTF8, None),                      # long form for a short length
    (b"\x0c\x82\x00\x80" + b"a" * 128, UTF8, None),           # leading zero length octet
    (b"\x0c\x80a.test\x00\x00", UTF8, None),                  # indefinite length (BER only)
    (b"\x0c\x85\x00\x00\x00\x00\x06a.test", UTF8, None),      # more than four length octets
    (b"\x0c\x02\xc3\x28", UTF8, None),                        # invalid UTF-8
    (b"\x16\x02\xc3\xbc", IA5, None),                         # IA5String is ASCII
    (b"\x0c", UTF8, None),
    (b"", UTF8, None),
    (b"\xa0\x08\x0c\x06a.test", UTF8, None),                  # still wrapped in [0] EXPLICIT
])
def test_der_string(encoded: bytes, tag: int, text: str | None) -> None:
    assert auth._der_string(encoded, tag) == text


def test_der_string_reads_what_tlv_writes() -> None:
    for n in (0, 1, 127, 128, 255, 256, 70000):
        assert auth._der_string(tlv(UTF8, b"x" * n), UTF8) == "x" * n


# -- dialback keys (XEP-0185) -----------------------------------------------------------------------


@pytest.mark.parametrize(("secret", "receiving", "originating", "stream_id", "key"), [
    # XEP-0185 §3
    (b"s3cr3tf0rd14lb4ck", "xmpp.example.com", "example.org", "D60000229F",
     "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"),
    # XEP-0220 §2.1.1
    (b"s3cr3tf0rd14lb4ck", "montague.example", "capulet.example", "D60000229F",
     "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3"),
    # XEP-0220 §2.2.2
    (b"d14lb4ck43v3r", "capulet.example", "montague.example", "417GAF25",
     "225cc5aa6a071133249d25fef42ae516fc7a86c523aa1c6980a7f73e784c972d"),
])
def test_dialback_key_reproduces_the_xep_examples(secret: bytes, receiving: str,
                                                  originating: str, stream_id: str,
                                                  key: str) -> None:
    assert dialback_key(secret, receiving, originating, stream_id) == key


def test_dialback_key_matches_an_independent_computation() -> None:
    secret = bytes(range(256))
    for receiving, originating, stream_id in [("a.test", "b.test", "id-1"),
                                              ("bücher.example", "b.test", "ß/üñí")]:
        hex_key = hashlib.sha256(secret).hexdigest().encode("ascii")
        message = " ".join((receiving, originating, stream_id)).encode("utf-8")
        expected = hmac.new(hex_key, message, hashlib.sha256).hexdigest()
        got = dialback_key(secret, receiving, originating, stream_id)
        assert got == expected
        assert len(got) == 64 and got == got.lower()


def test_dialback_key_depends_on_every_input() -> None:
    base = dialback_key(b"secret", "a.test", "b.test", "id")
    assert dialback_key(b"secret", "a.test", "b.test", "id") == base
    assert len({base,
                dialback_key(b"secreT", "a.test", "b.test", "id"),
                dialback_key(b"secret", "b.test", "a.test", "id"),     # direction matters
                dialback_key(b"secret", "a.test", "b.test", "id2"),
                dialback_key(b"secret", "a.tes", "tb.test", "id")}) == 5  # the space separates


def test_keys_equal() -> None:
    key = dialback_key(b"secret", "a.test", "b.test", "id")
    assert keys_equal(key, str(key))
    assert not keys_equal(key, key[:-1] + ("0" if key[-1] != "0" else "1"))
    assert not keys_equal(key, key[:-1])
    assert not keys_equal(key, "")
    assert keys_equal("", "")
    assert not keys_equal(key, "ü" * 64)  # non-ASCII from the wire: unequal, not TypeError
