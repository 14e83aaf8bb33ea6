"""Room nicknames (XEP-0045 §7.2): checked as RFC 8266 Nicknames, and, as Prosody does it,
by strict RFC 3920 resourceprep as well; compared case-mapped (room.nick_key)."""

from __future__ import annotations

import stringprep
import unicodedata

import precis_i18n

from server.errors import StanzaError

_NICKNAME = precis_i18n.get_profile("NicknameCasePreserved")


class NickRefused(StanzaError):
    """A nickname that fails strict validation; the error comes from the occupant JID as
    resourceprep maps it (Prosody's muc_nickname_robotface.scs)."""

    def __init__(self, prepared: str) -> None:
        super().__init__("jid-malformed", "Nickname must pass strict validation")
        self.prepared = prepared


def _resourceprep(text: str) -> tuple[str, bool]:
    """RFC 3920 Resourceprep (RFC 3454 stringprep, Unicode 3.2): the mapped string, and
    whether it passes strictly (no prohibited or unassigned code points, bidi rules kept)."""
    mapped = unicodedata.ucd_3_2_0.normalize(
        "NFKC", "".join(c for c in text if not stringprep.in_table_b1(c)))
    ok = bool(mapped) and not any(
        stringprep.in_table_a1(c) or stringprep.in_table_c12(c) or stringprep.in_table_c21(c)
        or stringprep.in_table_c22(c) or stringprep.in_table_c3(c) or stringprep.in_table_c4(c)
        or stringprep.in_table_c5(c) or stringprep.in_table_c6(c) or stringprep.in_table_c7(c)
        or stringprep.in_table_c8(c) or stringprep.in_table_c9(c) for c in mapped)
    if ok and any(stringprep.in_table_d1(c) for c in mapped):
        # RFC 3454 §6: RandALCat text has no LCat and starts and ends with RandALCat
        ok = not any(stringprep.in_table_d2(c) for c in mapped) and \
            stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])
    return mapped, ok


def nickname(resource: str) -> str:
    """XEP-0045 §7.2: nicknames are compared as RFC 8266 Nicknames (NFKC, spaces folded);
    a nickname the profile rejects is jid-malformed."""
    mapped, strict = _resourceprep(resource)
    if not strict:
        # XEP-0045 §7.2 and Prosody: the nickname must pass strict resourceprep too
        raise NickRefused(mapped)
    try:
        return str(_NICKNAME.enforce(resource))
    except UnicodeError:
        raise StanzaError("jid-malformed", "not a valid nickname") from None
