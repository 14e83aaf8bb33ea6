"""SRV ordering (RFC 2782) and target selection (RFC 6120 §3.2, XEP-0368)."""

from __future__ import annotations

import random
from collections import Counter

from federation.resolver import DEFAULT_PORT, Resolver, SrvRecord, Target, order_srv


def test_lower_priority_first() -> None:
    records = [SrvRecord(20, 0, 1, "c"), SrvRecord(10, 5, 2, "a"), SrvRecord(10, 5, 3, "b")]
    ordered = order_srv(records, random.Random(1))
    assert [r.priority for r in ordered] == [10, 10, 20]
    assert {r.host for r in ordered[:2]} == {"a", "b"}


def test_weights_pick_proportionally() -> None:
    rng = random.Random(7)
    heavy, light = SrvRecord(0, 90, 1, "heavy"), SrvRecord(0, 10, 2, "light")
    firsts = Counter(order_srv([light, heavy], rng)[0].host for _ in range(4000))
    assert 0.85 < firsts["heavy"] / 4000 < 0.95


def test_zero_weight_gets_a_small_chance() -> None:
    rng = random.Random(3)
    records = [SrvRecord(0, 0, 1, "zero"), SrvRecord(0, 100, 2, "full")]
    firsts = Counter(order_srv(records, rng)[0].host for _ in range(4000))
    assert 0 < firsts["zero"] < 200


def test_every_record_kept_once() -> None:
    records = [SrvRecord(p, w, i, f"h{i}") for i, (p, w) in
               enumerate([(0, 1), (0, 0), (1, 5), (1, 5), (2, 0)])]
    assert sorted(order_srv(records), key=lambda r: r.port) == records


async def test_static_route_wins() -> None:
    resolver = Resolver({"b.test": ("127.0.0.9", 5999)})
    assert await resolver.targets("b.test") == [Target("127.0.0.9", 5999, direct_tls=False)]
    await resolver.close()


async def test_no_srv_falls_back_to_the_domain() -> None:
    # A .test name has no records anywhere (RFC 6761): the A fallback on 5269.
    resolver = Resolver(nameservers=["127.0.0.1:9"], timeout=0.5)
    assert await resolver.targets("nothing.test") == [
        Target("nothing.test", DEFAULT_PORT, direct_tls=False)]
    await resolver.close()
