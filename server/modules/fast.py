"""FAST (XEP-0484): tokens for one-round-trip SASL2 logins with HT-SHA-256-* mechanisms.

A client that logs in (SASL2, XEP-0388) with a password and asks with <request-token/> gets a
token in <success/>; it then logs in with HT-SHA-256-EXPR/-ENDP (signing the tls-exporter or
tls-server-end-point channel binding) or -NONE: the proof is HMAC(token, "Initiator" ||
cb-data), the server answers HMAC(token, "Responder" || cb-data). The negotiation machine does
the protocol (server/stream/negotiation.py); this module answers its hooks fast/verify and
fast/issue (see server/stream/c2s.py) with storage.

Tokens are per client (the SASL2 <user-agent id>, kept as its SHA-256) and bound to the
mechanism they were issued for; two slots per client as XEP-0484 §5.1 suggests ('new' until
used, then 'current'); a token older than rotate_after is replaced at its next use (§3.5),
invalidate='true' ends the client's tokens (§3.6). A password change (presenced passwd,
AccountStore.set_credentials) deletes every token of the account.

The database never holds a token: a row holds a random nonce and the token's SHA-256; the
token is HMAC-SHA-256(key, nonce). The key is by default the "fast-token" secret in the
shared database (server/storage/keystore.py: every node of a cluster checks the tokens any node
issued; a <data_dir>/fast-token.key of an older version is imported once). With key_file set it
is that file's instead, outside the database, so that a stolen database (or backup of it) gives
no working token; servers sharing one database then need the same file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server import events
from server.config import path_option, seconds_option
from server.module import Module, ModuleContext, hook
from server.storage.fast import NEW, FastToken, FastTokenStore
from server.storage.keystore import shared_secret
from server.stream.sasl2 import ht_initiator, ht_responder

log = logging.getLogger("presenced.fast")
KEY_SIZE = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class FastSettings:
    # How long a token is valid after it was issued (seconds; default 21 days).
    token_lifetime: float = field(metadata=seconds_option(1814400))
    # A token used when older than this is replaced by a new one (seconds; default 1 day).
    rotate_after: float = field(metadata=seconds_option(86400))
    # A file holding the key tokens are derived from (made at first start when absent). Unset:
    # the key shared by every node in the database (imported from <data_dir>/fast-token.key).
    key_file: Path | None = field(metadata=path_option("data_dir"))


def client_key(user_agent: str) -> str:
    """What the store keeps of a <user-agent id>: its SHA-256 (hex)."""
    return hashlib.sha256(user_agent.encode()).hexdigest()


def expiry_text(when: int) -> str:
    """XEP-0082 DateTime."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_key(path: Path) -> bytes:
    """The key file's bytes, creating it (mode 0600) with a random key when absent."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < KEY_SIZE:
            raise ValueError(f"{path}: a FAST key needs {KEY_SIZE} bytes") from None
        return key
    key = secrets.token_bytes(KEY_SIZE)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


class Fast(Module):
    name = "fast"
    settings = FastSettings
    features = ()

    def __init__(self, server: ModuleContext, config: FastSettings) -> None:
        super().__init__(server, config)
        self._key = b""

    @property
    def _store(self) -> FastTokenStore:
        return self.server.storage.fast_tokens

    async def start(self) -> None:
        if self.config.key_file is not None:
            self.config.key_file.parent.mkdir(parents=True, exist_ok=True)
            self._key = load_key(self.config.key_file)
        else:
            self._key = await shared_secret(
                self.server.storage.secrets, "fast-token",
                legacy=self.server.config.data_dir / "fast-token.key", min_size=KEY_SIZE)
        purged = await self._store.purge_expired(int(time.time()))
        if purged:
            log.info("event=fast-tokens-expired count=%d", purged)

    def _token(self, nonce: bytes) -> str:
        digest = hmac.digest(self._key, nonce, "sha256")
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    # -- hooks of server/stream/c2s.py -------------------------------------------------------

    @hook(events.FAST_ISSUE)
    def issue(self, user: str, domain: str, client: str, mechanism: str) -> Any:
        return self._issue(user, domain, client, mechanism)

    async def _issue(self, user: str, domain: str, client: str,
                     mechanism: str) -> tuple[str, str]:
        """XEP-0484 §3.3: a new token in the client's 'new' slot (an unused one there goes,
        §3.5); the one in use stays valid until the new one is used."""
        nonce = secrets.token_bytes(16)
        token = self._token(nonce)
        now = int(time.time())
        expires = now + int(self.config.token_lifetime)
        await self._store.put(user, domain, client_key(client), FastToken(
            NEW, mechanism, nonce, hashlib.sha256(token.encode()).digest(), now, expires))
        log.info("event=fast-token-issued user=%s@%s mechanism=%s", user, domain, mechanism)
        return token, expiry_text(expires)

    @hook(events.FAST_VERIFY)
    def verify(self, user: str, domain: str, client: str | None, mechanism: str, proof: bytes,
               cb_data: bytes, invalidate: bool) -> Any:
        return self._verify(user, domain, client, mechanism, proof, cb_data, invalidate)

    async def _verify(self, user: str, domain: str, client: str | None, mechanism: str,
                      proof: bytes, cb_data: bytes,
                      invalidate: bool) -> tuple[bytes | None, bool]:
        """(HT responder data, due for rotation), or (None, False)."""
        if not client:
            return None, False
        key = client_key(client)
        now = int(time.time())
        for stored in await self._store.get(user, domain, key):  # 'new' first (§5.1)
            token = self._token(stored.nonce)
            # Both comparisons always run, in constant time (§5.1, §6).
            genuine = hmac.compare_digest(hashlib.sha256(token.encode()).digest(),
                                          stored.token_hash)
            matches = hmac.compare_digest(ht_initiator(token, cb_data), proof)
            if not (genuine and matches):
                continue
            if stored.mechanism != mechanism or stored.expires <= now:
                break  # §3.4: bound to its mechanism; expired tokens are no tokens
            if invalidate:  # §3.6
                await self._store.delete(user, domain, key)
                log.info("event=fast-token-invalidated user=%s@%s", user, domain)
                return ht_responder(token, cb_data), False
            if stored.slot == NEW:  # §3.5: using it invalidates the older one
                await self._store.promote(user, domain, key)
            rotate = now - stored.issued >= self.config.rotate_after
            return ht_responder(token, cb_data), rotate
        log.info("event=fast-token-refused user=%s@%s mechanism=%s", user, domain, mechanism)
        return None, False
