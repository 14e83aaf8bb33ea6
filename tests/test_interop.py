"""Federation with real peers on loopback: Prosody (Debian `prosody`) and ejabberd (Debian
`ejabberd`), each with its own config on its own 127.0.0.x address, started by the tests.

The steps are the ones two presenced servers go through (tests/test_federation.py:
federation_scenario): subscriptions, presence and messages both ways, then unavailable. On CI
these tests must run: a missing peer is a failure there, a skip elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bench.peers import EjabberdPeer, Peer, ProsodyPeer, make_ca, make_certificates
from federation import auth
from tests.conftest import PASSWORD, RunningServer, on_ci, start_server, stop_server
from tests.rawclient import CLIENT, RawClient
from tests.test_federation import (
    DIALBACK,
    expect_bounce,
    federation_scenario,
    next_message,
    s2s_open,
)

OURS, OURS2 = "ours.test", "second.test"  # two hosted domains, each its own s2s identity
OUR_HOST = "127.0.0.44"        # peers find ours.test here, on port 5269
PROSODY, PROSODY_HOST = "prosody.test", "127.0.0.45"
EJABBERD, EJABBERD_HOST = "ejabberd.test", "127.0.0.46"
S2S_PORT = 5269


def need(program: str, package: str) -> None:
    if shutil.which(program) is None:
        if on_ci():
            pytest.fail(f"{program} is missing on CI: .ci/run must apt-get install {package}")
        pytest.skip(f"{program} is not installed (apt-get install {package})")


@contextlib.contextmanager
def running(peer: Peer) -> Iterator[Peer]:
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@contextlib.asynccontextmanager
async def our_server(tmp: Path, remote: str, remote_host: str, *, certs: object | None,
                     ca_file: Path | None, strict: bool) -> AsyncIterator[RunningServer]:
    options: dict[str, object] = {}
    if certs is not None:
        options["certificate"] = (certs.certificate, certs.key)  # type: ignore[attr-defined]
    if ca_file is not None:
        options["ca_file"] = ca_file
    s2s = (f'[s2s]\nroutes = {{ "{remote}" = "{remote_host}:{S2S_PORT}" }}\n'
           f"require_valid_certificates = {'true' if strict else 'false'}\n")
    ours = await start_server(tmp / "ours", s2s, domains=(OURS, OURS2), host=OUR_HOST,
                              s2s=f"{OUR_HOST}:{S2S_PORT}", **options)
    try:
        await ours.add_user(f"alice@{OURS}")
        await ours.add_user(f"carol@{OURS2}")
        yield ours
    finally:
        await stop_server(ours)


def inbound_methods(ours: RunningServer) -> set[str]:
    federation = ours.server.federation
    assert federation is not None
    return {"sasl-external" if s.negotiation.sasl_done else "dialback"
            for s in federation.inbound if s.negotiation.authenticated}


def outbound_methods(ours: RunningServer) -> set[str]:
    federation = ours.server.federation
    assert federation is not None
    return {s.negotiation.method for s in federation.outbound.values()
            if s.ready and s.negotiation is not None}


async def peer_login(host: str, domain: str, user: str) -> RawClient:
    client = await RawClient.connect(host, 5222)
    client.jid = await client.login(domain, user, PASSWORD, "peer")  # type: ignore[attr-defined]
    return client


async def scenario_with(ours: RunningServer, peer_host: str, peer_domain: str) -> None:
    alice = await ours.raw_login(f"alice@{OURS}", resource="pc")
    bob = await peer_login(peer_host, peer_domain, "bob")
    await federation_scenario(alice, bob, f"alice@{OURS}", f"bob@{peer_domain}")
    # The second hosted domain authenticates on a stream of its own, both ways.
    carol = await ours.raw_login(f"carol@{OURS2}", resource="pc")
    await carol.send(f"<message to='{bob.jid}' id='c1'><body>from the other domain</body>"  # type: ignore[attr-defined]
                     "</message>")
    got = await next_message(bob)
    assert got.get("from") == carol.jid  # type: ignore[attr-defined]
    await bob.send(f"<message to='{carol.jid}' id='c2'><body>back</body></message>")  # type: ignore[attr-defined]
    assert (await next_message(carol)).findtext(f"{{{CLIENT}}}body") == "back"
    federation = ours.server.federation
    assert federation is not None
    assert {(s.local, s.remote) for s in federation.outbound.values() if s.ready} == {
        (OURS, peer_domain), (OURS2, peer_domain)}
    await bob.close()


# -- Prosody --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["certificates", "dialback", "bidi"])
async def test_prosody(tmp_path: Path, mode: str) -> None:
    """bidi: certificates, and Prosody's mod_s2s_bidi (XEP-0288) answers over our stream."""
    need("prosody", "prosody lua-unbound")
    strict = mode in ("certificates", "bidi")
    ca = make_ca(tmp_path / "ca") if strict else None
    our_certs = make_certificates(tmp_path / "ours-certs", [OURS, OURS2], ca=ca)
    peer_certs = make_certificates(tmp_path / "prosody-certs", [PROSODY], ca=ca)
    peer = ProsodyPeer(tmp_path / "prosody", host=PROSODY_HOST, domains=(PROSODY,),
                       s2s_port=S2S_PORT, certificates=peer_certs,
                       cafile=ca.certificate if ca else None, dialback=not strict,
                       s2s_secure_auth=strict, hosts={OURS: OUR_HOST, OURS2: OUR_HOST},
                       extra_modules=("s2s_bidi",) if mode == "bidi" else ())
    peer.register("bob", PROSODY, PASSWORD)
    async with our_server(tmp_path, PROSODY, PROSODY_HOST, certs=our_certs,
                          ca_file=ca.certificate if ca else None, strict=strict) as ours:
        with running(peer):
            await scenario_with(ours, PROSODY_HOST, PROSODY)
            want = "sasl-external" if strict else "dialback"
            assert outbound_methods(ours) == {want}, peer.log_tail()
            federation = ours.server.federation
            assert federation is not None
            if mode == "bidi":  # Prosody never needed a connection of its own to us
                assert all(s.negotiation.bidi for s in federation.outbound.values()
                           if s.negotiation is not None)
                assert not federation.inbound, peer.log_tail()
            else:
                assert inbound_methods(ours) == {want}, peer.log_tail()
        # The peer is down now: our user learns it (RFC 6120 §8.3.3).
        alice = await ours.raw_login(f"alice@{OURS}", resource="later")
        await wait_no_outbound(ours)
        await expect_bounce(alice, f"bob@{PROSODY}",
                            ("remote-server-not-found", "remote-server-timeout"))


