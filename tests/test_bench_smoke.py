"""The benchmark keeps working: a seconds-long run against a real Prosody, and the limit row.

Nothing here asserts anything about speed; CI machines vary too much.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import replace

import pytest

from bench.limit import MESSAGE, stanza_floor
from bench.loadgen import TagCounter, ring_contacts
from bench.peers import EjabberdPeer, Peer, ProsodyPeer, make_ca, make_certificates
from bench.run import Fleet, Params, format_table, run_server, shard
from bench.run import rows as table_rows
from tests.process import free_port

# Serialised in the stream's tree, a stanza declares the stream's namespaces (quotes doubled).
SERIALISED = len(MESSAGE) + len(' xmlns="jabber:client" '
                                'xmlns:stream="http://etherx.jabber.org/streams"')
BENCH_HOST = "127.0.0.28"  # bench servers use 127.0.0.20-29


def need_prosody() -> None:
    if shutil.which("prosody") is None and not os.environ.get("CI"):
        pytest.skip("prosody is not installed (apt-get install prosody lua-unbound)")


def s2s_features(host: str, port: int) -> bytes:
    """What a peer answers to an incoming s2s stream header, up to its stream features."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                     b"xmlns:stream='http://etherx.jabber.org/streams' "
                     b"xmlns:db='jabber:server:dialback' to='bench.test' from='b.test' "
                     b"version='1.0'>")
        received = b""
        while b"</stream:features>" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    return received


def test_tag_counter_finds_closing_tags_cut_anywhere() -> None:
    stream = b"<message to='a'><body>x</body></message><presence/>" * 4
    for size in range(1, len(stream) + 1):
        counter = TagCounter(b"</message>")
        pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
        assert sum(counter.count(piece) for piece in pieces) == 4, size


def test_ring_contacts_are_mutual_and_distinct() -> None:
    for i in range(9):
        mine = ring_contacts(i, 9, 4)
        assert len(set(mine)) == 4 and i not in mine
        assert all(i in ring_contacts(j, 9, 4) for j in mine)


