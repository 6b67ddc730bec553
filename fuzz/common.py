"""Shared by the fuzz harnesses (fuzz/fuzz_*.py): coverage instrumentation of the gateway
modules under test, the libFuzzer entry point with seeds, and the shell's part for the SMTP
machines.

A harness "crashes" on any exception other than the documented ones, and on a broken
invariant (an ``assert``); libFuzzer then writes the input to ``crash-<sha1>``.  Run one by
hand: ``.venv/bin/python fuzz/fuzz_replies.py -runs=10000 -timeout=10 /tmp/corpus``; all of
them: ``fuzz/run``.
"""

from __future__ import annotations

import pkgutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # ships no type information

# The modules under test are instrumented, so coverage guides the fuzzer through their code
# (not the libraries they call, nor the rest of the gateway: instrumenting costs startup).
TARGETS = {"gateway.smtp", "gateway.commands", "gateway.upgrade", "gateway.offload",
           "gateway.envelope", "gateway.dane", "gateway.proxyproto"}
_OTHERS = {f"gateway.{m.name}" for m in pkgutil.iter_modules(
    [str(Path(__file__).resolve().parent.parent / "gateway")])} - TARGETS
with atheris.instrument_imports(include=["gateway"], exclude=sorted(_OTHERS)):
    # The shell's part for the machines, as the property tests play it.
    from gatelab.machines import (
        PLANS,
        TLS_OK,
        TLS_OUTCOMES,
        Cutter,
        Played,
        a4_normalized,
        cut,
        held_never_sent_without_tls,
        limits,
        offload_run,
        same_offload,
        upgrade_run,
        whole,
    )

    # the harnesses' targets
    from gateway import commands, dane, envelope, offload, proxyproto, smtp, upgrade

TestOneInput = Callable[[bytes], None]
__all__ = ["PLANS", "TLS_OK", "TLS_OUTCOMES", "Cutter", "Played", "TestOneInput",
           "a4_normalized", "commands", "cut", "dane", "envelope", "held_never_sent_without_tls",
           "limits", "main", "offload", "offload_run", "proxyproto", "same_offload", "smtp",
           "upgrade", "upgrade_run", "whole"]


def main(test_one_input: TestOneInput, seeds: Callable[[], Sequence[bytes]]) -> None:
    """libFuzzer's command line (``-runs=N -timeout=S ... [corpus dir]``); the first corpus
    directory given is filled with the harness' seeds first.  Given files instead (a crash
    input), libFuzzer runs just them."""
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if corpus and not Path(corpus[0]).is_file():
        directory = Path(corpus[0])
        directory.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (directory / f"seed-{i:03d}").write_bytes(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


