"""Real Prosody, ejabberd and presenced instances on loopback, for the benchmark and for interop
(federation) tests.

Each peer lives in a directory of its own (config, certificates, data, logs), listens on its own
127.0.0.N address and is started as our child in a session of its own, so that it is stopped by
its process id and never by name. The facts behind the details (ejabberdctl's config precedence,
``run_as_root``, Prosody's private hosts file) are in /work/shared/INTEROP.md.

    peer = ProsodyPeer(host="127.0.0.21", domains=("bench.test",))
    peer.write_accounts("bench.test", ["u1", "u2"], "pw")   # bulk, before start
    peer.start()
    ...
    peer.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class PeerError(Exception):
    """A peer could not be configured, started or driven; the message carries its log tail."""


# -- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files: ``certificate`` (leaf, then the CA if any), ``key``, ``chain`` (both in one
    file, as ejabberd wants it) and ``ca`` (the issuer, None when self-signed)."""

    certificate: Path
    key: Path
    chain: Path
    ca: Path | None = None


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(directory: Path, name: str = "bench test CA") -> CertificateAuthority:
    """A fresh EC P-256 CA (ca.pem, ca.key) in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    ca = CertificateAuthority(directory / "ca.pem", directory / "ca.key")
    ca.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca.key.write_bytes(_pem_key(key))
    ca.key.chmod(0o600)
    return ca


def make_certificates(directory: Path, names: Sequence[str], *,
                      ca: CertificateAuthority | None = None, stem: str = "server") -> Certificates:
    """An EC P-256 certificate for names (dNSName SANs; the first is also the CN), issued by ca
    or self-signed, usable for both TLS client and server auth (s2s needs both)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    if ca is not None:
        ca_cert = x509.load_pem_x509_certificate(ca.certificate.read_bytes())
        ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        issuer, signer = ca_cert.subject, ca_key
    else:
        ca_cert, issuer, signer = None, subject, key
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                              critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if ca_cert is not None:
        # RFC 5280 §4.2.1.1: issued certificates name their issuer's key (strict verifiers,
        # e.g. cryptography's, insist on it).
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    if ca_cert is not None:
        cert_pem += ca_cert.public_bytes(serialization.Encoding.PEM)
    result = Certificates(directory / f"{stem}.crt", directory / f"{stem}.key",
                          directory / f"{stem}.pem", ca.certificate if ca else None)
    result.certificate.write_bytes(cert_pem)
    result.key.write_bytes(_pem_key(key))
    result.chain.write_bytes(cert_pem + _pem_key(key))
    result.key.chmod(0o600)
    result.chain.chmod(0o600)
    return result


# -- processes ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return data[data.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            tree.append(pid)
            todo.extend(children.get(pid, ()))
    return tree


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes (/proc/PID/stat fields 14 and 15), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def rss_kib(pids: Iterable[int]) -> int:
    """Resident set size (VmRSS) of the processes, summed, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE_KIB
        except (OSError, IndexError, ValueError):
            pass
    return total


def wait_for_port(host: str, port: int, timeout: float,
                  alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if alive is not None and alive.poll() is not None:
            raise PeerError(f"exited with status {alive.returncode} before listening on "
                            f"{host}:{port}")
        if time.monotonic() > deadline:
            raise PeerError(f"not listening on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def raise_nofile_limit(wanted: int = 65536) -> None:
    """Servers inherit our open-file limit: a thousand sessions need more than 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the common part ----------------------------------------------------------------------------


