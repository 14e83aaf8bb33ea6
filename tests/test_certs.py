"""Certificates: generation, and what `presenced check` finds wrong with a certificate/key pair."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.certs import (
    ID_ON_XMPPADDR,
    Problem,
    certificate_names,
    check_certificate,
    covers,
    ensure_certificate,
    generate_self_signed,
)
from server.config import load_config

UTC = datetime.UTC


def make_cert(tmp_path: Path, name: str, *, not_before: datetime.datetime,
              not_after: datetime.datetime, dns: list[str] | None = None,
              cn: str = "a.test") -> tuple[Path, Path]:
    """A certificate built directly with cryptography, for periods we cannot otherwise get."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    if dns is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_generate(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "deep" / "er" / "c.pem", tmp_path / "keys" / "k.pem"
    generate_self_signed(["a.test", "bücher.test"], cert_path, key_path)
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert cert_path.stat().st_mode & 0o777 == 0o644
    cert = load(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test", "xn--bcher-kva.test"]
    xmpp_addrs = [o.value for o in san.get_values_for_type(x509.OtherName)
                  if o.type_id == ID_ON_XMPPADDR]
    # DER UTF8String: tag 12, length, the JID's UTF-8 (RFC 6120 §13.7.1.4)
    assert xmpp_addrs == [b"\x0c\x06a.test", b"\x0c\x0cb\xc3\xbccher.test"]
    # Each name once, though each is both a DNS-ID and an XmppAddr.
    assert certificate_names(cert) == ["a.test", "xn--bcher-kva.test"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=825) <= lifetime <= datetime.timedelta(days=825, minutes=6)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert check_certificate(cert_path, key_path, ["a.test", "bücher.test"]) == []


def test_generated_certificate_works_for_tls(tmp_path: Path) -> None:
    """A client that trusts the certificate verifies it for each domain (strict X.509 checks)."""
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    generate_self_signed(["a.test", "b.test"], cert_path, key_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_path, key_path)
    for hostname, ok in (("b.test", True), ("c.test", False)):
        client_ctx = ssl.create_default_context(cafile=str(cert_path))
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        done, error = False, None
        for _ in range(10):
            for side in (client, server):
                try:
                    side.do_handshake()
                    done = side is client or done
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLCertVerificationError as exc:
                    error = exc
            if error or done:
                break
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        assert (done, error is None) == (ok, ok), error


def test_mismatched_key(tmp_path: Path) -> None:
    generate_self_signed(["a.test"], tmp_path / "1.pem", tmp_path / "1.key")
    generate_self_signed(["a.test"], tmp_path / "2.pem", tmp_path / "2.key")
    problems = check_certificate(tmp_path / "1.pem", tmp_path / "2.key", ["a.test"])
    assert [(p.severity, p.subject) for p in problems] == [("error", "key")]
    assert "does not belong to certificate" in problems[0].message
    assert str(problems[0]).startswith("error: key ")


def test_expired(tmp_path: Path) -> None:
    now = datetime.datetime.now(UTC)
    cert, key = make_cert(tmp_path, "old", not_before=now - datetime.timedelta(days=400),
                          not_after=now - datetime.timedelta(days=1), dns=["a.test"])
    problems = check_certificate(cert, key, ["a.test"])
    assert [(p.severity, p.subject) for p in problems] == [("error", "certificate")]
    assert "expired on" in problems[0].message


def test_not_yet_valid(tmp_path: Path) -> None:
    now = datetime.datetime.now(UTC)
    cert, key = make_cert(tmp_path, "new", not_before=now + datetime.timedelta(days=2),
                          not_after=now + datetime.timedelta(days=400), dns=["a.test"])
    problems = check_certificate(cert, key, ["a.test"])
    assert [(p.severity, p.subject) for p in problems] == [("error", "certificate")]
    assert "is not valid before" in problems[0].message


def test_expiring_soon_is_a_warning(tmp_path: Path) -> None:
    generate_self_signed(["a.test"], tmp_path / "c.pem", tmp_path / "k.pem", days=10)
    problems = check_certificate(tmp_path / "c.pem", tmp_path / "k.pem", ["a.test"])
    assert [(p.severity, p.subject) for p in problems] == [("warning", "certificate")]
    assert "expires on" in problems[0].message
    generate_self_signed(["a.test"], tmp_path / "c.pem", tmp_path / "k.pem", days=31)
    assert check_certificate(tmp_path / "c.pem", tmp_path / "k.pem", ["a.test"]) == []


def test_uncovered_domain_is_a_warning(tmp_path: Path) -> None:
    generate_self_signed(["a.test"], tmp_path / "c.pem", tmp_path / "k.pem")
    problems = check_certificate(tmp_path / "c.pem", tmp_path / "k.pem", ["a.test", "b.test"])
    assert problems == [Problem("warning", "certificate",
                                f"certificate {tmp_path / 'c.pem'} is not for b.test "
                                f"(it names a.test)")]


def test_wildcards_and_common_name(tmp_path: Path) -> None:
    now = datetime.datetime.now(UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=100)
    cert, key = make_cert(tmp_path, "wild", dns=["*.example.test"], cn="other.test",
                          not_before=start, not_after=end)
    assert certificate_names(load(cert)) == ["*.example.test"]  # CN ignored beside SAN
    problems = check_certificate(cert, key, ["chat.example.test", "a.b.example.test",
                                             "example.test", "other.test"])
    assert [p.message.split(" is not for ")[1].split()[0] for p in problems] == [
        "a.b.example.test", "example.test", "other.test"]
    cert, key = make_cert(tmp_path, "cn", cn="legacy.test", not_before=start, not_after=end)
    assert certificate_names(load(cert)) == ["legacy.test"]  # RFC 6125 §6.4.4: no SAN at all
    assert check_certificate(cert, key, ["legacy.test"]) == []
    assert covers(["*.example.test"], "Chat.Example.Test")
    assert not covers(["a.*.test"], "a.b.test")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    generate_self_signed(["a.test"], tmp_path / "c.pem", tmp_path / "k.pem")
    (tmp_path / "junk").write_text("hello\n")
    found = check_certificate(tmp_path / "missing.pem", tmp_path / "k.pem", ["a.test"])
    assert [(p.severity, p.subject) for p in found] == [("error", "certificate")]
    assert "cannot read certificate" in found[0].message
    assert "No such file" in found[0].message
    found = check_certificate(tmp_path / "junk", tmp_path / "junk", ["a.test"])
    assert [(p.subject, p.message) for p in found] == [
        ("certificate", f"{tmp_path / 'junk'} holds no PEM certificate"),
        ("key", f"{tmp_path / 'junk'} holds no PEM private key")]
    # The key where the certificate should be, and the other way round.
    found = check_certificate(tmp_path / "k.pem", tmp_path / "c.pem", ["a.test"])
    assert [p.subject for p in found] == ["certificate", "key"]
    found = check_certificate(tmp_path / "c.pem", tmp_path / "missing.key", ["a.test"])
    assert [(p.subject, "cannot read key" in p.message) for p in found] == [("key", True)]


def test_encrypted_key(tmp_path: Path) -> None:
    generate_self_signed(["a.test"], tmp_path / "c.pem", tmp_path / "k.pem")
    key = serialization.load_pem_private_key((tmp_path / "k.pem").read_bytes(), None)
    (tmp_path / "enc.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    found = check_certificate(tmp_path / "c.pem", tmp_path / "enc.pem", ["a.test"])
    assert [(p.severity, p.subject) for p in found] == [("error", "key")]
    assert "is encrypted" in found[0].message


def test_chain_file_is_checked_by_its_first_certificate(tmp_path: Path) -> None:
    generate_self_signed(["a.test"], tmp_path / "c.pem", tmp_path / "k.pem")
    generate_self_signed(["x.test"], tmp_path / "i.pem", tmp_path / "i.key")
    chain = tmp_path / "chain.pem"
    chain.write_bytes((tmp_path / "c.pem").read_bytes() + (tmp_path / "i.pem").read_bytes())
    assert check_certificate(chain, tmp_path / "k.pem", ["a.test"]) == []
    problems = check_certificate(chain, tmp_path / "i.key", ["a.test"])
    assert [p.subject for p in problems] == ["key"]


def test_ensure_certificate(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('domains = ["a.test", "b.test"]\ndata_dir = "d"\n')
    config = load_config(tmp_path / "p.toml")
    assert config.tls.generated
    ensure_certificate(config)
    cert = config.tls.certificate.read_bytes()
    assert config.tls.certificate == tmp_path / "d" / "cert.pem"
    assert check_certificate(config.tls.certificate, config.tls.key, config.domains) == []
    ensure_certificate(config)  # there already: kept
    assert config.tls.certificate.read_bytes() == cert
    config.tls.key.unlink()  # half a pair: made again, both
    ensure_certificate(config)
    assert config.tls.certificate.read_bytes() != cert
    assert check_certificate(config.tls.certificate, config.tls.key, config.domains) == []


def test_ensure_certificate_leaves_configured_files_alone(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[tls]\ncertificate = "c.pem"\nkey = "k.pem"\n')
    config = load_config(tmp_path / "p.toml")
    assert not config.tls.generated
    ensure_certificate(config)
    assert not (tmp_path / "c.pem").exists() and not (tmp_path / "k.pem").exists()


def test_needs_a_domain(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_self_signed([], tmp_path / "c.pem", tmp_path / "k.pem")
