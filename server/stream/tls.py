"""TLS over memory BIOs (pyOpenSSL), so a connection is one plain asyncio Protocol.

Why not asyncio's start_tls: the stdlib cannot export keying material, which the
`tls-exporter` channel binding needs (RFC 9266, the only binding defined for TLS 1.3), and its
SSL protocol allocates a 256 KiB read buffer per connection. With memory BIOs we encrypt a whole
batch of outgoing stanzas at once and let OpenSSL release idle buffers (SSL_MODE_RELEASE_BUFFERS).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

_READ_SIZE = 65536
# A memory BIO keeps the largest buffer it ever held (BUF_MEM only grows); after more than this
# went through one, an emptied pair is replaced by fresh ones, which hold nothing until used.
_BIO_KEEP = 1024
_DER = Encoding.DER
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"  # RFC 9266 §2


class TLSError(Exception):
    pass


def _accept_any(_conn: SSL.Connection, _cert: Any, _errno: int, _depth: int, _ok: int) -> bool:
    # The handshake never fails on the peer's certificate: federation checks it afterwards
    # (RFC 6125 identity, XEP-0178) and may fall back to dialback (XEP-0220) as configured.
    return True


def server_context(certificate: Path, key: Path, *, alpn: Sequence[bytes] = (),
                   ca_file: Path | None = None,
                   request_certificate: bool = False) -> SSL.Context:
    """A server context: TLS 1.2+, the configured chain and key, ALPN (XEP-0368) when given.
    request_certificate: ask the peer for its certificate (s2s, for SASL EXTERNAL)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    _common(ctx, certificate, key)
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    if ca_file is not None:
        ctx.load_verify_locations(str(ca_file))
    if request_certificate:
        ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
        ctx.set_session_id(b"presenced-s2s")
    if alpn:
        offered = list(alpn)

        def select(_conn: SSL.Connection, protos: list[bytes]) -> Any:
            for proto in protos:
                if proto in offered:
                    return proto
            return SSL.NO_OVERLAPPING_PROTOCOLS

        ctx.set_alpn_select_callback(select)
    return ctx


def sni_server_context(default: tuple[Path, Path], per_domain: Mapping[str, tuple[Path, Path]],
                       **options: Any) -> SSL.Context:
    """A server context whose connections switch to a domain's own certificate when the peer
    names that domain in SNI (RFC 6066 §3); each context gets the same options."""
    ctx = server_context(*default, **options)
    by_name = {domain: server_context(cert, key, **options)
               for domain, (cert, key) in per_domain.items()}
    if by_name:
        def switch(conn: SSL.Connection) -> None:
            name = conn.get_servername()
            if name:
                chosen = by_name.get(name.decode("ascii", "replace").lower())
                if chosen is not None:
                    conn.set_context(chosen)

        ctx.set_tlsext_servername_callback(switch)
    return ctx


