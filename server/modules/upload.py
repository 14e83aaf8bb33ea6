"""HTTP File Upload (XEP-0363) at upload.<domain>: slots over XMPP, files over the HTTP server
(server/modules/http.py) under /upload/.

    [upload]
    subdomain = "upload"
    max_file_size = 104857600   # bytes; a larger request gets <file-too-large/> with the limit
    quota = 1073741824          # bytes per account, of the files it has (and slots pending)
    expire_after = 604800       # seconds a file is kept
    slot_lifetime = 300         # seconds a PUT URL may be used
    path = "/srv/uploads"       # the files' directory (relative: under data_dir);
                                # default <data_dir>/upload

A slot is a row of the uploads store (both backends) and a PUT URL
``/upload/<id>/<filename>?expires=<t>&token=<hmac>`` (the token also as an ``Authorization:
Bearer`` slot header, which clients may send instead): the token is an HMAC of the slot (id,
name, size, type, expiry) under a key made at each start, so a URL cannot be altered, works
until ``expires`` only, and for one file only (a PUT claims the row while it runs; one
that fails, too large, cut off or not stored, gives the slot back; XEP-0363 §5: a named
content type must be the PUT's, else 415). The body is streamed to a file, its
size checked against the slot's while it arrives (never held in memory); a larger body is
refused with 413 and the connection closed. GET (with HEAD and Range, by aiohttp's
FileResponse) serves the slot's content type, ``X-Content-Type-Options: nosniff``, a CSP that
allows nothing, and ``Content-Disposition: attachment`` unless the type is a raster image.

Files expire after expire_after; an account's rows go with it (ON DELETE CASCADE), and the
sweep deletes files without a row. Unset ``enabled`` means on when an HTTP listener exists
(the service domain is then not named in generated certificates and federation: set
``enabled = true`` for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from server.config import (
    boolean,
    int_option,
    option,
    path_option,
    seconds_option,
    service_fields,
)
from server.errors import StanzaError
from server.jid import JID
from server.module import Stanza
from server.modules.http import HTTP
from server.services import ServiceHost, ServiceModule
from server.sessions import Session
from server.storage import upload as upload_store
from server.storage.base import NoSuchAccount
from server.storage.db import StorageUnavailable, log_failure
from server.storage.keystore import shared_secret
from server.storage.upload import Upload
from server.xml import stanza as st
from server.xml.numbers import NumberError, parse_int

log = logging.getLogger("presenced.upload")

NS = "urn:xmpp:http:upload:0"
DATA_FORMS = "jabber:x:data"
PREFIX = "/upload/"
_REQUEST = f"{{{NS}}}request"
_CHUNK = 1 << 16
_SWEEP_EVERY = 600.0
# type/subtype of RFC 6838 §4.2 (no parameters); anything else counts as no type named.
_MIME = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
# Shown inline: raster images. Everything else (SVG too: it may hold script) is an attachment.
_INLINE = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/avif",
                     "image/bmp", "image/heic", "image/heif"})
_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
_OCTETS = "application/octet-stream"
_MAX_SIZE = 2**63 - 1      # a slot's size fits the BIGINT column; max_file_size says the rest
_MAX_EXPIRES = 2**63 - 1   # a PUT URL's expiry (unix seconds) as we wrote it


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadSettings:
    # Unset: on when [listen] http or https is set.
    enabled: bool | None = field(metadata=option("true or false", boolean, None))
    subdomain: str = field(metadata=service_fields.subdomain("upload"))
    max_file_size: int = field(metadata=int_option(1, 1 << 40, 104857600))
    quota: int = field(metadata=int_option(1, 1 << 50, 1073741824))
    expire_after: float = field(metadata=seconds_option(604800))
    slot_lifetime: float = field(metadata=seconds_option(300))
    # Unset: <data_dir>/upload.
    path: Path | None = field(metadata=path_option("data_dir"))


class HTTPUpload(ServiceModule):
    name = "upload"
    settings = UploadSettings
    uses = (HTTP,)  # its PUT/GET URLs are served by the HTTP listener, when there is one
    stores = (upload_store.SPEC,)
    identity = ("store", "file")
    display_name = "HTTP file upload"
    service_features = (NS,)

    def __init__(self, server: Any, config: UploadSettings) -> None:
        super().__init__(server, config)
        self._store: upload_store.UploadStoreSQL = self.store_of(upload_store.SPEC)
        self._key = secrets.token_bytes(32)
        self._sweeper: asyncio.Task[None] | None = None
        self._http: HTTP | None = None
        self._dir = Path()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        http = self.server.module(HTTP)
        enabled = self.config.enabled
        if enabled is None:
            enabled = http is not None and http.enabled
        if not enabled:
            return
        if http is None or not http.enabled:
            log.warning("event=upload-off reason=no-http-listener")
            return
        self._http = http
        # The URLs one node signs are good on every node (issue 22: the files on a path all
        # nodes share) and after a restart: the key is in the database (storage/keystore.py).
        self._key = await shared_secret(self.server.storage.secrets, "upload")
        self._dir = self.config.path or self.server.config.data_dir / "upload"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        http.route(PREFIX, self._request, prefix=True, cors=True)
        for domain in self.server.config.domains:
            host = ServiceHost(f"{self.config.subdomain}.{domain}", domain, self.display_name)
            self.server.add_service(host, self.route)
        self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    # -- XMPP: disco and slots -----------------------------------------------------------------

    def info(self, stanza: Stanza) -> Stanza:
        reply = super().info(stanza)
        # XEP-0363 §3: the size limit as a XEP-0128 form.
        form = st.child(reply[0], f"{{{DATA_FORMS}}}x", {"type": "result"})
        for var, value in (("FORM_TYPE", NS), ("max-file-size", str(self.config.max_file_size))):
            item = st.child(form, f"{{{DATA_FORMS}}}field", {"var": var})
            if var == "FORM_TYPE":
                item.set("type", "hidden")
            else:  # XEP-0004 §3.2: what a client shows
                item.set("label", "Largest file (bytes)")
            st.child(item, f"{{{DATA_FORMS}}}value", text=value)
        return reply

    def handle(self, stanza: Stanza, origin: Session | None, to: JID) -> Any:
        if stanza.tag != st.IQ or to.local is not None or to.resource is not None:
            return None if stanza.tag == st.IQ else True
        payload = st.payload(stanza)
        if stanza.get("type") != "get" or payload is None or payload.tag != _REQUEST:
            return None
        return self._slot(stanza, payload, origin)

    async def _slot(self, stanza: Stanza, request: Stanza, origin: Session | None) -> Stanza:
        if origin is None or origin.jid.domain not in self.server.hosts:
            raise StanzaError("forbidden", "uploads are for accounts of this server")
        filename = (request.get("filename") or "").strip()
        if not filename or "/" in filename or "\\" in filename or len(filename) > 255 \
                or any(ord(c) < 32 for c in filename) or filename in (".", ".."):
            raise StanzaError("bad-request", "a file name without '/' is needed")
        try:  # XEP-0363 §4: the size in bytes; '²' or 5,000 digits is bad-request
            size = parse_int(request.get("size"), minimum=1, maximum=_MAX_SIZE, name="size")
        except NumberError as err:
            raise StanzaError("bad-request", f"'size' must be a positive integer ({err.reason})"
                              ) from None
        limit = self.config.max_file_size
        if size > limit:
            return _too_large(stanza, limit)
        # The type the PUT must then carry (XEP-0363 §5); none named (or not a MIME type):
        # any, and the file is served as application/octet-stream.
        content_type = (request.get("content-type") or "").strip().lower()
        if not _MIME.fullmatch(content_type):
            content_type = ""
        user, domain = origin.jid.local, origin.jid.domain
        assert user is not None
        now = int(time.time())
        upload = Upload(secrets.token_urlsafe(18), user, domain, filename, size, content_type,
                        now, None, None)
        try:
            made = await self._store.create(upload, self.config.quota)
        except NoSuchAccount:
            raise StanzaError("forbidden", "no such account") from None
        if not made:
            raise StanzaError("resource-constraint", "your upload quota is used up")
        expires = math.ceil(time.time() + self.config.slot_lifetime)
        assert self._http is not None
        get_url = f"{self._base_url(domain)}{PREFIX}{upload.id}/{quote(filename, safe='')}"
        token = self._token(upload, expires)
        put_url = f"{get_url}?expires={expires}&token={token}"
        slot = st.element(f"{{{NS}}}slot")
        put = st.child(slot, f"{{{NS}}}put", {"url": put_url})
        # The same token as a header too (XEP-0363 §5, as Prosody gives it); either will do.
        st.child(put, f"{{{NS}}}header", {"name": "Authorization"}, text=f"Bearer {token}")
        st.child(slot, f"{{{NS}}}get", {"url": get_url})
        log.info("event=upload-slot user=%s@%s id=%s size=%d", user, domain, upload.id, size)
        return st.result(stanza, slot)

    def _base_url(self, domain: str) -> str:
        """external_url when set; else on an HTTPS listener the account's domain with the
        listener's port: a name the certificate covers (the generated one names every domain;
        SNI picks a domain's own), where the listener's address (127.0.0.1 by default) is none
        and clients refuse the URL (Dino, Gajim: issue 19). Plain HTTP: the listener's."""
        http = self._http
        assert http is not None
        if http.config.external_url is None:
            for kind, _host, port in http.bound_addresses():
                if kind == "https":
                    return f"https://{domain}" + ("" if port == 443 else f":{port}")
        return http.base_url()

    def _token(self, upload: Upload, expires: int) -> str:
        message = "\0".join((upload.id, upload.filename, str(upload.size), upload.content_type,
                             str(expires))).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    # -- HTTP --------------------------------------------------------------------------------

    async def _request(self, request: web.Request) -> web.StreamResponse:
        upload_id, sep, name = request.path[len(PREFIX):].partition("/")
        if not sep or not upload_id or "/" in name:
            return _text(404, "not found")
        try:
            upload = await self._store.get(upload_id)
            if upload is None or upload.filename != name:
                return _text(404, "not found")
            if request.method == "PUT":
                return await self._put(request, upload)
        except StorageUnavailable:  # logged once by the storage's Outage; the client may retry
            return _text(503, "storage is unavailable; try again later", {"Retry-After": "30"},
                         close=request.method == "PUT")
        if request.method in ("GET", "HEAD"):
            return self._get(upload)
        return _text(405, "method not allowed", {"Allow": "GET, HEAD, PUT, OPTIONS"})

    def _file(self, upload_id: str) -> Path:
        return self._dir / upload_id

    def _get(self, upload: Upload) -> web.StreamResponse:
        now = time.time()
        if upload.stored is None or now - upload.stored > self.config.expire_after:
            return _text(404, "not found")
        path = self._file(upload.id)
        if not path.is_file():
            return _text(404, "not found")
        kind = "inline" if upload.content_type in _INLINE else "attachment"
        headers = {
            "Content-Type": upload.content_type or _OCTETS,
            "Content-Disposition": f"{kind}; filename*=UTF-8''{quote(upload.filename, safe='')}",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": _CSP,
            "Cache-Control": "public, max-age=31536000, immutable",
        }
        return web.FileResponse(path, headers=headers)

    async def _put(self, request: web.Request, upload: Upload) -> web.StreamResponse:
        expires = request.query.get("expires", "")
        token = request.query.get("token", "")
        if not token:
            scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
            token = credentials.strip() if scheme.lower() == "bearer" else ""
        try:
            until = parse_int(expires, maximum=_MAX_EXPIRES, name="expires")
        except NumberError:
            until = -1  # not a time we gave out: the token cannot match
        if until < 0 or not hmac.compare_digest(token, self._token(upload, until)):
            return _text(403, "this URL is not valid", close=True)
        if until < time.time():
            return _text(403, "this URL has expired", close=True)
        if upload.content_type:
            # XEP-0363 §5: the PUT's Content-Type matches the one the slot was asked with.
            given = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if given != upload.content_type:
                log.info("event=upload-refused id=%s reason=content-type", upload.id)
                return _text(415, f"this slot is for {upload.content_type}", close=True)
        length = request.content_length
        if length is not None and length != upload.size:
            status = 413 if length > upload.size else 400
            return _text(status, f"the slot is for {upload.size} bytes", close=True)
        storage = self._store
        if not await storage.claim(upload.id, int(time.time())):
            return _text(409, "this slot was used already", close=True)
        final = self._file(upload.id)
        partial = final.with_name(final.name + ".part")
        loop = asyncio.get_running_loop()
        received = 0
        ok = False
        try:
            try:
                fd = await loop.run_in_executor(
                    None, lambda: os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
                try:
                    while True:
                        chunk = await request.content.read(_CHUNK)
                        if not chunk:
                            break
                        received += len(chunk)
                        if received > upload.size:
                            log.info("event=upload-refused id=%s reason=too-large", upload.id)
                            return _text(413, f"the slot is for {upload.size} bytes",
                                         close=True)
                        await loop.run_in_executor(None, _write_all, fd, chunk)
                finally:
                    await loop.run_in_executor(None, os.close, fd)
                if received != upload.size:
                    return _text(400, f"the slot is for {upload.size} bytes, {received} came",
                                 close=True)
                await loop.run_in_executor(None, os.replace, partial, final)
            except OSError as exc:  # a full or read-only file system: the client may retry
                log.warning("event=upload-write-failed id=%s errno=%s error=%s", upload.id,
                            exc.errno, exc.strerror)
                return _text(507, "the file cannot be stored now", close=True)
            await storage.stored(upload.id, math.ceil(time.time()))  # kept at least expire_after
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(OSError):
                    partial.unlink()
                # The slot stays usable until a PUT succeeds or it expires (the sweep then
                # frees its quota). With the database down it stays claimed until it expires.
                with contextlib.suppress(StorageUnavailable):
                    await storage.release(upload.id)
        log.info("event=uploaded user=%s@%s id=%s size=%d", upload.user, upload.domain,
                 upload.id, received)
        return _text(201, "created")

    # -- expiry ------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log_failure(log, "event=upload-sweep-failed")
            await asyncio.sleep(min(_SWEEP_EVERY, self.config.expire_after / 4))

    async def sweep(self) -> int:
        """Delete expired files and slots never used, and files whose row went with its
        account. Returns how many files went."""
        storage = self._store
        now = time.time()
        gone = await storage.expired(
            math.ceil(now - self.config.expire_after),  # stored < now - expire_after, as _get
            int(now - self.config.slot_lifetime - 3600))  # a PUT may still be under way
        for upload_id in gone:
            await storage.delete(upload_id)
        loop = asyncio.get_running_loop()
        names = await loop.run_in_executor(None, os.listdir, self._dir)
        ids = sorted({n.removesuffix(".part") for n in names})
        kept = await storage.existing(ids) if ids else set()
        removed = 0
        for name in names:  # a partial file without a row is left over from a crash
            if name.removesuffix(".part") not in kept:
                with contextlib.suppress(OSError):
                    await loop.run_in_executor(None, os.unlink, self._dir / name)
                    removed += 0 if name.endswith(".part") else 1
        if removed:
            log.info("event=upload-sweep removed=%d", removed)
        return removed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _text(status: int, text: str, headers: dict[str, str] | None = None, *,
          close: bool = False) -> web.Response:
    response = web.Response(status=status, text=text + "\n", headers=headers)
    if close:
        response.force_close()  # the rest of a refused body is not read
    return response


def _too_large(stanza: Stanza, limit: int) -> Stanza:
    """XEP-0363 §4.1: not-acceptable with <file-too-large/> and the limit."""
    reply = st.error_reply(stanza, StanzaError("not-acceptable", "File too large"))
    error = reply.find(st.ERROR)
    assert error is not None
    too_large = st.child(error, f"{{{NS}}}file-too-large")
    st.child(too_large, f"{{{NS}}}max-file-size", text=str(limit))
    return reply