def test_shards_are_contiguous_and_complete() -> None:
    assert shard(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard([1], 2) == [[1], []]


def test_limit_row_parses_serialises_and_moves_every_stanza() -> None:
    result = stanza_floor(300)
    assert result.stanzas == 300
    assert result.bytes_moved == 300 * SERIALISED  # every stanza came back out of the socket
    assert result.cpu_seconds > 0
    assert result.stanzas_per_second == pytest.approx(300 / result.cpu_seconds)


def test_limit_row_without_io_still_serialises_every_stanza() -> None:
    result = stanza_floor(300, io=False)
    assert result.bytes_moved == 300 * SERIALISED
    assert not result.io


def test_quick_messages_against_prosody() -> None:
    need_prosody()
    params = replace(Params.quick(), servers=("prosody",), scenarios=("messages",),
                     duration=2.0)
    logged: list[str] = []
    fleet = Fleet(1)
    try:
        figures = run_server("prosody", params, fleet, log=logged.append, host=BENCH_HOST,
                             port=free_port(BENCH_HOST))
    finally:
        fleet.close()
    assert "messages_error" not in figures, (figures, logged)
    assert figures["msgs_delivered"] >= params.pairs  # every pair got through
    assert figures["msgs_per_s"] > 0 and figures["cpu_per_1000"] > 0
    table = format_table(params, {"prosody": figures}, (stanza_floor(100),
                                                        stanza_floor(100, io=False)))
    print(table)
    header, rule, *rows = table.splitlines()
    assert header.split() == ["scenario", "prosody"] and set(rule) == {"-", " "}
    delivered = next(r for r in rows if r.startswith("1:1 messages delivered/s"))
    assert delivered.split()[-1].replace(",", "").isdigit()
    assert any(r.startswith("limit (Python, 1 core") for r in rows)


def test_quick_run_against_presenced() -> None:
    """What CI runs of the benchmark: every scenario of `python -m bench.run --quick` against
    presenced itself (a separate `python -m server serve`, as the side-by-side run starts it),
    each with figures and none with an error, and the table that shows them."""
    params = replace(Params.quick(), servers=("presenced",))
    logged: list[str] = []
    fleet = Fleet(1)
    try:
        figures = run_server("presenced", params, fleet, log=logged.append, host=BENCH_HOST,
                             port=free_port(BENCH_HOST))
    finally:
        fleet.close()
    errors = {k: v for k, v in figures.items() if k.endswith(("_error", "_unsupported"))}
    assert errors == {}, (errors, logged)
    for name in params.scenarios:
        assert any(line == f"presenced: {name} done in " + line.rsplit(" in ", 1)[1]
                   for line in logged), (name, logged)
    assert figures["login_errors"] == 0
    assert figures["logins_per_s"] > 0 and figures["login_p50_ms"] > 0
    assert figures["msgs_delivered"] >= params.pairs  # every pair got through
    assert figures["lat_delivered"] >= params.latency_pairs
    assert 0 < figures["lat_p50"] <= figures["lat_p99"]
    assert figures["presence_per_s"] > 0
    assert 0 < figures["rss_base_mib"] < figures["rss_idle_mib"]
    table = format_table(params, {"presenced": figures})
    print(table)
    header, rule, *lines = table.splitlines()
    assert header.split() == ["scenario", "presenced"] and set(rule) == {"-", " "}
    *figure_rows, note = lines
    expected = [row.label for row in table_rows(params) if row.scenario in params.scenarios]
    assert [r[:len(label)] for r, label in zip(figure_rows, expected, strict=True)] == expected
    for row in figure_rows:
        cell = row.rstrip().rsplit("  ", 1)[-1].strip()
        assert cell[:1].isdigit(), row  # a figure, never "-" or "error: ..."
    assert note.startswith("ratios (Nx) are against Prosody")


@pytest.mark.parametrize("dialback", [True, False])
def test_prosody_peer_serves_s2s_with_a_test_ca(tmp_path, dialback: bool) -> None:
    need_prosody()
    ca = make_ca(tmp_path / "ca")
    certs = make_certificates(tmp_path / "certs", ["bench.test"], ca=ca)
    port = free_port(BENCH_HOST)
    peer: Peer = ProsodyPeer(tmp_path / "prosody", host=BENCH_HOST, c2s_port=None,
                             s2s_port=port, certificates=certs, cafile=ca.certificate,
                             dialback=dialback, hosts={"b.test": "127.0.0.7"})
    with peer:
        assert peer.pid_tree() and peer.rss_kib() > 0
        features = s2s_features(BENCH_HOST, port)
    assert not peer.running
    # s2s_require_encryption: STARTTLS is <required/> (the order of features varies).
    assert (b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
            in features)
    assert (b"urn:xmpp:features:dialback" in features) is dialback
    assert (tmp_path / "prosody" / "hosts").read_text() == "127.0.0.7 b.test\n"


def test_ejabberd_peer_serves_s2s_with_a_test_ca(tmp_path) -> None:
    if shutil.which("ejabberdctl") is None:
        pytest.skip("ejabberd is not installed (apt-get install ejabberd)")
    ca = make_ca(tmp_path / "ca")
    certs = make_certificates(tmp_path / "certs", ["bench.test"], ca=ca)
    port = free_port(BENCH_HOST)
    peer = EjabberdPeer(host=BENCH_HOST, c2s_port=None, s2s_port=port, certificates=certs,
                        cafile=ca.certificate)
    with peer:
        assert peer.server_pids() and peer.rss_kib() > 0
        features = s2s_features(BENCH_HOST, port)
    assert not peer.running and not peer.workdir.exists()
    assert b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in features
    assert b"urn:xmpp:features:dialback" in features
