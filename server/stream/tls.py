"""TLS over memory BIOs (pyOpenSSL), so a connection is one plain asyncio Protocol.

Why not asyncio's start_tls: the stdlib cannot export keying material, which the
`tls-exporter` channel binding needs (RFC 9266, the only binding defined for TLS 1.3), and its
SSL protocol allocates a 256 KiB read buffer per connection. With memory BIOs we encrypt a whole
batch of outgoing stanzas at once and let OpenSSL release idle buffers (SSL_MODE_RELEASE_BUFFERS).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

_READ_SIZE = 65536
_DER = Encoding.DER
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"  # RFC 9266 §2


class TLSError(Exception):
    pass


def server_context(certificate: Path, key: Path, *, alpn: Sequence[bytes] = (),
                   ca_file: Path | None = None) -> SSL.Context:
    """A server context: TLS 1.2+, the configured chain and key, ALPN (XEP-0368) when given."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                    | SSL.OP_NO_RENEGOTIATION)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.use_certificate_chain_file(str(certificate))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()
    if ca_file is not None:
        ctx.load_verify_locations(str(ca_file))
    if alpn:
        offered = list(alpn)

        def select(_conn: SSL.Connection, protos: list[bytes]) -> Any:
            for proto in protos:
                if proto in offered:
                    return proto
            return SSL.NO_OVERLAPPING_PROTOCOLS

        ctx.set_alpn_select_callback(select)
    return ctx


def end_point_hash(certificate_pem: bytes) -> bytes:
    """RFC 5929 §4.1: hash of our certificate; MD5/SHA-1 signatures are upgraded to SHA-256."""
    cert = x509.load_pem_x509_certificate(certificate_pem)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        return hashlib.sha256(cert.public_bytes(_DER)).digest()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(_DER))
    return digest.finalize()


class TLSLayer:
    """One server-side TLS session: ciphertext in, plaintext out, and back."""

    __slots__ = ("_conn", "_end_point", "handshake_done")

    def __init__(self, context: SSL.Context, end_point: bytes | None = None) -> None:
        self._conn = SSL.Connection(context, None)
        self._conn.set_accept_state()
        self._end_point = end_point
        self.handshake_done = False

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Feed ciphertext; return (plaintext, ciphertext to send back). Raises TLSError."""
        conn = self._conn
        conn.bio_write(data)
        chunks: list[bytes] = []
        try:
            if not self.handshake_done:
                try:
                    conn.do_handshake()
                    self.handshake_done = True
                except SSL.WantReadError:
                    return b"", self._pending_out()
            while True:
                try:
                    chunk = conn.recv(_READ_SIZE)
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:  # close_notify from the peer
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        except SSL.Error as exc:
            raise TLSError(_describe(exc)) from exc
        return b"".join(chunks), self._pending_out()

    def send(self, plaintext: bytes) -> bytes:
        """Encrypt; returns the records to write."""
        try:
            self._conn.sendall(plaintext)
        except SSL.WantReadError:
            pass  # the handshake never finished (the peer left): nothing can be sent
        except SSL.Error as exc:
            raise TLSError(_describe(exc)) from exc
        return self._pending_out()

    def close(self) -> bytes:
        """A close_notify alert to send, if the session got that far."""
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()
        return self._pending_out()

    def _pending_out(self) -> bytes:
        conn = self._conn
        out: list[bytes] = []
        while True:
            try:
                chunk = conn.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out.append(chunk)
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def version(self) -> str:
        return self._conn.get_protocol_version_name()

    @property
    def alpn(self) -> bytes | None:
        return self._conn.get_alpn_proto_negotiated() or None

    @property
    def server_name(self) -> str | None:
        name = self._conn.get_servername()
        return name.decode("ascii", "replace") if name else None

    def channel_binding(self, kind: str) -> bytes | None:
        """Channel-binding data for SCRAM-*-PLUS, or None where the binding is undefined."""
        if not self.handshake_done:
            return None
        if kind == "tls-exporter":
            # RFC 9266 §3: only defined for TLS 1.3 (or 1.2 with extended master secret).
            if self.version != "TLSv1.3":
                return None
            return self._conn.export_keying_material(EXPORTER_LABEL, 32)
        if kind == "tls-server-end-point":
            return self._end_point
        return None

    def bindings(self) -> list[str]:
        return [k for k in ("tls-exporter", "tls-server-end-point")
                if self.channel_binding(k) is not None]

    def peer_certificate_chain(self) -> list[bytes]:
        chain = self._conn.get_peer_cert_chain() or []
        return [c.to_cryptography().public_bytes(_DER) for c in chain]


def _describe(exc: SSL.Error) -> str:
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args:
        return "; ".join(str(part[-1]) for part in args if part)
    return str(exc) or type(exc).__name__


BindingLookup = Callable[[str], bytes | None]
