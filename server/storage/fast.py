"""FastTokenStore on either backend: XEP-0484 FAST tokens, two slots per (account, client).

A row never holds a token: it holds the token's SHA-256 and a random nonce; the token itself is
HMAC(server key, nonce), the key kept outside the database (server/modules/fast.py). The slots
follow XEP-0484 §5.1: a new token goes to 'new'; when it is used it replaces 'current'.

Tokens go with their account (ON DELETE CASCADE) and with its credentials:
AccountStore.set_credentials deletes them in the same transaction (server/storage/accounts.py).
Each call is one statement, or one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from server.storage import StoreSpec
from server.storage.store import Store

_TABLE = """CREATE TABLE fast_tokens (
        domain TEXT NOT NULL,
        localpart TEXT NOT NULL,
        client TEXT NOT NULL,
        slot TEXT NOT NULL,
        mechanism TEXT NOT NULL,
        nonce {blob} NOT NULL,
        token_hash {blob} NOT NULL,
        issued BIGINT NOT NULL,
        expires BIGINT NOT NULL,
        PRIMARY KEY (domain, localpart, client, slot),
        FOREIGN KEY (domain, localpart) REFERENCES accounts (domain, localpart)
            ON DELETE CASCADE
    )"""

MIGRATIONS = {
    "sqlite": [[_TABLE.format(blob="BLOB") + " WITHOUT ROWID"]],  # 1
    "postgresql": [[_TABLE.format(blob="BYTEA")]],                # 1
}
NEW, CURRENT = "new", "current"


@dataclass(frozen=True, slots=True)
class FastToken:
    slot: str          # 'new' (issued, not used yet) or 'current'
    mechanism: str     # the HT-SHA-256-* it was issued for (XEP-0484 §3.4: bound to it)
    nonce: bytes
    token_hash: bytes  # SHA-256 of the token
    issued: int        # Unix time
    expires: int


class FastTokenStore(Protocol):
    async def put(self, user: str, domain: str, client: str, token: FastToken) -> None:
        """Store into token.slot, replacing what was there. NoSuchAccount."""

    async def get(self, user: str, domain: str, client: str) -> list[FastToken]:
        """The client's tokens, 'new' first."""

    async def promote(self, user: str, domain: str, client: str) -> None:
        """The 'new' token was used: it becomes 'current' (the old current one goes)."""

    async def delete(self, user: str, domain: str, client: str | None = None) -> int:
        """Remove the tokens of one client, or (None) all of the account's; how many went."""

    async def purge_expired(self, now: int) -> int: ...


class SQLFastTokenStore(Store):
    """FastTokenStore (the SQL is the same on both backends)."""

    async def put(self, user: str, domain: str, client: str, token: FastToken) -> None:
        await self._write(
            user, domain,
            "INSERT INTO fast_tokens (domain, localpart, client, slot, mechanism, nonce, "
            "token_hash, issued, expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (domain, localpart, client, slot) DO UPDATE SET "
            "mechanism = excluded.mechanism, nonce = excluded.nonce, "
            "token_hash = excluded.token_hash, issued = excluded.issued, "
            "expires = excluded.expires",
            domain, user, client, token.slot, token.mechanism, token.nonce, token.token_hash,
            token.issued, token.expires)

    async def get(self, user: str, domain: str, client: str) -> list[FastToken]:
        rows = await self._db.fetch(
            "SELECT slot, mechanism, nonce, token_hash, issued, expires FROM fast_tokens "
            "WHERE domain = ? AND localpart = ? AND client = ?", domain, user, client)
        found = [FastToken(r[0], r[1], bytes(r[2]), bytes(r[3]), int(r[4]), int(r[5]))
                 for r in rows]
        return sorted(found, key=lambda t: t.slot != NEW)

    async def promote(self, user: str, domain: str, client: str) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "DELETE FROM fast_tokens WHERE domain = ? AND localpart = ? AND client = ? "
                "AND slot = ?", domain, user, client, CURRENT)
            await tx.execute(
                "UPDATE fast_tokens SET slot = ? WHERE domain = ? AND localpart = ? "
                "AND client = ? AND slot = ?", CURRENT, domain, user, client, NEW)

    async def delete(self, user: str, domain: str, client: str | None = None) -> int:
        if client is None:
            return await self._db.execute(
                "DELETE FROM fast_tokens WHERE domain = ? AND localpart = ?", domain, user)
        return await self._db.execute(
            "DELETE FROM fast_tokens WHERE domain = ? AND localpart = ? AND client = ?",
            domain, user, client)

    async def purge_expired(self, now: int) -> int:
        return await self._db.execute("DELETE FROM fast_tokens WHERE expires <= ?", now)


SPEC: StoreSpec = StoreSpec(name="fast_tokens", sqlite=SQLFastTokenStore,
                            postgresql=SQLFastTokenStore, migrations=MIGRATIONS,
                            tables=("fast_tokens",))
