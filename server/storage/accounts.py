"""AccountStore on either backend: one row per account with the SCRAM keys of RFC 5802 §3 for
SHA-1 and SHA-256, never a password. Each call is one statement on the primary key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.storage import StoreSpec
from server.storage.base import AccountExists, Credentials, NoSuchAccount, ScramKeys
from server.storage.db import UniqueViolation
from server.storage.store import Store

_KEY_COLUMNS = ("sha1_salt {blob} NOT NULL, sha1_iterations INTEGER NOT NULL, "
                "sha1_stored_key {blob} NOT NULL, sha1_server_key {blob} NOT NULL, "
                "sha256_salt {blob} NOT NULL, sha256_iterations INTEGER NOT NULL, "
                "sha256_stored_key {blob} NOT NULL, sha256_server_key {blob} NOT NULL")

MIGRATIONS = {
    "sqlite": [
        # 1 (the old global version 1)
        ["""CREATE TABLE accounts (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            sha1_salt BLOB NOT NULL,
            sha1_iterations INTEGER NOT NULL,
            sha1_stored_key BLOB NOT NULL,
            sha1_server_key BLOB NOT NULL,
            sha256_salt BLOB NOT NULL,
            sha256_iterations INTEGER NOT NULL,
            sha256_stored_key BLOB NOT NULL,
            sha256_server_key BLOB NOT NULL,
            created INTEGER NOT NULL DEFAULT (strftime('%s', 'now')),
            PRIMARY KEY (domain, localpart)
        ) WITHOUT ROWID"""],
    ],
    "postgresql": [
        # 1
        [f"""CREATE TABLE accounts (
            domain TEXT NOT NULL,
            localpart TEXT NOT NULL,
            {_KEY_COLUMNS.format(blob="BYTEA")},
            created BIGINT NOT NULL DEFAULT (extract(epoch FROM now())::BIGINT),
            PRIMARY KEY (domain, localpart)
        )"""],
    ],
}


class AccountStoreSQL(Store):
    """AccountStore."""

    _KEYS = ("sha1_salt, sha1_iterations, sha1_stored_key, sha1_server_key, "
             "sha256_salt, sha256_iterations, sha256_stored_key, sha256_server_key")

    # The keys of a hash an account lacks (Credentials: imported with one hash only) are
    # stored as this row of the same NOT NULL columns: no iteration count is 0.
    _ABSENT = (b"", 0, b"", b"")

    @classmethod
    def _columns(cls, c: Credentials) -> tuple[object, ...]:
        return tuple(value for keys in (c.sha1, c.sha256)
                     for value in (cls._ABSENT if keys is None else
                                   (keys.salt, keys.iterations, keys.stored_key,
                                    keys.server_key)))

    @staticmethod
    def _keys(row: Sequence[Any]) -> ScramKeys | None:
        return ScramKeys(*row) if row[1] else None

    async def create(self, user: str, domain: str, credentials: Credentials) -> None:
        try:
            await self._db.execute(
                f"INSERT INTO accounts (domain, localpart, {self._KEYS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                domain, user, *self._columns(credentials))
        except UniqueViolation:
            raise AccountExists(f"{user}@{domain}") from None

    async def delete(self, user: str, domain: str) -> None:
        if not await self._db.execute(
                "DELETE FROM accounts WHERE domain = ? AND localpart = ?", domain, user):
            raise NoSuchAccount(f"{user}@{domain}")

    async def get_credentials(self, user: str, domain: str) -> Credentials | None:
        row = await self._first(
            f"SELECT {self._KEYS} FROM accounts WHERE domain = ? AND localpart = ?",
            domain, user)
        if row is None:
            return None
        return Credentials(sha1=self._keys(row[:4]), sha256=self._keys(row[4:]))

    async def set_credentials(self, user: str, domain: str, credentials: Credentials) -> None:
        """New keys; the account's XEP-0484 FAST tokens (server/storage/fast.py) go with the
        old ones, in the same transaction."""
        columns = ", ".join(f"{name} = ?" for name in self._KEYS.split(", "))
        async with self._db.transaction() as tx:
            if not await tx.execute(
                    f"UPDATE accounts SET {columns} WHERE domain = ? AND localpart = ?",
                    *self._columns(credentials), domain, user):
                raise NoSuchAccount(f"{user}@{domain}")
            await tx.execute("DELETE FROM fast_tokens WHERE domain = ? AND localpart = ?",
                             domain, user)

    async def exists(self, user: str, domain: str) -> bool:
        return await self._first("SELECT 1 FROM accounts WHERE domain = ? AND localpart = ?",
                                 domain, user) is not None

    async def missing_keys(self) -> tuple[int, int]:
        row = await self._first(
            "SELECT count(CASE WHEN sha1_iterations = 0 THEN 1 END), "
            "count(CASE WHEN sha256_iterations = 0 THEN 1 END) FROM accounts")
        assert row is not None
        return int(row[0]), int(row[1])

    async def list(self, domain: str) -> list[str]:
        # Sorted here, by code point, the same on both backends (whatever the collation).
        rows = await self._db.fetch("SELECT localpart FROM accounts WHERE domain = ?", domain)
        return sorted(row[0] for row in rows)


SPEC: StoreSpec = StoreSpec(name="accounts", sqlite=AccountStoreSQL, postgresql=AccountStoreSQL,
                 migrations=MIGRATIONS, tables=("accounts",), requires=())
