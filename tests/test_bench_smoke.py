"""The benchmark keeps working: a seconds-long run against a real Prosody, and the limit row.

Nothing here asserts anything about speed; CI machines vary too much.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from lxml import etree

from bench import muc_fanout, pep_notify
from bench.limit import MESSAGE, stanza_floor
from bench.loadgen import (
    CAPS_NODE,
    CAPS_VER,
    CapsClient,
    TagCounter,
    Target,
    _Listener,
    caps_ver,
    ring_contacts,
)
from bench.peers import EjabberdPeer, Peer, ProsodyPeer, make_ca, make_certificates
from bench.run import Fleet, Params, format_table, run_server, shard
from bench.run import rows as table_rows
from server.modules.caps import caps_hash
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


def test_caps_ver_is_xep_0115s_example() -> None:
    # XEP-0115 §5.2, the simple example.
    assert caps_ver(("client", "pc", "", "Exodus 0.9.1"), [
        "http://jabber.org/protocol/caps", "http://jabber.org/protocol/disco#info",
        "http://jabber.org/protocol/disco#items", "http://jabber.org/protocol/muc",
    ]) == "QgayPKawpkPSDYmwT/WM94uAlu0="


class _Capture(CapsClient):
    def __init__(self) -> None:
        super().__init__(Target("127.0.0.1", 1, "bench.test", "x"), "u")
        self.sent: list[str] = []

    def send(self, data: bytes | str) -> None:
        self.sent.append(data.decode() if isinstance(data, bytes) else data)


async def test_listener_answers_caps_queries_cut_anywhere() -> None:
    """The generator's sink picks iqs out of raw bytes cut at any point: it answers the caps
    query with a disco#info result whose hash is the ver it advertises (checked with the
    server's own XEP-0115 code) and reports the replies to its publications."""
    query = (b"<iq type='get' from='u@bench.test' to='u@bench.test/bench' id='q1'><query "
             b"xmlns='http://jabber.org/protocol/disco#info' node='"
             + f"{CAPS_NODE}#{CAPS_VER}".encode() + b"'/></iq>")
    stream = (b"<message><event xmlns='http://jabber.org/protocol/pubsub#event'/></message>"
              b'<iq type="result" id="pub1"/>' + query
              + b"<iq type='error' id='pub2'><error type='cancel'/></iq><iq type='result' "
              b"id='b7'/>") * 3
    for size in range(1, len(stream) + 1):
        client = _Capture()
        replies: list[bytes | None] = []
        listener = _Listener(client, b"pubsub#event", b"pub", replies.append)
        for i in range(0, len(stream), size):
            listener.feed(stream[i:i + size])
        assert listener.count == 3 and listener.requests == 3, size
        assert [r is None for r in replies] == [True, False] * 3, size
        assert len(client.sent) == 3, size
    answer = etree.fromstring(client.sent[0])
    assert (answer.get("type"), answer.get("id"), answer.get("to")) == ("result", "q1",
                                                                         "u@bench.test")
    info = answer[0]
    assert info.get("node") == f"{CAPS_NODE}#{CAPS_VER}"
    assert caps_hash(info, "sha-1") == CAPS_VER
    assert "http://jabber.org/protocol/tune+notify" in {f.get("var") for f in info}


def on_presenced(run: Callable[..., dict[str, Any]], params: Any) -> dict[str, Any]:
    """A fan-out runner's run(kind, params, fleet) against presenced on the tests' address."""
    fleet = Fleet(1)
    try:
        got = run("presenced", params, fleet, host=BENCH_HOST, port=free_port(BENCH_HOST))
    finally:
        fleet.close()
    print(got)
    return got


