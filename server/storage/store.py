"""What every store of per-account data shares, on either backend: the Database, "the first
value or None", and a write that names a vanished account.

Tables reference accounts(domain, localpart) with ON DELETE CASCADE, so deleting an account
removes everything it owns, and a write for an account that no longer exists fails its foreign
key: NoSuchAccount.
"""

from __future__ import annotations

from typing import Any

from server.storage.base import NoSuchAccount
from server.storage.db import Database, ForeignKeyViolation, Row


class Store:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _first(self, sql: str, *args: Any) -> Row | None:
        return await self._db.fetchrow(sql, *args)

    async def _write(self, user: str, domain: str, sql: str, *args: Any) -> int:
        try:
            return await self._db.execute(sql, *args)
        except ForeignKeyViolation:
            raise NoSuchAccount(f"{user}@{domain}") from None
