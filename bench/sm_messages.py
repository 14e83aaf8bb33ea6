"""The cost of stream management (issue 11): bench/run.py's 1:1 messages scenario with every
client plain and with XEP-0198 enabled (senders ask for an acknowledgement after each batch,
receivers answer the server's requests), on presenced, Prosody 0.12 (mod_smacks) and
ejabberd (mod_stream_mgmt), one fresh server each.

    python -m bench.sm_messages [--quick] [--servers presenced,prosody,ejabberd]
                                [--duration 8] [--pairs 50] [--window 32]
"""

from __future__ import annotations

import sys

from bench import feature
from bench.feature import PeerMaker, Variant
from bench.peers import EjabberdPeer, PresencedPeer, ProsodyPeer
from bench.run import ADDRESSES, DOMAIN, NO_ARCHIVE

# The same servers for both variants: only the clients differ (they enable XEP-0198 or not).
SERVERS: dict[str, PeerMaker] = {
    "presenced": lambda host, port: PresencedPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                                  extra_config=NO_ARCHIVE),
    "prosody": lambda host, port: ProsodyPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                              extra_modules=("smacks",)),
    "ejabberd": lambda host, port: EjabberdPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                                in_band_registration=True,
                                                extra_modules={"mod_stream_mgmt": {}}),
}
VARIANTS = (Variant("off", SERVERS, op="messages"), Variant("on", SERVERS, op="messages_sm"))


def main(argv: list[str] | None = None) -> int:
    p, kinds = feature.parse(__doc__ or "", "presenced,prosody,ejabberd", argv)
    feature.compare(kinds, p, VARIANTS, "SM", ADDRESSES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
