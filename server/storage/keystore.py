"""SecretStore on either backend: the keys every node of one domain must share (issue 22 item 5).

One row per named secret, made once and never changed:

    fast-token        HMAC key of XEP-0484 FAST tokens (server/modules/fast.py)
    upload            HMAC key of XEP-0363 upload URLs (server/modules/upload.py)
    muc-occupant-id   HMAC key of XEP-0421 occupant ids (server/modules/muc/service.py)
    dialback          XEP-0185 dialback secret, when [s2s] dialback_secret is unset (app.py)
    webadmin-cookie   HMAC key of the web admin's session cookie (server/modules/webadmin.py)

A token issued, a URL signed or an occupant id given by one node is then good on every other,
and survives restarts. ``shared_secret`` makes a secret atomically: INSERT … ON CONFLICT DO
NOTHING, then read what is stored, so that two nodes starting at once against an empty table
agree on the first writer's value. Before this store the FAST, occupant-id and cookie keys were
files in data_dir: the first start that finds no row imports the file (tokens, occupant ids and
cookies stay valid across the upgrade); after that the file is no longer read. Not owned by an
account: no foreign key.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Protocol

from server.storage import StoreSpec
from server.storage.store import Store

log = logging.getLogger(__name__)

_TABLE = """CREATE TABLE secrets (
        name TEXT NOT NULL PRIMARY KEY,
        value {blob} NOT NULL,
        created BIGINT NOT NULL
    )"""

MIGRATIONS = {
    "sqlite": [[_TABLE.format(blob="BLOB") + " WITHOUT ROWID"]],  # 1
    "postgresql": [[_TABLE.format(blob="BYTEA")]],                # 1
}

SECRET_SIZE = 32  # bytes of a new secret (HMAC-SHA-256 keys)


class SecretStore(Protocol):
    async def get(self, name: str) -> bytes | None:
        """The stored secret, or None."""

    async def create(self, name: str, value: bytes) -> bytes:
        """Store value under name unless a secret is stored there already; the stored value
        (the first writer's, when two nodes create the same secret at once)."""


class SQLSecretStore(Store):
    """SecretStore (the SQL is the same on both backends)."""

    async def get(self, name: str) -> bytes | None:
        row = await self._first("SELECT value FROM secrets WHERE name = ?", name)
        return None if row is None else bytes(row[0])

    async def create(self, name: str, value: bytes) -> bytes:
        await self._db.execute(
            "INSERT INTO secrets (name, value, created) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING", name, value, int(time.time()))
        stored = await self.get(name)
        if stored is None:  # deleted between the two statements: nothing does that
            raise RuntimeError(f"secret {name!r} vanished while it was made")
        return stored


SPEC: StoreSpec = StoreSpec(name="secrets", sqlite=SQLSecretStore, postgresql=SQLSecretStore,
                            migrations=MIGRATIONS, tables=("secrets",), requires=())


async def shared_secret(store: SecretStore, name: str, legacy: Path | None = None,
                        min_size: int = 1) -> bytes:
    """The secret called name, made on first use: from the legacy file when it exists (an
    upgrade keeps the old key), otherwise SECRET_SIZE random bytes. Raises ValueError when the
    legacy file holds fewer than min_size bytes (as reading the file did)."""
    found = await store.get(name)
    if found is not None:
        return found
    value: bytes | None = None
    if legacy is not None:
        try:
            value = legacy.read_bytes()
        except FileNotFoundError:
            value = None
        if value is not None and len(value) < min_size:
            raise ValueError(f"{legacy}: the {name} key needs {min_size} bytes")
    stored = await store.create(name, value if value is not None else os.urandom(SECRET_SIZE))
    if value is not None and stored == value:
        log.info("event=secret-imported name=%s file=%s", name, legacy)
    elif value is None and stored is not None:
        log.info("event=secret-ready name=%s", name)
    return stored