class Peer:
    """A server process we started. Subclasses write their config in ``start``."""

    kind = "peer"
    # /proc/PID/comm of the process(es) whose memory is the server's (the rest of the tree is
    # wrappers: shells, su); empty = the whole tree.
    server_process_names: tuple[str, ...] = ()

    def __init__(self, *, workdir: Path | None, host: str, domains: Sequence[str],
                 c2s_port: int | None, c2s_direct_tls_port: int | None, s2s_port: int | None,
                 certificates: Certificates | None, cafile: Path | None,
                 keep: bool = False) -> None:
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.kind}-"))
            self._own_workdir = not keep
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            self._own_workdir = False
        self.workdir = workdir.resolve()
        self.host = host
        self.domains = tuple(domains)
        self.c2s_port = c2s_port
        self.c2s_direct_tls_port = c2s_direct_tls_port
        self.s2s_port = s2s_port
        self.cafile = cafile
        self.certificates = certificates or make_certificates(self.workdir / "certs",
                                                              list(self.domains))
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file = self.workdir / f"{self.kind}.log"

    # lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def _stop_process(self, timeout: float) -> None:
        self._terminate(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and remove its directory (unless given by the caller or keep)."""
        self._stop_process(timeout)
        self._cleanup()

    def restart(self, timeout: float = 30.0) -> None:
        """A fresh process on the same data (accounts, rosters): no state left in memory."""
        self._stop_process(timeout)
        self.start(timeout)

    async def astart(self, timeout: float = 30.0) -> None:
        """start() without blocking the event loop (for async tests with an in-process server)."""
        await asyncio.to_thread(self.start, timeout)

    async def astop(self, timeout: float = 15.0) -> None:
        await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise PeerError(f"{self.kind} is not running")
        return self.process.pid

    def pid_tree(self) -> list[int]:
        """The processes of this server (our child and its descendants), for CPU accounting."""
        return process_tree(self.pid) if self.running else []

    def server_pids(self) -> list[int]:
        """The process(es) doing the server's work, for memory accounting (beam.smp, lua...)."""
        tree = self.pid_tree()
        if self.server_process_names:
            chosen = [p for p in tree if process_name(p) in self.server_process_names]
            if chosen:
                return chosen
        return tree

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid_tree())

    def rss_kib(self) -> int:
        return rss_kib(self.server_pids())

    def log_tail(self, lines: int = 15) -> str:
        return _tail(self.log_file, lines)

    # helpers -------------------------------------------------------------------------------

    def _spawn(self, argv: Sequence[str], *, cwd: Path, output: Path | None = None,
               **popen: Any) -> subprocess.Popen[bytes]:
        raise_nofile_limit()
        out = open(output or self.workdir / f"{self.kind}.out", "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, **popen)
        finally:
            out.close()

    def _ports(self) -> list[int]:
        return [p for p in (self.c2s_port, self.c2s_direct_tls_port, self.s2s_port) if p]

    def _check_free(self) -> None:
        """Before starting: a stale server on our address would answer in our place."""
        for port in self._ports():
            if not port_is_free(self.host, port):
                raise PeerError(f"{self.kind}: {self.host}:{port} is already in use")

    def _wait_listening(self, timeout: float) -> None:
        assert self.process is not None
        try:
            for port in self._ports():
                wait_for_port(self.host, port, timeout, self.process)
        except PeerError as exc:
            self._kill()
            raise PeerError(f"{self.kind} on {self.host}: {exc}\n{self.log_tail()}\n"
                            f"{_tail(self.workdir / f'{self.kind}.out')}") from None

    def _terminate(self, timeout: float) -> None:
        """SIGTERM to our child, then SIGKILL to its session if it has not exited in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self.process = None

    def _kill(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):  # our own session: only its processes
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def _cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _lua(value: object) -> str:
    """A Lua literal for a str, bool, int or list/tuple of them (config files)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if any(ord(c) < 0x20 for c in value):
            raise PeerError(f"control character in a config string: {value!r}")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "{ " + ", ".join(_lua(v) for v in value) + " }"
    raise TypeError(type(value))


def _scram_sha1(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) of RFC 5802 §3 for SCRAM-SHA-1."""
    salted = hashlib.pbkdf2_hmac("sha1", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha1")
    return (hashlib.sha1(client_key).digest(), hmac.digest(salted, b"Server Key", "sha1"))


# -- Prosody ------------------------------------------------------------------------------------

PROSODY_MODULES = ("roster", "saslauth", "tls", "disco", "ping")


class ProsodyPeer(Peer):
    """Prosody 0.12 (Debian ``prosody``), run as root with ``run_as_root``.

    s2s is off unless s2s_port is given; dialback adds mod_dialback (XEP-0220) so that a peer
    without a trusted certificate can still federate when s2s_secure_auth is false. hosts maps
    names to loopback addresses for s2s through lua-unbound's private hosts file. nagle=False
    (TCP_NODELAY, as ejabberd and asyncio servers do) departs from Prosody's default: with
    Nagle, each TLS 1.3 stream restart stalls ~40 ms on the peer's delayed ACK.
    """

    kind = "prosody"
    server_process_names = ("lua5.4", "lua5.3", "lua5.2", "lua5.1", "lua", "prosody")

    def __init__(self, workdir: Path | None = None, *, host: str = "127.0.0.21",
                 domains: Sequence[str] = ("bench.test",), c2s_port: int | None = 5222,
                 c2s_direct_tls_port: int | None = None, s2s_port: int | None = None,
                 certificates: Certificates | None = None, cafile: Path | None = None,
                 modules: Sequence[str] = PROSODY_MODULES, extra_modules: Sequence[str] = (),
                 dialback: bool = True, s2s_secure_auth: bool = False,
                 s2s_require_encryption: bool = True, hosts: Mapping[str, str] | None = None,
                 components: Mapping[str, str] | None = None, log_level: str = "info",
                 in_band_registration: bool = False, nagle: bool = False,
                 https_port: int | None = None, extra_config: str = "",
                 keep: bool = False) -> None:
        super().__init__(workdir=workdir, host=host, domains=domains, c2s_port=c2s_port,
                         c2s_direct_tls_port=c2s_direct_tls_port, s2s_port=s2s_port,
                         certificates=certificates, cafile=cafile, keep=keep)
        self.nagle = nagle
        self.https_port = https_port  # mod_websocket / mod_bosh, when given
        mods = list(modules) + [m for m in extra_modules if m not in modules]
        if dialback and "dialback" not in mods:
            mods.append("dialback")
        if in_band_registration and "register" not in mods:
            mods.append("register")
        self.modules = mods
        self.dialback = dialback
        self.s2s_secure_auth = s2s_secure_auth
        self.s2s_require_encryption = s2s_require_encryption
        self.hosts = dict(hosts or {})
        self.components = dict(components or {})  # name -> component module, e.g. "muc"
        self.log_level = log_level
        self.in_band_registration = in_band_registration
        self.extra_config = extra_config
        self.config_file = self.workdir / "prosody.cfg.lua"
        self.data_path = self.workdir / "data"
        self.data_path.mkdir(exist_ok=True)

    def _config(self) -> str:
        certs = self.certificates
        ssl = {"certificate": str(certs.certificate), "key": str(certs.key)}
        if self.cafile is not None:
            ssl["cafile"] = str(self.cafile)
        ssl_lua = "{ " + "; ".join(f"{k} = {_lua(v)}" for k, v in ssl.items()) + " }"
        (self.workdir / "certdir").mkdir(exist_ok=True)  # silences "error indexing certificates"
        lines = [
            "run_as_root = true",
            "daemonize = false",
            f"pidfile = {_lua(str(self.workdir / 'prosody.pid'))}",
            f"data_path = {_lua(str(self.data_path))}",
            f"certificates = {_lua(str(self.workdir / 'certdir'))}",
            f"log = {{ {self.log_level} = {_lua(str(self.log_file))} }}",
            f"interfaces = {_lua([self.host])}",
            f"c2s_ports = {_lua([self.c2s_port] if self.c2s_port else [])}",
            f"c2s_direct_tls_ports = "
            f"{_lua([self.c2s_direct_tls_port] if self.c2s_direct_tls_port else [])}",
            f"s2s_ports = {_lua([self.s2s_port] if self.s2s_port else [])}",
            "http_ports = {}",
            f"https_ports = {_lua([self.https_port] if self.https_port else [])}",
            f"https_interfaces = {_lua([self.host])}",
            "consider_websocket_secure = true",
            f"admin_socket = {_lua(str(self.workdir / 'admin.sock'))}",
            'modules_disabled = { "posix" }',
            f"modules_enabled = {_lua(self.modules)}",
            'authentication = "internal_hashed"',
            'storage = "internal"',
            "c2s_require_encryption = true",
            f"s2s_require_encryption = {_lua(self.s2s_require_encryption)}",
            f"s2s_secure_auth = {_lua(self.s2s_secure_auth)}",
            f"allow_registration = {_lua(self.in_band_registration)}",
            # The default accept backlog (32) drops SYNs when hundreds of clients connect.
            f"network_settings = {{ tcp_backlog = 1024; nagle = {_lua(self.nagle)} }}",
            f"ssl = {ssl_lua}",
        ]
        if self.hosts:
            hosts_file = self.workdir / "hosts"
            hosts_file.write_text("".join(f"{addr} {name}\n" for name, addr in self.hosts.items()))
            lines.append(f"unbound = {{ hoststxt = {_lua(str(hosts_file))} }}")
        if self.in_band_registration:
            lines.append("min_seconds_between_registrations = 0")
        if self.extra_config:
            lines.append(self.extra_config)
        for domain in self.domains:
            lines += [f"VirtualHost {_lua(domain)}", f"  ssl = {ssl_lua}"]
        for name, module in self.components.items():
            lines += [f"Component {_lua(name)} {_lua(module)}", f"  ssl = {ssl_lua}"]
        return "\n".join(lines) + "\n"

    def write_accounts(self, domain: str, users: Iterable[str], password: str, *,
                       iterations: int = 4096) -> int:
        """Create accounts by writing Prosody's account files (internal_hashed storage:
        ``DATA/<domain %-encoded>/accounts/<user>.dat``) — instant where prosodyctl takes
        ~0.1 s each. Same salt for all (one PBKDF2); fine for test accounts only."""
        salt = str(uuid.uuid4())  # Prosody's own salts are UUID strings, used as their bytes
        stored_key, server_key = _scram_sha1(password, salt.encode(), iterations)
        directory = self.data_path / _prosody_encode(domain) / "accounts"
        directory.mkdir(parents=True, exist_ok=True)
        body = ("return {\n"
                f'\t["iteration_count"] = {iterations};\n'
                f'\t["stored_key"] = "{stored_key.hex()}";\n'
                f'\t["salt"] = {_lua(salt)};\n'
                f'\t["server_key"] = "{server_key.hex()}";\n'
                "};\n")
        count = 0
        for user in users:
            (directory / f"{_prosody_encode(user)}.dat").write_text(body)
            count += 1
        return count

    def register(self, user: str, domain: str, password: str) -> None:
        """One account through prosodyctl (works whether or not the server runs)."""
        self.prosodyctl("register", user, domain, password)

    def prosodyctl(self, *args: str) -> str:
        self.config_file.write_text(self._config())
        done = subprocess.run(["prosodyctl", "--config", str(self.config_file), *args],
                              capture_output=True, text=True, timeout=60, cwd=self.workdir)
        if done.returncode != 0:
            raise PeerError(f"prosodyctl {args[0]}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which("prosody") is None:
            raise PeerError("prosody is not installed (apt-get install prosody lua-unbound)")
        self._check_free()
        self.config_file.write_text(self._config())
        self.process = self._spawn(["prosody", "--config", str(self.config_file)],
                                   cwd=self.workdir)
        self._wait_listening(timeout)



def _prosody_encode(name: str) -> str:
    """Prosody's datamanager encoding of file names: each byte outside [A-Za-z0-9] (Lua's %W)
    as %xx, lower-case hex ("bench.test" -> "bench%2etest")."""
    return "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else f"%{b:02x}"
                   for b in name.encode())


# -- ejabberd -----------------------------------------------------------------------------------

EJABBERD_MODULES: dict[str, dict[str, object]] = {
    "mod_roster": {"versioning": True},
    "mod_disco": {},
    "mod_ping": {},
    "mod_caps": {},
}


class EjabberdPeer(Peer):
    """ejabberd 23.01 (Debian ``ejabberd``), driven through ejabberdctl with a ctl-config and
    config dir of our own; runs as the ``ejabberd`` user, so its directory is chowned to it and
    must be reachable by it (the default, a fresh directory under /tmp, is)."""

    kind = "ejabberd"
    server_process_names = ("beam.smp",)
    _counter = 0

    def __init__(self, workdir: Path | None = None, *, host: str = "127.0.0.22",
                 domains: Sequence[str] = ("bench.test",), c2s_port: int | None = 5222,
                 c2s_direct_tls_port: int | None = None, s2s_port: int | None = None,
                 certificates: Certificates | None = None, cafile: Path | None = None,
                 modules: Mapping[str, Mapping[str, object]] | None = None,
                 extra_modules: Mapping[str, Mapping[str, object]] | None = None,
                 dialback: bool = True, s2s_use_starttls: str = "optional",
                 in_band_registration: bool = False, loglevel: str = "info",
                 s2s_hosts: Mapping[str, tuple[str, int]] | None = None,
                 extra_config: str = "", keep: bool = False) -> None:
        """s2s_hosts: remote domain → (IPv4 address, port) that ejabberd's outgoing s2s
        connections to that domain go to (through a dnsmasq of ours serving SRV records whose
        targets are the addresses themselves; see _start_dns)."""
        super().__init__(workdir=workdir, host=host, domains=domains, c2s_port=c2s_port,
                         c2s_direct_tls_port=c2s_direct_tls_port, s2s_port=s2s_port,
                         certificates=certificates, cafile=cafile, keep=keep)
        self.s2s_hosts = {domain.lower(): (address, int(port))
                          for domain, (address, port) in (s2s_hosts or {}).items()}
        for domain, (address, port) in self.s2s_hosts.items():
            if not _is_ipv4(address) or not 0 < port < 65536 or not _is_dns_name(domain):
                raise PeerError(f"s2s_hosts: {domain} → {address}:{port} is not a DNS name → "
                                "IPv4 address, port")
        self._dns: subprocess.Popen[bytes] | None = None
        self.dns_port: int | None = None
        mods = {k: dict(v) for k, v in (modules if modules is not None
                                        else EJABBERD_MODULES).items()}
        mods.update({k: dict(v) for k, v in (extra_modules or {}).items()})
        if s2s_port and dialback:
            mods.setdefault("mod_s2s_dialback", {})
        if in_band_registration:
            mods.setdefault("mod_register", {"ip_access": "all", "access": "all"})
        self.modules = mods
        self.s2s_use_starttls = s2s_use_starttls
        self.in_band_registration = in_band_registration
        self.loglevel = loglevel
        self.extra_config = extra_config
        EjabberdPeer._counter += 1
        self.node = f"bench{os.getpid()}x{EjabberdPeer._counter}@localhost"
        for sub in ("spool", "logs"):
            (self.workdir / sub).mkdir(exist_ok=True)
        self.log_file = self.workdir / "logs" / "ejabberd.log"

    def _ctl_argv(self, *args: str) -> list[str]:
        d = self.workdir
        return ["ejabberdctl", "--config-dir", str(d), "--ctl-config", str(d / "ejabberdctl.cfg"),
                "--logs", str(d / "logs"), "--spool", str(d / "spool"), *args]

    def _write_config(self) -> None:
        d = self.workdir
        # Files it reads must be its own: it runs as the ejabberd user.
        chain = d / "server.pem"
        chain.write_bytes(self.certificates.chain.read_bytes())
        lines = [
            f"hosts: [{', '.join(_yaml(h) for h in self.domains)}]",
            f"loglevel: {self.loglevel}",
            f"certfiles: [{_yaml(str(chain))}]",
            "auth_password_format: scram",
            "registration_timeout: infinity",
            f"s2s_use_starttls: {self.s2s_use_starttls}",
            "listen:",
        ]
        if self.cafile is not None:
            ca = d / "ca.pem"
            ca.write_bytes(Path(self.cafile).read_bytes())
            lines.insert(3, f"ca_file: {_yaml(str(ca))}")
        if self.c2s_port:
            lines += [f"  - {{port: {self.c2s_port}, ip: {_yaml(self.host)}, module: ejabberd_c2s,"
                      " starttls_required: true, backlog: 1024}"]
        if self.c2s_direct_tls_port:
            lines += [f"  - {{port: {self.c2s_direct_tls_port}, ip: {_yaml(self.host)},"
                      " module: ejabberd_c2s, tls: true, backlog: 1024}"]
        if self.s2s_port:
            lines += [f"  - {{port: {self.s2s_port}, ip: {_yaml(self.host)},"
                      " module: ejabberd_s2s_in, backlog: 1024}"]
        lines.append("modules:")
        for name, options in self.modules.items():
            opts = ", ".join(f"{k}: {_yaml(v)}" for k, v in options.items())
            lines.append(f"  {name}: {{{opts}}}")
        if self.extra_config:
            lines.append(self.extra_config)
        (d / "ejabberd.yml").write_text("\n".join(lines) + "\n")
        (d / "ejabberdctl.cfg").write_text(
            f"ERLANG_NODE={self.node}\nERL_EPMD_ADDRESS=127.0.0.1\n"
            f"INET_DIST_INTERFACE=127.0.0.1\nEJABBERD_CONFIG_PATH={d / 'ejabberd.yml'}\n"
            f"EJABBERD_PID_PATH={d / 'ejabberd.pid'}\n"
            'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
        # ejabberdctl exports ERL_INETRC=CONFIG_DIR/inetrc: Erlang's own resolver (inet_res,
        # which ejabberd uses for SRV only) asks our dnsmasq and nothing else.
        inetrc = d / "inetrc"
        if self.s2s_hosts and self.dns_port:
            nameserver = "{" + self.host.replace(".", ",") + "}"
            inetrc.write_text('{resolv_conf, "/dev/null"}.\n'
                              f"{{nameserver, {nameserver}, {self.dns_port}}}.\n")
        else:
            inetrc.unlink(missing_ok=True)
        subprocess.run(["chown", "-R", "ejabberd:ejabberd", str(d)], check=True)

    @staticmethod
    def _as_ejabberd() -> dict[str, Any]:
        """Run as root, ejabberdctl would switch to its user through su, whose PAM session
        resets the open-file limit to 1024 (accept fails with EMFILE at ~1000 sessions): be
        that user from the start instead, with our limits and its home (the Erlang cookie)."""
        if os.geteuid() != 0:
            return {}
        account = pwd.getpwnam("ejabberd")
        env = dict(os.environ, HOME=account.pw_dir, USER="ejabberd", LOGNAME="ejabberd")
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [],
                "env": env}

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """ejabberdctl against this node (e.g. "register", "u", "d", "pw")."""
        done = subprocess.run(self._ctl_argv(*args), capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir / "spool",
                              **self._as_ejabberd())
        if done.returncode != 0:
            raise PeerError(f"ejabberdctl {args[0]}: {done.stdout}{done.stderr}")
        return done.stdout

    def register(self, user: str, domain: str, password: str) -> None:
        """One account (~0.3 s): for many, open in_band_registration and use
        bench.loadgen.register_inband."""
        self.ctl("register", user, domain, password)

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which("ejabberdctl") is None:
            raise PeerError("ejabberd is not installed (apt-get install ejabberd)")
        if _unreachable_by_others(self.workdir):
            raise PeerError(f"{self.workdir} is not reachable by the ejabberd user: use a "
                            f"directory under /tmp (the default)")
        self._check_free()
        try:
            if self.s2s_hosts:
                self._start_dns(timeout)
            self._write_config()
            self.process = self._spawn(self._ctl_argv("foreground"), cwd=self.workdir / "spool",
                                       **self._as_ejabberd())
            self._wait_listening(timeout)
        except BaseException:
            self._stop_dns()
            raise

    def _start_dns(self, timeout: float) -> None:
        """ejabberd's outgoing s2s (xmpp_stream_out) asks inet_res for the SRV records
        _xmpps-server/_xmpp-server._tcp.DOMAIN, then resolves each target with
        net:getaddrinfo, i.e. libc (/etc/hosts, /etc/resolv.conf; Erlang's inetrc plays no
        part): a target "b.test" fails there with enoname. A target that is an IPv4 address
        written as a name ("127.0.0.32") needs no lookup, so a dnsmasq on our own address,
        serving only such SRV records, is all it takes, and it carries the port too."""
        if shutil.which("dnsmasq") is None:
            raise PeerError("s2s_hosts needs dnsmasq (apt-get install dnsmasq-base)")
        self._stop_dns()
        self.dns_port = _free_udp_tcp_port(self.host)
        lines = ["no-resolv", "no-hosts", "no-poll", "bind-interfaces", "log-queries",
                 "log-facility=-", "pid-file=", f"listen-address={self.host}",
                 f"port={self.dns_port}"]
        for domain, (address, port) in self.s2s_hosts.items():
            # local=: NXDOMAIN at once for anything else under it (_xmpps-server, A, AAAA).
            lines += [f"local=/{domain}/",
                      f"srv-host=_xmpp-server._tcp.{domain},{address},{port},0,5"]
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join(lines) + "\n")
        log = self.workdir / "dnsmasq.log"
        self._dns = self._spawn(["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"],
                                cwd=self.workdir, output=log)
        probe = f"_xmpp-server._tcp.{next(iter(self.s2s_hosts))}"
        deadline = time.monotonic() + timeout
        while not _dns_answers(self.host, self.dns_port, probe):
            if self._dns.poll() is not None or time.monotonic() > deadline:
                self._stop_dns()
                raise PeerError(f"dnsmasq on {self.host}:{self.dns_port} does not answer "
                                f"{probe}:\n{_tail(log)}")

    def _stop_dns(self) -> None:
        dns, self._dns = self._dns, None
        if dns is None:
            return
        if dns.poll() is None:
            dns.send_signal(signal.SIGTERM)
            try:
                dns.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # its own session
                    os.killpg(dns.pid, signal.SIGKILL)
                dns.wait()

    def _stop_process(self, timeout: float) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.ctl("stop", timeout=timeout)
                self.process.wait(timeout)
            except (PeerError, subprocess.TimeoutExpired):
                self._kill()
        self.process = None
        self._stop_dns()


def _is_ipv4(address: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, address)
    except OSError:
        return False
    return True


def _is_dns_name(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return all(0 < len(label) < 64 and label.isascii()
               and all(c.isalnum() or c == "-" for c in label) for label in labels)


def _free_udp_tcp_port(host: str) -> int:
    """A port free for both UDP and TCP on host (a DNS server listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            if port_is_free(host, port):
                return port
    raise PeerError(f"no free UDP+TCP port on {host}")


def _dns_answers(host: str, port: int, name: str, wait: float = 0.2) -> bool:
    """The DNS server at host:port answers an SRV query for name with at least one record."""
    query_id = int.from_bytes(os.urandom(2), "big")
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    packet = (query_id.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
              + qname + b"\x00\x21\x00\x01")  # RD; one question: SRV, IN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        try:
            sock.sendto(packet, (host, port))
            reply = sock.recv(4096)
        except OSError:  # timeout, or ECONNREFUSED while it is not bound yet
            time.sleep(wait / 4)
            return False
    return (len(reply) >= 12 and reply[:2] == packet[:2] and reply[2] & 0x80 != 0
            and reply[3] & 0x0F == 0 and int.from_bytes(reply[6:8], "big") > 0)


def _unreachable_by_others(path: Path) -> bool:
    """Some parent directory lacks the search bit for others (the directory itself gets chowned)."""
    return any(not parent.stat().st_mode & 0o001 for parent in path.parents)


def _yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    raise TypeError(type(value))


# -- presenced ----------------------------------------------------------------------------------


class PresencedPeer(Peer):
    """Our own server as a separate process (``python -m server serve``), like the others."""

    kind = "presenced"

    def __init__(self, workdir: Path | None = None, *, host: str = "127.0.0.20",
                 domains: Sequence[str] = ("bench.test",), c2s_port: int | None = 5222,
                 c2s_direct_tls_port: int | None = None, s2s_port: int | None = None,
                 certificates: Certificates | None = None, cafile: Path | None = None,
                 log_level: str = "info", python: str = sys.executable,
                 https_port: int | None = None, extra_config: str = "",
                 keep: bool = False) -> None:
        super().__init__(workdir=workdir, host=host, domains=domains, c2s_port=c2s_port,
                         c2s_direct_tls_port=c2s_direct_tls_port, s2s_port=s2s_port,
                         certificates=certificates, cafile=cafile, keep=keep)
        self.https_port = https_port  # WebSocket and BOSH (bench/ws_messages.py)
        self.extra_config = extra_config  # TOML tables appended, e.g. "[s2s]\nroutes = …"
        self.log_level = log_level
        self.python = python
        self.config_file = self.workdir / "presenced.toml"
        self.data_dir = self.workdir / "data"
        self.serve_args: tuple[str, ...] = ()  # e.g. ("--workers", "2") (bench/cluster.py)

    def _write_config(self) -> None:
        def addr(port: int | None) -> str:
            return f'["{self.host}:{port}"]' if port else "[]"
        tls = (f'certificate = "{self.certificates.certificate}"\n'
               f'key = "{self.certificates.key}"\n')
        if self.cafile is not None:
            tls += f'ca_file = "{self.cafile}"\n'
        text = (f"domains = [{', '.join(_yaml(d) for d in self.domains)}]\n"
                f'data_dir = "{self.data_dir}"\n'
                f"[listen]\nc2s = {addr(self.c2s_port)}\n"
                f"c2s_tls = {addr(self.c2s_direct_tls_port)}\n"
                # XMPP streams only unless asked, like the other peers: no HTTP server on its
                # fixed default port, which a restart or a second run would find still taken.
                f"https = {addr(self.https_port)}\n")
        if self.s2s_port:
            text += f"s2s = {addr(self.s2s_port)}\n"
        text += f'[tls]\n{tls}[log]\nlevel = "{self.log_level}"\n{self.extra_config}'
        self.config_file.write_text(text)

    def write_accounts(self, domain: str, users: Iterable[str], password: str) -> int:
        """Bulk accounts through the server's own storage (one process, one key derivation:
        the same salt for all, fine for test accounts only)."""
        self._write_config()
        code = ("import asyncio, sys\n"
                "from server.config import load_config\n"
                "from server.storage import open_storage\n"
                "from server.storage.base import AccountExists\n"
                "from server.stream.scram import derive_credentials\n"
                "async def main(path, domain, password, users):\n"
                "    config = load_config(path)\n"
                "    creds = derive_credentials(password, config.c2s.scram_iterations)\n"
                "    storage = await open_storage(config)\n"
                "    try:\n"
                "        for user in users:\n"
                "            try:\n"
                "                await storage.accounts.create(user, domain, creds)\n"
                "            except AccountExists:\n"
                "                pass\n"
                "    finally:\n"
                "        await storage.close()\n"
                "asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3],\n"
                "                 sys.stdin.read().split()))\n")
        names = list(users)
        done = subprocess.run([self.python, "-c", code, str(self.config_file), domain, password],
                              input="\n".join(names), capture_output=True, text=True,
                              cwd=REPO, timeout=300)
        if done.returncode != 0:
            raise PeerError(f"presenced accounts: {done.stderr.strip()[-2000:]}")
        return len(names)

    def register(self, user: str, domain: str, password: str) -> None:
        self._write_config()
        done = subprocess.run([self.python, "-m", "server", "adduser", f"{user}@{domain}",
                               "--password", password, "--config", str(self.config_file)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        if done.returncode != 0:
            raise PeerError(f"presenced adduser: {done.stderr.strip()}")

    def start(self, timeout: float = 30.0) -> None:
        self._check_free()
        self._write_config()
        self.process = self._spawn([self.python, "-m", "server", "serve", "--config",
                                    str(self.config_file), *self.serve_args], cwd=REPO,
                                   output=self.log_file)
        self._wait_listening(timeout)