def client_context(certificate: Path, key: Path, *, alpn: Sequence[bytes] = ()) -> SSL.Context:
    """An s2s client context: our chain is offered as the client certificate (XEP-0178)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _common(ctx, certificate, key)
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    return ctx


def _common(ctx: SSL.Context, certificate: Path, key: Path) -> None:
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.use_certificate_chain_file(str(certificate))
    ctx.use_privatekey_file(str(key))
    ctx.check_privatekey()


def end_point_hash(certificate_pem: bytes) -> bytes:
    """RFC 5929 §4.1: hash of our certificate; MD5/SHA-1 signatures are upgraded to SHA-256."""
    return _end_point_of(x509.load_pem_x509_certificate(certificate_pem).public_bytes(_DER))


@lru_cache(maxsize=64)
def _end_point_of(der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        return hashlib.sha256(cert.public_bytes(_DER)).digest()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(_DER))
    return digest.finalize()


class TLSLayer:
    """One TLS session: ciphertext in, plaintext out, and back. Server side unless a
    server_name is given (an s2s client; SNI carries the remote domain)."""

    __slots__ = ("_bindings", "_conn", "_end_point", "handshake_done")

    def __init__(self, context: SSL.Context, end_point: bytes | None = None, *,
                 server_name: str | None = None) -> None:
        self._conn = SSL.Connection(context, None)
        if server_name is None:
            self._conn.set_accept_state()
        else:
            self._conn.set_tlsext_host_name(server_name.encode("idna"))
            self._conn.set_connect_state()
        self._end_point = end_point
        self.handshake_done = False
        # (tls-exporter, tls-server-end-point), read once the handshake is done: both are fixed
        # for the life of this TLS session, and stream features ask for them on every build.
        self._bindings: tuple[bytes | None, bytes | None] | None = None

    def start(self) -> bytes:
        """Client side: the ClientHello to send first."""
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            raise TLSError(_describe(exc)) from exc
        return self._pending_out()

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
                    out = self._pending_out()
                    if len(data) > _BIO_KEEP or len(out) > _BIO_KEEP:
                        self._fresh_bios()
                    return b"", out
            into = conn._into_ssl
            # Read only while records wait (in the BIO, or decrypted in OpenSSL): a read that
            # finds nothing costs a WantReadError, and it makes OpenSSL set up its read buffer
            # again, which SSL_MODE_RELEASE_BUFFERS had freed with the last record.
            while _lib.BIO_get_mem_data(into, _ffi.NULL) or conn.pending():
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
        out = self._pending_out()
        if len(data) > _BIO_KEEP or len(out) > _BIO_KEEP:
            self._fresh_bios()
        return b"".join(chunks), out

    def send(self, plaintext: bytes) -> bytes:
        """Encrypt; returns the records to write."""
        try:
            self._conn.sendall(plaintext)
        except SSL.WantReadError:
            pass  # the handshake never finished (the peer left): nothing can be sent
        except SSL.Error as exc:
            raise TLSError(_describe(exc)) from exc
        out = self._pending_out()
        if len(out) > _BIO_KEEP:
            self._fresh_bios()
        return out

    def close(self) -> bytes:
        """A close_notify alert to send, if the session got that far."""
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()
        return self._pending_out()

    def _fresh_bios(self) -> None:
        """Idle TLS holds no buffers: OpenSSL frees its record buffers between records
        (SSL_MODE_RELEASE_BUFFERS), and the memory BIOs, once emptied, are replaced by fresh
        ones (SSL_set_bio frees the old pair). Only when both are empty: a partial record
        waits in OpenSSL's own buffer, never in the BIO."""
        conn = self._conn
        into, out = conn._into_ssl, conn._from_ssl
        if _lib.BIO_get_mem_data(into, _ffi.NULL) or _lib.BIO_get_mem_data(out, _ffi.NULL):
            return
        fresh_in = _lib.BIO_new(_lib.BIO_s_mem())
        fresh_out = _lib.BIO_new(_lib.BIO_s_mem())
        _lib.SSL_set_bio(conn._ssl, fresh_in, fresh_out)
        conn._into_ssl, conn._from_ssl = fresh_in, fresh_out

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
        """Channel-binding data for SCRAM-*-PLUS, or None where the binding is undefined.
        Read from OpenSSL once per TLS session, when first asked after the handshake (a
        STARTTLS makes a new session, with its own values)."""
        if not self.handshake_done:
            return None
        found = self._bindings
        if found is None:
            found = self._bindings = (self._exporter(), self._served_end_point())
        if kind == "tls-exporter":
            return found[0]
        if kind == "tls-server-end-point":
            return found[1]
        return None

    def _exporter(self) -> bytes | None:
        # RFC 9266 §3: only defined for TLS 1.3 (or 1.2 with extended master secret).
        if self.version != "TLSv1.3":
            return None
        return self._conn.export_keying_material(EXPORTER_LABEL, 32)

    def _served_end_point(self) -> bytes | None:
        # RFC 5929 §4: the certificate this connection actually served (SNI may have chosen it).
        served = self._conn.get_certificate()
        if served is None:
            return self._end_point
        return _end_point_of(served.to_cryptography().public_bytes(_DER))

    def bindings(self) -> list[str]:
        return [k for k in ("tls-exporter", "tls-server-end-point")
                if self.channel_binding(k) is not None]

    def peer_certificate_chain(self) -> list[bytes]:
        """The peer's chain as DER, leaf first. On the server side OpenSSL's chain lacks the
        peer's own certificate (SSL_get_peer_cert_chain(3)), so it is put in front."""
        chain = [c.to_cryptography().public_bytes(_DER)
                 for c in self._conn.get_peer_cert_chain() or []]
        leaf = self._conn.get_peer_certificate()
        if leaf is not None:
            der = leaf.to_cryptography().public_bytes(_DER)
            if not chain or chain[0] != der:
                chain.insert(0, der)
        return chain


def _describe(exc: SSL.Error) -> str:
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args:
        return "; ".join(str(part[-1]) for part in args if part)
    return str(exc) or type(exc).__name__


BindingLookup = Callable[[str], bytes | None]
