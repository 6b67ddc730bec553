"""DANE TLSA records (RFC 6698, RFC 7672): which records are usable for SMTP.

Pure: no I/O.  Certificate matching against a handshake's chain comes with the STARTTLS
upgrade; this module already owns the record model it will match against.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Usage(IntEnum):
    PKIX_TA = 0
    PKIX_EE = 1
    DANE_TA = 2
    DANE_EE = 3


class Selector(IntEnum):
    CERT = 0
    SPKI = 1


class Matching(IntEnum):
    FULL = 0
    SHA256 = 1
    SHA512 = 2


_DIGEST_LEN = {Matching.SHA256: 32, Matching.SHA512: 64}


@dataclass(frozen=True, slots=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: SMTP uses DANE-TA(2) and DANE-EE(3) only; PKIX usages 0/1 and any
        unknown parameter make a record unusable (never an error)."""
        if self.usage not in (Usage.DANE_TA, Usage.DANE_EE):
            return False
        if self.selector not in (Selector.CERT, Selector.SPKI):
            return False
        if self.mtype == Matching.FULL:
            return len(self.data) > 0
        expected = _DIGEST_LEN.get(Matching(self.mtype)) if self.mtype in (1, 2) else None
        # A digest of the wrong length can never match: unusable, like RFC 7671 5.2 says
        # for malformed records.
        return expected is not None and len(self.data) == expected

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"