def test_quick_pep_notifications_on_presenced() -> None:
    """What bench/pep_notify.py runs, seconds long, on presenced: users with contacts and
    +notify caps publish tunes; every publication reaches the contacts and the publisher's own
    resource, once each."""
    p = pep_notify.PepParams.quick()
    got = on_presenced(pep_notify.run, p)
    assert got["delivered"] > 0 and got["errors"] == 0
    # No duplicates (a server that sends any sends about one per recipient). The two counts
    # may differ by a notification cut in two at the window's start or end.
    assert abs(got["received"] - got["delivered"]) <= max(2, got["delivered"] // 100)
    assert got["per_publish"] == pytest.approx(p.contacts + 1, abs=0.2)
    assert got["per_cpu_s"] > 0


def test_quick_muc_fanout_on_presenced() -> None:
    """What bench/muc_fanout.py runs, seconds long, on presenced: a room whose occupants all
    talk; their groupchat messages reach every occupant and none is refused."""
    p = muc_fanout.MucParams.quick()
    got = on_presenced(muc_fanout.run, p)
    assert got["delivered"] >= p.occupants and got["refused"] == 0
    assert got["per_cpu_s"] > 0


def test_tsung_logs_in_with_scram_and_talks_on_presenced(tmp_path) -> None:
    """bench/tsung.py's scenario (tsung 1.7 with SCRAM written in Erlang) runs against
    presenced: every session logs in, binds, joins its room and sends its messages."""
    if shutil.which("tsung") is None and not os.environ.get("CI"):
        pytest.skip("tsung is not installed (apt-get install tsung)")
    from bench import tsung

    p = tsung.Params(users=4, arrival=4, chat=1, think=0.2, out=tmp_path)
    (tmp_path / "users.csv").write_text(tsung.users_csv(p))
    figures = tsung.run_one("presenced", p, log=lambda _line: None)
    done = {name: count for name, (count, _mean, _max) in figures["tr"].items()}
    assert figures["errors"] == {}, figures
    for name in ("connect", "login", "bind", "roster", "muc_join", "chat", "groupchat"):
        assert done.get(name) == 4, (name, done)
    assert "tsung" in tsung.table(p, {"presenced": figures})


def test_cluster_bench_runs_same_and_cross_node() -> None:
    """bench/cluster.py: a seconds-long run of the two-node variants on a private PostgreSQL
    and Redis; messages cross between the nodes (nothing about speed)."""
    from bench import cluster
    from bench.pgcluster import PostgresCluster
    from bench.redisserver import RedisServer

    p = replace(cluster.Params.quick(), variants=("same", "cross"))
    pg, redis = PostgresCluster().start(), RedisServer().start()
    fleet = Fleet(1)
    try:
        results = {name: cluster.run_variant(name, p, fleet, pg, redis, db, log=lambda _: None)
                   for db, name in enumerate(p.variants)}
    finally:
        fleet.close()
        redis.stop()
        pg.stop()
    for name, figures in results.items():
        assert figures["per_s"] > 0 and figures["cpu_us"] > 0, (name, figures)
    assert "CPU" in cluster.table(p, results)


def test_many_sessions_stay_connected_and_a_fresh_client_pings() -> None:
    """bench/many_sessions.py, seconds long: a few hundred authenticated TLS sessions from two
    loopback source addresses stay connected on a fresh presenced; a fresh client's pings are
    then answered (nothing about speed)."""
    from bench import many_sessions

    logged: list[str] = []
    p = replace(many_sessions.Params.quick(), sessions=240, procs=2, sources=2, pings=40,
                host=BENCH_HOST, port=free_port(BENCH_HOST), log=logged.append)
    got = many_sessions.run(p)
    assert (got["sessions"], got["failed"], got["stopped"]) == (240, 0, ""), logged
    assert got["sources_seen"] == ["127.0.33.1", "127.0.33.2"]
    assert got["open_files"] >= 240  # every session is a descriptor of the server's
    assert got["pings"] == 40 and 0 < got["ping_p50_ms"] <= got["ping_p99_ms"]
    assert got["kib_per_session"] > 0 and got["server_ms_per_login"] > 0
    assert max(got["rates"]) > 0 and got["logins_per_s"] > 0
    assert any(line.startswith("t=") and "connected=" in line for line in logged)
    print(many_sessions.describe(got, many_sessions.plan(p)))


def test_table_quick_on_presenced_rows(tmp_path) -> None:
    """`python -m bench.table --quick`, restricted to presenced and its 1:1 rows, seconds long:
    the Markdown table names the machine and the load, shows the figures the benchmarks
    measured, says how to run the 100k-sessions row whose result file is absent, and divides
    presenced's figure by a peer's for the ratio columns."""
    import json

    from bench import table

    out, figures = tmp_path / "table.md", tmp_path / "table.json"
    assert table.main(["--quick", "--servers", "presenced", "--rows", "messages,sessions",
                       "--out", str(out), "--json", str(figures),
                       "--many-sessions", str(tmp_path / "absent.json")]) == 0
    text = out.read_text()
    assert "cores" in text and "load average" in text, text
    got = json.loads(figures.read_text())["results"]["messages"]["presenced"]
    assert got["off"] > 0 and got["on"] > 0, got
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[1]
             for line in text.splitlines() if line.startswith("| ")}
    assert cells["1:1 messages per server CPU-s, archiving off"] == f"{got['off']:,.0f}"
    assert cells["Many sessions (issue 25: 100,000), as bench.many_sessions reported"].startswith(
        "not run (`python -m bench.many_sessions"), cells
    # The ratio columns: presenced's figure over each peer's (the peers' archiving-on row is
    # their archiving-off figure, as they run without an archive).
    s = replace(table.Settings.for_quick(), servers=("presenced", "prosody"))
    now = (table.datetime.now(table.UTC), (0.0, 0.0, 0.0))
    both = table.format_table(s, {"messages": {"presenced": {"off": 300.0, "on": 150.0},
                                               "prosody": {"off": 100.0}}}, "cmd", now, now)
    assert "| 300 | 100 | 3.00x |" in both and "| 150 | 100 | 1.50x |" in both, both


def test_idle_memory_tls_share_measures_both_clients() -> None:
    """bench.idle_memory --tls: handshakes with both clients go through and give a figure."""
    import re

    from bench.idle_memory import tls_share

    lines = tls_share(20)
    assert len(lines) == 3, lines
    figures = [float(re.search(r"([0-9.]+) KiB", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert all(figure > 1 for figure in figures), lines
    assert "stdlib client" in lines[0] and "pyOpenSSL client" in lines[1], lines
