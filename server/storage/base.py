"""Storage interfaces: narrow async Protocols, one per concern. No SQL outside storage/.

A backend (sqlite.py now, PostgreSQL later) implements these and passes tests/test_storage.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """RFC 5802 §3: what the server keeps for one hash; the password itself is never stored."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """An account's secrets: SCRAM keys for each hash we offer (SHA-1 and SHA-256)."""

    sha1: ScramKeys
    sha256: ScramKeys


class AccountExists(Exception):
    pass


class NoSuchAccount(Exception):
    pass


class AccountStore(Protocol):
    """Accounts by (localpart, domain); both already normalised (RFC 7622)."""

    async def create(self, user: str, domain: str, credentials: Credentials) -> None:
        """Raises AccountExists."""

    async def delete(self, user: str, domain: str) -> None:
        """Raises NoSuchAccount. Removes everything the account owns."""

    async def get_credentials(self, user: str, domain: str) -> Credentials | None: ...

    async def set_credentials(self, user: str, domain: str, credentials: Credentials) -> None:
        """Raises NoSuchAccount."""

    async def exists(self, user: str, domain: str) -> bool: ...

    async def list(self, domain: str) -> list[str]: ...
