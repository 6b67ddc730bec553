"""SMTP smuggling carriers for the inbound namespace tests: one message whose content holds
a would-be second transaction behind an end-of-data variant a lenient MTA may take for the
real end (tests/test_shield_netns.py against Postfix, tests/test_interop_exim_netns.py
against Exim); the LF-only carriers are the case Exim 4.96's fix leaves open.  A smuggled
message is one the MTA delivers with the envelope sender ``x@tripwire.example``."""

from __future__ import annotations

END = b"\r\n.\r\n"
TRIPWIRE = "x@tripwire.example"
VARIANTS = {
    "LF.LF": b"\n.\n", "CR.CR": b"\r.\r", "CRLF.CR": b"\r\n.\r", "CRLF.LF": b"\r\n.\n",
    "LF.CRLF": b"\n.\r\n", "CR.CRLF": b"\r.\r\n", "CRLF.CRCRLF": b"\r\n.\r\r\n",
}


def smuggling(variant: str, tag: str) -> bytes:
    """Content whose first 'end' is the variant, followed by a second transaction in the
    variant's own line ends, then the real end."""
    eol = {"LF": b"\n", "CR": b"\r"}.get(variant.split(".", maxsplit=1)[0], b"\r\n")
    # Its own end only in bare line ends: a CRLF "." CRLF there would end the carrier.
    own_end = [b"."] if eol != b"\r\n" else []
    second = eol.join([f"MAIL FROM:<{TRIPWIRE}>".encode(), b"RCPT TO:<carol@b.test>", b"DATA",
                       b"Subject: smuggled " + tag.encode(), b"", b"smuggled", *own_end]) + eol
    return (b"From: a@client.example\r\nSubject: carrier " + tag.encode() + b"\r\n\r\nbefore"
            + VARIANTS[variant] + second + b"after" + END)


def lf_only(tag: str, bdat: bool) -> bytes:
    """A carrier in bare LF throughout, its real end CRLF.CRLF.  Exim's fix for
    CVE-2023-51766 (4.97.1; Debian 4.96-15+deb12u4) still takes "LF . LF" as the end of
    data in LF-only mode, which a first header line ending in a bare LF turns on: this one.
    The smuggled transaction says DATA (which Exim's pipelining check refuses: its content
    follows without waiting for 354) or ``bdat``: BDAT, which may be pipelined."""
    second = b"Subject: smuggled " + tag.encode() + b"\r\n\r\nsmuggled\r\n"
    head = (b"From: a@client.example\nSubject: carrier " + tag.encode() + b"\n\nbefore\n.\n"
            + f"MAIL FROM:<{TRIPWIRE}>\nRCPT TO:<carol@b.test>\n".encode())
    if bdat:
        return head + b"BDAT %d LAST\n" % len(second) + second + b"after" + END
    return head + b"DATA\n" + second.replace(b"\r\n", b"\n") + b".\nafter" + END