async def wait_no_outbound(ours: RunningServer) -> None:
    """The peer's shutdown closes our stream to it."""
    federation = ours.server.federation
    assert federation is not None
    for _ in range(50):
        if not federation.outbound:
            return
        await asyncio.sleep(0.1)


# -- ejabberd -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["certificates", "dialback"])
async def test_ejabberd(tmp_path: Path, mode: str) -> None:
    need("ejabberdctl", "ejabberd")
    strict = mode == "certificates"
    ca = make_ca(tmp_path / "ca") if strict else None
    our_certs = make_certificates(tmp_path / "ours-certs", [OURS, OURS2], ca=ca)
    peer_certs = make_certificates(tmp_path / "ejabberd-certs", [EJABBERD], ca=ca)
    peer = EjabberdPeer(host=EJABBERD_HOST, domains=(EJABBERD,), s2s_port=S2S_PORT,
                        certificates=peer_certs, cafile=ca.certificate if ca else None,
                        dialback=not strict, s2s_use_starttls="required",
                        s2s_hosts={OURS: (OUR_HOST, S2S_PORT), OURS2: (OUR_HOST, S2S_PORT)})
    async with our_server(tmp_path, EJABBERD, EJABBERD_HOST, certs=our_certs,
                          ca_file=ca.certificate if ca else None, strict=strict) as ours:
        with running(peer):
            peer.register("bob", EJABBERD, PASSWORD)
            await scenario_with(ours, EJABBERD_HOST, EJABBERD)
            want = "sasl-external" if strict else "dialback"
            assert outbound_methods(ours) == {want}, peer.log_tail()
            assert inbound_methods(ours) == {want}, peer.log_tail()
        alice = await ours.raw_login(f"alice@{OURS}", resource="later")
        await wait_no_outbound(ours)
        await expect_bounce(alice, f"bob@{EJABBERD}",
                            ("remote-server-not-found", "remote-server-timeout"))


async def test_prosody_asks_us_about_dialback_keys(tmp_path: Path) -> None:
    """We are the authoritative server (XEP-0220 §2.3): someone claiming to be ours.test
    offers Prosody a dialback key; Prosody asks us, and only our own key is accepted."""
    need("prosody", "prosody lua-unbound")
    secret = "ours.test's dialback secret for this test"
    peer = ProsodyPeer(tmp_path / "prosody", host=PROSODY_HOST, domains=(PROSODY,),
                       s2s_port=S2S_PORT, dialback=True, hosts={OURS: OUR_HOST})
    # Prosody sends its <db:verify/> only once its own stream to us is authenticated, for
    # which we check its key in turn: we must be able to reach it.
    ours = await start_server(tmp_path / "ours", f'[s2s]\ndialback_secret = "{secret}"\n'
                              f'routes = {{ "{PROSODY}" = "{PROSODY_HOST}:{S2S_PORT}" }}\n',
                              domains=(OURS,), host=OUR_HOST, s2s=f"{OUR_HOST}:{S2S_PORT}")
    try:
        with running(peer):
            for key, expected in (("f" * 64, "invalid"), (None, "valid")):
                raw, _features = await s2s_open(PROSODY_HOST, S2S_PORT, PROSODY, OURS)
                if key is None:  # the genuine key, as ours.test would compute it (XEP-0185)
                    key = auth.dialback_key(secret.encode(), PROSODY, OURS,
                                            raw.stream_attrs["id"])
                await raw.send(f"<db:result xmlns:db='{DIALBACK}' from='{OURS}' "
                               f"to='{PROSODY}'>{key}</db:result>")
                result = await raw.expect(f"{{{DIALBACK}}}result", timeout=15)
                assert result.get("type") == expected, peer.log_tail()
                await raw.close()
    finally:
        await stop_server(ours)
