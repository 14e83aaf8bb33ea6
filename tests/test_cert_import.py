"""`presenced cert import DIR...` (server/certs.py import_certificates): certbot's layout and
directories of pairs, matched to our domains and service domains by the names the certificates
carry, copied to where [tls] reads them; `presenced check` warns 14 days before expiry; a
running server picks imported files up on `presenced ctl reload`."""

from __future__ import annotations

import datetime
import logging
import os
import stat
import textwrap
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.certs import check_certificate, ensure_certificate
from server.config import load_config
from tests.conftest import start_server, stop_server
from tests.test_cli import presenced
from tests.test_ctl import ctl, der, served_certificate

UTC = datetime.UTC


class CA:
    """A throw-away certificate authority, so that imported certificates are not self-signed
    (as Let's Encrypt's are not)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])

    def issue(self, directory: Path, cert_name: str, key_name: str, names: list[str],
              days: float = 90, not_before_days: float = 1) -> Path:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=not_before_days))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / cert_name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / key_name).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return directory / cert_name


def certbot(ca: CA, root: Path, name: str, names: list[str], days: float = 90) -> Path:
    """live/<name>/fullchain.pem -> ../../archive/<name>/fullchain1.pem, as certbot does."""
    archive = root / "archive" / name
    ca.issue(archive, "fullchain1.pem", "privkey1.pem", names, days)
    live = root / "live" / name
    live.mkdir(parents=True)
    for kind in ("fullchain", "privkey"):
        os.symlink(f"../../archive/{name}/{kind}1.pem", live / f"{kind}.pem")
    return live / "fullchain.pem"


def write_config(tmp_path: Path, b_certificate: bool = True) -> Path:
    sni = ('domain_certificates = { "b.test" = ["certs/b.pem", "certs/b.key"] }'
           if b_certificate else "")
    path = tmp_path / "presenced.toml"
    path.write_text(textwrap.dedent(f"""\
        domains = ["a.test", "b.test"]
        data_dir = "data"
        [listen]
        c2s = ["127.0.0.1:0"]
        c2s_tls = ["127.0.0.1:0"]
        https = []
        [tls]
        {sni}
        [muc]
        enabled = true
        """))
    return path


def test_certbot_and_pairs_are_copied_where_the_config_reads_them(tmp_path: Path) -> None:
    ca = CA()
    letsencrypt = tmp_path / "letsencrypt"
    # a.test with its service host muc.a.test, and an older, shorter-lived one for a.test only.
    services = ["muc.a.test", "muc.b.test", "pubsub.a.test", "pubsub.b.test"]
    a_source = certbot(ca, letsencrypt, "a.test", ["a.test", *services])
    certbot(ca, letsencrypt, "old", ["a.test"], days=20)
    pairs = tmp_path / "pairs"
    ca.issue(pairs, "b.test.crt", "b.test.key", ["b.test"])
    ca.issue(pairs, "expired.crt", "expired.key", ["b.test"], days=-1, not_before_days=30)
    ca.issue(pairs / "wild", "star.pem", "star.key", ["*.b.test"])
    config_path = write_config(tmp_path)
    result = presenced(tmp_path, "cert", "import", str(letsencrypt), str(pairs),
                       "--config", str(config_path))
    assert result.code == 0, result
    assert "Traceback" not in result.err
    config = load_config(config_path)
    tls = config.tls
    # [tls] certificate/key (data_dir's) get the one naming a.test and its services.
    assert tls.certificate.read_bytes() == a_source.read_bytes()
    assert tls.key.read_bytes() == (a_source.parent / "privkey.pem").read_bytes()
    b_cert, b_key = tls.domain_certificates["b.test"]
    assert b_cert.read_bytes() == (pairs / "b.test.crt").read_bytes()  # exact before wildcard
    for key in (tls.key, b_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    line = next(x for x in result.out.splitlines() if x.startswith(f"imported {a_source}"))
    assert set(line.split(" for ")[1].split(" (")[0].split(", ")) == {"a.test", *services}
    assert "expired" in result.err  # passed over, and said so
    assert "presenced ctl reload" in result.out
    # presenced check is content; a start does not replace the CA's certificate.
    check = presenced(tmp_path, "check", "--config", str(config_path))
    assert check.code == 0 and check.out.strip().endswith(": ok"), check
    before = tls.certificate.read_bytes()
    ensure_certificate(config)
    assert tls.certificate.read_bytes() == before


def test_domains_without_a_certificate_are_named(tmp_path: Path) -> None:
    ca = CA()
    pairs = tmp_path / "pairs"
    ca.issue(pairs, "a.test.pem", "a.test.key", ["a.test"])
    mismatched = ca.issue(pairs, "mix.crt", "mix.key", ["b.test"])
    ca.issue(pairs / "other", "mix.crt", "mix.key", ["b.test"])
    (pairs / "mix.key").write_bytes((pairs / "other" / "mix.key").read_bytes())
    (pairs / "other" / "mix.key").unlink()
    config_path = write_config(tmp_path, b_certificate=False)
    result = presenced(tmp_path, "cert", "import", str(pairs), "--config", str(config_path))
    assert result.code == 0, result
    assert f"{mismatched}: key" in result.err and "does not belong" in result.err
    assert "b.test: no certificate found that also names a.test" in result.err
    assert "muc.a.test" in result.err
    # Nothing at all for our domains: an error, and nothing written.
    (tmp_path / "data" / "cert.pem").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = presenced(tmp_path, "cert", "import", str(empty), "--config", str(config_path))
    assert result.code == 1 and "no certificate for any of our domains" in result.err
    assert not (tmp_path / "data" / "cert.pem").exists()
    result = presenced(tmp_path, "cert", "import", "--config", str(config_path))
    assert result.code == 1 and "at least one directory" in result.err


def test_check_warns_14_days_before_expiry(tmp_path: Path) -> None:
    ca = CA()
    soon = ca.issue(tmp_path, "soon.pem", "soon.key", ["a.test"], days=13)
    later = ca.issue(tmp_path, "later.pem", "later.key", ["a.test"], days=15)
    problems = check_certificate(soon, tmp_path / "soon.key", ["a.test"])
    assert [(p.severity, "expires on" in p.message) for p in problems] == [("warning", True)]
    assert check_certificate(later, tmp_path / "later.key", ["a.test"]) == []
    config = tmp_path / "presenced.toml"
    config.write_text(textwrap.dedent(f"""\
        domains = ["a.test"]
        data_dir = "data"
        [listen]
        c2s = []
        c2s_tls = []
        https = []
        [tls]
        certificate = "{soon}"
        key = "{tmp_path / 'soon.key'}"
        """))
    result = presenced(tmp_path, "check", "--config", str(config))
    assert result.code == 0 and "warning:" in result.out and "expires on" in result.out


async def test_import_then_reload_serves_the_imported_certificate(tmp_path: Path) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path)
    try:
        ca = CA()
        letsencrypt = tmp_path / "letsencrypt"
        source = certbot(ca, letsencrypt, "a.test", ["a.test", "b.test"])
        host, port = running.address("c2s_tls")
        assert await served_certificate(host, port, "a.test") != der(source)
        result = presenced(tmp_path, "cert", "import", str(letsencrypt), "--config",
                           str(running.config_path))
        assert result.code == 0, result
        code, _out, err = await ctl(running.config_path, "reload")
        assert code == 0, err
        assert await served_certificate(host, port, "a.test") == der(source)
    finally:
        await stop_server(running)
