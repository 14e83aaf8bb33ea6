"""One storage read per key at a time, shared by everyone who asks meanwhile (a bind's
read-ahead, the initial presence, a roster get): each caller awaits the same read, and a key
forgotten while it is read ([cluster]: changed on another node) is not remembered from that
read, which may be from before the change."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedReads(Generic[K, V]):
    def __init__(self) -> None:
        self._reading: dict[K, asyncio.Future[V]] = {}
        self._dropped: set[K] = set()

    def read(self, key: K, load: Callable[[], Awaitable[V]],
             keep: Callable[[V], None]) -> Awaitable[V]:
        """The value `load` reads for `key` (one read for all callers); `keep` remembers it
        unless the key was forgotten meanwhile."""
        reading = self._reading.get(key)
        if reading is None:
            reading = self._reading[key] = asyncio.ensure_future(self._run(key, load, keep))
            reading.add_done_callback(_retrieved)
        # Shielded: a caller that goes away (its stream closed) leaves the read to the others.
        return asyncio.shield(reading)

    def forget(self, key: K) -> None:
        """The key changed: a read under way is not remembered."""
        if key in self._reading:
            self._dropped.add(key)

    async def _run(self, key: K, load: Callable[[], Awaitable[V]],
                   keep: Callable[[V], None]) -> V:
        try:
            value = await load()
        finally:
            del self._reading[key]
            dropped = key in self._dropped
            self._dropped.discard(key)
        if not dropped:
            keep(value)
        return value


def _retrieved(reading: asyncio.Future[V]) -> None:
    """Its error is the awaiting callers'; none may be left to take it (all went away)."""
    if not reading.cancelled():
        reading.exception()
