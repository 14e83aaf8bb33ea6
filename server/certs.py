"""Certificates: a self-signed one for the first start and `presenced cert`, and the checks of
`presenced check` (readable, PEM, key matches, validity period, names cover our domains)."""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import idna
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

if TYPE_CHECKING:
    from server.config import Config

log = logging.getLogger("presenced")

# RFC 6120 §13.7.1.4: id-on-xmppAddr, an otherName holding a UTF8String JID.
ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
EXPIRY_WARNING = datetime.timedelta(days=14)  # presenced check warns this long before


@dataclass(frozen=True, slots=True)
class Problem:
    severity: str  # "error" or "warning"
    subject: str  # the [tls] setting it concerns: "certificate" or "key"
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


def _a_label(domain: str) -> str:
    """The ASCII form certificates carry (dNSName is IA5String, RFC 5280 §4.2.1.6)."""
    try:
        return idna.encode(domain).decode("ascii").lower()
    except idna.IDNAError:
        return domain.lower()


def _utf8_string(text: str) -> bytes:
    """DER UTF8String (tag 12)."""
    data = text.encode("utf-8")
    n = len(data)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + \
        n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x0c" + length + data


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Readers never see half a file; a key file is never readable by others, not even briefly."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_self_signed(domains: Sequence[str], cert_path: Path | str, key_path: Path | str,
                         days: int = 825) -> None:
    """An EC P-256 key and a self-signed certificate naming every domain (DNS-ID and XmppAddr)."""
    if not domains:
        raise ValueError("a certificate needs at least one domain")
    cert_path, key_path = Path(cert_path), Path(key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _a_label(domains[0]))])
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName(_a_label(d)) for d in domains]
    san += [x509.OtherName(ID_ON_XMPPADDR, _utf8_string(d)) for d in domains]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate peers' clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        # clientAuth too: an s2s stream authenticates the initiating server by its certificate.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_certificate(config: Config) -> None:
    """At start: make the default self-signed certificate when it is not there yet, or make it
    again when it is ours but does not name every domain we serve (a service host was added)."""
    tls = config.tls
    if not tls.generated:
        return
    domains = config.local_domains
    if tls.certificate.exists() and tls.key.exists():
        try:
            leaf = x509.load_pem_x509_certificate(tls.certificate.read_bytes())
        except (OSError, ValueError):
            return  # check_certificate reports it
        names = certificate_names(leaf)
        if all(covers(names, d) for d in domains) or leaf.issuer != leaf.subject:
            return  # a CA's (presenced cert import put it there): never replaced
    generate_self_signed(domains, tls.certificate, tls.key)
    log.warning("event=certificate-generated certificate=%s key=%s domains=%s self_signed=1",
                tls.certificate, tls.key, ",".join(domains))


def names_in_file(path: Path) -> list[str] | None:
    """The names of the first certificate in a PEM file; None when it cannot be read."""
    try:
        return certificate_names(x509.load_pem_x509_certificate(path.read_bytes()))
    except (OSError, ValueError):
        return None


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The names a certificate is for: DNS-IDs and XmppAddrs; the CN only when there is no
    subjectAltName (RFC 6125 §6.4.4)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == ID_ON_XMPPADDR and other.value[:1] == b"\x0c":
            length = other.value[1]
            start = 2 if length < 0x80 else 2 + (length & 0x7F)
            names.append(_a_label(other.value[start:].decode("utf-8", "replace")))
    return list(dict.fromkeys(names))  # a domain is usually both a DNS-ID and an XmppAddr


def covers(names: Sequence[str], domain: str) -> bool:
    """RFC 6125 §6.4: exact match, or a wildcard standing for the whole leftmost label."""
    domain = _a_label(domain)
    for name in names:
        if name == domain:
            return True
        if name.startswith("*.") and "." in domain and domain.split(".", 1)[1] == name[2:]:
            return True
    return False


