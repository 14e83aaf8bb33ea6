"""The cost of archiving (issue 12): bench/run.py's 1:1 messages scenario, each server
without and with its message archive, one fresh server each: presenced with `[mam] default =
"never"` (the archive filter runs, writes nothing) and `"always"` (both copies of every
message archived, group-committed); Prosody 0.12 without and with mod_mam
(default_archive_policy = true, internal storage); ejabberd without and with mod_mam
(default: always, Mnesia).

    python -m bench.mam_messages [--quick] [--servers presenced,prosody,ejabberd]
                                 [--duration 8] [--pairs 50] [--window 32]
"""

from __future__ import annotations

import sys

from bench import feature
from bench.feature import Variant
from bench.peers import EjabberdPeer, PresencedPeer, ProsodyPeer
from bench.run import ADDRESSES, DOMAIN, NO_ARCHIVE

VARIANTS = (
    Variant("off", {
        "presenced": lambda host, port: PresencedPeer(
            host=host, c2s_port=port, domains=(DOMAIN,), extra_config=NO_ARCHIVE),
        "prosody": lambda host, port: ProsodyPeer(host=host, c2s_port=port, domains=(DOMAIN,)),
        "ejabberd": lambda host, port: EjabberdPeer(
            host=host, c2s_port=port, domains=(DOMAIN,), in_band_registration=True),
    }),
    Variant("mam", {
        "presenced": lambda host, port: PresencedPeer(
            host=host, c2s_port=port, domains=(DOMAIN,),
            extra_config='[mam]\ndefault = "always"\n'),
        # mod_mam on its default (internal, file) storage, archiving every conversation.
        "prosody": lambda host, port: ProsodyPeer(
            host=host, c2s_port=port, domains=(DOMAIN,), extra_modules=("mam",),
            extra_config="default_archive_policy = true"),
        # mod_mam on ejabberd's default database (Mnesia), archiving every conversation.
        "ejabberd": lambda host, port: EjabberdPeer(
            host=host, c2s_port=port, domains=(DOMAIN,), in_band_registration=True,
            extra_modules={"mod_mam": {"default": "always"}}),
    }),
)


def main(argv: list[str] | None = None) -> int:
    p, kinds = feature.parse(__doc__ or "", "presenced,prosody,ejabberd", argv)
    feature.compare(kinds, p, VARIANTS, "archive", ADDRESSES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
