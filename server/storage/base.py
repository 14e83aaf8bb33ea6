"""Storage interfaces: narrow async Protocols, one per concern. No SQL outside storage/.

A backend (sqlite.py now, PostgreSQL later) implements these and passes tests/test_storage.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    """An account's secrets: SCRAM keys for each hash we offer (SHA-1 and SHA-256).

    An account made here has both. One imported from another server (server/porting, XEP-0227)
    may have only the hash that server kept (Prosody 0.12 and ejabberd keep SCRAM-SHA-1 only):
    the other is None, and a login with its mechanism fails as a wrong password would."""

    sha1: ScramKeys | None
    sha256: ScramKeys | None

    def __post_init__(self) -> None:
        if self.sha1 is None and self.sha256 is None:
            raise ValueError("credentials need the keys of at least one hash")

    @property
    def strongest(self) -> ScramKeys:
        """The keys to check a password against outside SASL (PLAIN, the admin page)."""
        keys = self.sha256 or self.sha1
        assert keys is not None  # __post_init__
        return keys


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

    async def missing_keys(self) -> tuple[int, int]:
        """(accounts without SHA-1 keys, accounts without SHA-256 keys), of all domains."""


@dataclass(frozen=True, slots=True)
class RosterItem:
    """One contact in an account's roster, with its RFC 6121 subscription state.

    `listed` is False for a record that only holds an inbound request (RFC 6121 §3.1.3: an
    inbound subscribe creates no roster item); `request` is that stanza, kept to redeliver."""

    contact: str
    name: str | None = None
    groups: tuple[str, ...] = ()
    subscription: str = "none"
    pending_out: bool = False
    pending_in: bool = False
    approved: bool = False
    listed: bool = True
    request: str | None = None


class RosterStore(Protocol):
    async def load(self, user: str, domain: str) -> tuple[int, list[RosterItem]]:
        """(version, items); version 0 for an account that never had a roster."""

    async def put(self, user: str, domain: str, item: RosterItem) -> int:
        """Insert or replace the item; returns the new roster version."""

    async def delete(self, user: str, domain: str, contact: str) -> int:
        """Remove the item (if present); returns the new roster version."""


class VCardStore(Protocol):
    """vcard-temp (XEP-0054): one vCard per account, kept as its XML text."""

    async def get(self, user: str, domain: str) -> str | None: ...

    async def set(self, user: str, domain: str, vcard: str, avatar_hash: str) -> None:
        """avatar_hash: hex SHA-1 of the PHOTO image (XEP-0153), '' when there is none.
        Raises NoSuchAccount."""

    async def avatar_hash(self, user: str, domain: str) -> str | None:
        """None when no vCard is stored."""


class PrivateStore(Protocol):
    """Private XML storage (XEP-0049): XML text keyed by (namespace, element name)."""

    async def get(self, user: str, domain: str, namespace: str, name: str) -> str | None: ...

    async def set(self, user: str, domain: str, items: Sequence[tuple[str, str, str]]) -> None:
        """Store (namespace, name, xml) items at once, all or none. Raises NoSuchAccount."""

    async def all(self, user: str, domain: str) -> list[tuple[str, str, str]]:
        """Every (namespace, name, xml) item of the account, sorted by (namespace, name)
        (an export: server/porting)."""


class LastActivityStore(Protocol):
    """Last activity (XEP-0012): when an account's last session ended, and its status then."""

    async def get(self, user: str, domain: str) -> tuple[int, str] | None:
        """(logout as Unix time, status text) or None when never recorded."""

    async def set(self, user: str, domain: str, logout: int, status: str) -> None:
        """Raises NoSuchAccount."""


class OfflineStore(Protocol):
    """Offline messages (XEP-0160): serialised stanzas per account, kept in arrival order."""

    async def store(self, user: str, domain: str, stanza: bytes, max_messages: int) -> bool:
        """Append one message, committed on return; False (nothing stored) when the account
        already holds max_messages."""

    async def load(self, user: str, domain: str) -> list[tuple[int, bytes]]:
        """(id, stanza) oldest first; ids increase with arrival."""

    async def delete(self, user: str, domain: str, up_to: int) -> None:
        """Remove the account's messages with id <= up_to (those delivered)."""

    async def count(self, user: str, domain: str) -> int: ...

    async def owners(self, limit: int) -> list[tuple[str, str]]:
        """(user, domain) of at most limit accounts that hold messages, in no order."""


class BlocklistStore(Protocol):
    """Blocking command (XEP-0191): the normalised JIDs (full, bare or domain) an account
    blocks."""

    async def get(self, user: str, domain: str) -> list[str]: ...

    async def add(self, user: str, domain: str, jids: Iterable[str]) -> None:
        """Adding a JID already there is not an error."""

    async def remove(self, user: str, domain: str, jids: Iterable[str]) -> None: ...

    async def clear(self, user: str, domain: str) -> None: ...