def check_certificate(cert_path: Path | str, key_path: Path | str,
                      domains: Sequence[str]) -> list[Problem]:
    """Everything wrong with a certificate/key pair for serving these domains."""
    problems: list[Problem] = []
    try:
        certs = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except OSError as exc:
        problems.append(Problem("error", "certificate",
                                f"cannot read certificate {cert_path}: {exc.strerror}"))
        certs = []
    except ValueError:
        problems.append(Problem("error", "certificate",
                                f"{cert_path} holds no PEM certificate"))
        certs = []
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except OSError as exc:
        problems.append(Problem("error", "key", f"cannot read key {key_path}: {exc.strerror}"))
        key = None
    except TypeError:
        problems.append(Problem("error", "key", f"key {key_path} is encrypted"))
        key = None
    except (ValueError, UnsupportedAlgorithm):
        problems.append(Problem("error", "key", f"{key_path} holds no PEM private key"))
        key = None
    if not certs:
        return problems
    leaf = certs[0]  # the chain starts with our own certificate (RFC 8446 §4.4.2)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key is not None and key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(
            *spki):
        problems.append(Problem("error", "key",
                                f"key {key_path} does not belong to certificate {cert_path}"))
    now = datetime.datetime.now(datetime.UTC)
    if now < leaf.not_valid_before_utc:
        problems.append(Problem("error", "certificate", f"certificate {cert_path} is not valid "
                                f"before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"))
    if now > leaf.not_valid_after_utc:
        problems.append(Problem("error", "certificate", f"certificate {cert_path} expired on "
                                f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"))
    elif now + EXPIRY_WARNING > leaf.not_valid_after_utc:
        problems.append(Problem("warning", "certificate", f"certificate {cert_path} expires on "
                                f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"))
    names = certificate_names(leaf)
    for domain in domains:
        if not covers(names, domain):
            problems.append(Problem("warning", "certificate",
                                    f"certificate {cert_path} is not for {domain} "
                                    f"(it names {', '.join(names) or 'nothing'})"))
    return problems


# -- presenced cert import ------------------------------------------------------------------------

# File names of a pair in a directory, chain first: certbot's live/<name>/, then the usual ones.
_PAIR_NAMES = (("fullchain.pem", "privkey.pem"), ("{}.crt", "{}.key"), ("{}.pem", "{}.key"),
               ("{}.cert", "{}.key"), ("{}.pem", "{}-key.pem"))
_MAX_DEPTH = 4  # how deep under each DIR pairs are looked for


@dataclass(frozen=True, slots=True)
class Found:
    """A usable certificate/key pair found on disk."""
    certificate: Path
    key: Path
    names: tuple[str, ...]
    not_after: datetime.datetime
    label: str  # the directory name (certbot) or the file stem: preferred for that domain


def find_pairs(directories: Sequence[Path]) -> tuple[list[Found], list[str]]:
    """Every usable pair under these directories (certbot's ``live/<name>/fullchain.pem`` and
    ``privkey.pem``, or ``NAME.crt``/``NAME.pem`` with ``NAME.key``), and why others were
    passed over."""
    found: list[Found] = []
    skipped: list[str] = []
    seen: set[tuple[Path, Path]] = set()
    for top in directories:
        if not top.is_dir():
            skipped.append(f"{top}: not a directory")
            continue
        for directory, subdirs, files in os.walk(top, followlinks=True):
            here = Path(directory)
            if len(here.relative_to(top).parts) >= _MAX_DEPTH:
                subdirs.clear()
            if "archive" in subdirs and (here / "live").is_dir():
                subdirs.remove("archive")  # certbot's old versions: live/ names the current
            names = set(files)
            for cert_pattern, key_pattern in _PAIR_NAMES:
                for stem in ({here.name} if "{}" not in cert_pattern else
                             {f[:-len(cert_pattern) + 2] for f in files
                              if f.endswith(cert_pattern[2:])}):
                    cert_name, key_name = cert_pattern.format(stem), key_pattern.format(stem)
                    if cert_name not in names or key_name not in names or cert_name == key_name:
                        continue
                    pair = (here / cert_name).resolve(), (here / key_name).resolve()
                    if pair in seen:
                        continue
                    seen.add(pair)
                    usable = _usable(here / cert_name, here / key_name, stem, skipped)
                    if usable is not None:
                        found.append(usable)
    return found, skipped


def _usable(cert: Path, key: Path, label: str, skipped: list[str]) -> Found | None:
    errors = [p for p in check_certificate(cert, key, []) if p.severity == "error"]
    if errors:
        skipped.append(f"{cert}: {errors[0].message}")
        return None
    leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    return Found(cert, key, tuple(certificate_names(leaf)), leaf.not_valid_after_utc, label)


def best_for(domain: str, found: Sequence[Found]) -> Found | None:
    """The pair to serve a domain with: one naming it exactly before a wildcard, one filed
    under the domain's name before others, then the one valid longest."""
    a_label = _a_label(domain)
    fitting = [f for f in found if covers(f.names, domain)]
    if not fitting:
        return None
    return max(fitting, key=lambda f: (a_label in f.names, f.label.lower() == a_label,
                                       f.not_after))


@dataclass(frozen=True, slots=True)
class Imported:
    source: Found
    certificate: Path
    key: Path
    domains: tuple[str, ...]


def import_certificates(config: Config, directories: Sequence[Path]
                        ) -> tuple[list[Imported], list[str]]:
    """Copy the pairs found under the directories to where the configuration reads them: each
    domain of [tls] domain_certificates gets its best pair at its paths; [tls] certificate/key
    get the pair that covers most of the other domains (user domains first). Returns what was
    copied and a line for each domain left without a certificate or file passed over."""
    tls = config.tls
    found, notes = find_pairs(directories)
    done: list[Imported] = []
    targets: dict[tuple[Path, Path], tuple[Found, list[str]]] = {}
    for domain, (cert, key) in tls.domain_certificates.items():
        best = best_for(domain, found)
        if best is None:
            notes.append(f"{domain}: no certificate found for it")
        else:
            targets[(cert, key)] = (best, [domain])
    rest = [d for d in config.local_domains if d not in tls.domain_certificates]
    if rest:
        def score(f: Found) -> tuple[int, int, datetime.datetime]:
            return (sum(covers(f.names, d) for d in config.domains if d in rest),
                    sum(covers(f.names, d) for d in rest), f.not_after)
        candidates = [f for f in found if any(covers(f.names, d) for d in rest)]
        if candidates:
            best = max(candidates, key=score)
            covered = [d for d in rest if covers(best.names, d)]
            targets[(tls.certificate, tls.key)] = (best, covered)
            notes += [f"{d}: no certificate found that also names {covered[0]} (give it its "
                      f"own in [tls] domain_certificates)" for d in rest if d not in covered]
        else:
            notes += [f"{d}: no certificate found for it" for d in rest]
    for (cert, key), (source, domains) in targets.items():
        for path in (cert, key):
            path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(key, source.key.read_bytes(), 0o600)
        _write_atomically(cert, source.certificate.read_bytes(), 0o644)
        log.info("event=certificate-imported source=%s certificate=%s domains=%s",
                 source.certificate, cert, ",".join(domains))
        done.append(Imported(source, cert, key, tuple(domains)))
    return done, notes
