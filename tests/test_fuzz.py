"""CI's reduced fuzz run: every atheris harness in fuzz/ runs CI_ITERATIONS inputs (fixed
seed, so the run repeats) with no crash and no hang.  The long run is ``fuzz/run`` (200,000
inputs per target); see fuzz/run's docstring.

The runner is checked too: harnesses that crash, hang or do nothing must be reported so, or
a green line here would prove nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "fuzz" / "run"
CI_ITERATIONS = 3000
LINE = re.compile(r"^(fuzz_\w+)\s+iterations=(\d+) crashes=(\d+) hangs=(\d+) time=[\d.]+s",
                  re.MULTILINE)
HARNESSES = {"fuzz_replies", "fuzz_commands", "fuzz_machines", "fuzz_ehlo", "fuzz_proxy",
             "fuzz_tlsa"}

pytestmark = pytest.mark.slow


def fuzz(*args: str, limit: float = 240) -> tuple[int, dict[str, tuple[int, int, int]], str]:
    """fuzz/run's exit status, its (iterations, crashes, hangs) per target, and its output."""
    proc = subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True,
                          timeout=limit, check=False)
    results = {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in LINE.finditer(proc.stdout)}
    return proc.returncode, results, proc.stdout + proc.stderr


def test_every_harness_runs_the_ci_count_without_crash_or_hang(tmp_path: Path) -> None:
    on_disk = {p.stem for p in (ROOT / "fuzz").glob("fuzz_*.py")}
    assert on_disk >= HARNESSES
    code, results, output = fuzz("--iterations", str(CI_ITERATIONS), "--keep", str(tmp_path))
    assert set(results) == on_disk, output
    for name, outcome in sorted(results.items()):
        assert outcome == (CI_ITERATIONS, 0, 0), f"{name}: {outcome}\n{output}"
    assert code == 0, output


CRASH = '''
import sys
import atheris

def one(data: bytes) -> None:
    if data:
        raise RuntimeError("an undocumented exception")

atheris.Setup(sys.argv, one)
atheris.Fuzz()
'''
HANG = CRASH.replace('raise RuntimeError("an undocumented exception")', "while True:\n"
                     "            pass")
FINE = CRASH.replace('raise RuntimeError("an undocumented exception")', "pass")


def test_runner_reports_crashes_hangs_and_short_runs(tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    targets.mkdir()
    for name, text in (("crash", CRASH), ("hang", HANG), ("fine", FINE)):
        (targets / f"fuzz_{name}.py").write_text(text)
    code, results, output = fuzz("--targets", str(targets), "--iterations", "500",
                                 "--timeout", "1", "--keep", str(tmp_path / "work"), limit=120)
    assert code == 1, output
    assert results["fuzz_fine"] == (500, 0, 0), output
    crash_runs, crashes, hangs = results["fuzz_crash"]
    assert (crashes, hangs) == (1, 0) and crash_runs < 500, output
    hang_runs, crashes, hangs = results["fuzz_hang"]
    assert (crashes, hangs) == (0, 1) and hang_runs < 500, output
    # The offending inputs are kept for a rerun.
    assert re.search(r"^fuzz_crash .* input=\S+crash-", output, re.MULTILINE), output
    assert re.search(r"^fuzz_hang .* input=\S+timeout-", output, re.MULTILINE), output
