"""The HTTPS listener's TLS: an ssl.SSLContext (what aiohttp takes) from the same [tls] files
and with the same SNI choice as c2s (server/stream/tls.py builds the pyOpenSSL ones)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import TLSConfig


def _context(certificate: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(str(certificate), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def https_context(tls: TLSConfig) -> ssl.SSLContext:
    """The default certificate, switched to a domain's own when the client names that domain
    in SNI (RFC 6066 §3); `reload_https_context` swaps both for new connections."""
    ctx = _context(tls.certificate, tls.key)
    # [default (None: ctx itself), by_name]: replaced whole by a reload.
    state: list[Any] = [None, {domain: _context(cert, key)
                               for domain, (cert, key) in tls.domain_certificates.items()}]

    def switch(conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        default, by_name = state
        chosen = by_name.get(name.lower().rstrip(".")) if name else None
        if chosen is None:
            chosen = default
        if chosen is not None:
            conn.context = chosen

    ctx.sni_callback = switch
    ctx.presenced_state = state  # type: ignore[attr-defined]
    return ctx


def reload_https_context(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    """New handshakes on a listener made with `https_context` get these certificates (the
    listener keeps its context; its SNI callback picks the new ones). Raises, changing
    nothing, when a file cannot be used."""
    default = _context(tls.certificate, tls.key)
    by_name = {domain: _context(cert, key)
               for domain, (cert, key) in tls.domain_certificates.items()}
    ctx.presenced_state[:] = [default, by_name]  # type: ignore[attr-defined]
