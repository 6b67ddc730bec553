"""smtpgate(1) (gateway/manpage.py): every command and option of the live parser is in it,
nothing argparse hides is, roff cannot be injected through a help text, and groff and man
render it without a warning."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import manpage
from gateway.cli import parser

ROOT = Path(__file__).resolve().parent.parent


def walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ("smtpgate",)
         ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) argparse would show in --help, found here without the
    renderer's own walk: a renderer that misses one cannot also hide it from this test."""
    found = [(path, p)]
    for action in p._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        hidden = {a.dest for a in action._choices_actions if a.help == argparse.SUPPRESS}
        seen: set[int] = set()
        for name, child in action.choices.items():
            if id(child) in seen or name in hidden:
                continue
            seen.add(id(child))
            found += walk(child, (*path, name))
    return found


def section(page: str, command: tuple[str, ...]) -> str:
    """The COMMANDS subsection of one command (the page up to COMMANDS for the top)."""
    if len(command) == 1:
        return page.split("\n.SH COMMANDS\n", maxsplit=1)[0]
    head = f'.SS "{manpage.escape(" ".join(command[1:]))}"\n'
    assert head in page, f"no subsection for {' '.join(command)}"
    return page.split(head, 1)[1].split("\n.SS ", 1)[0].split("\n.SH ", 1)[0]


def test_every_command_and_option_of_the_live_parser_is_in_the_page() -> None:
    """A command or option added to gateway/cli.py appears without anyone touching the
    renderer; a suppressed one (--worker-metrics) does not."""
    page = manpage.render(parser())
    commands = walk(parser())
    names = {c[-1] for c, _ in commands[1:]}
    assert {"run", "check", "keygen", "tlsa", "rollover", "firewall", "demo", "version"} <= names
    for command, p in commands:
        body = section(page, command)
        assert f'.SY "{manpage.escape(" ".join(command))}"' in page  # in the SYNOPSIS
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            for opt in action.option_strings:
                escaped = manpage.escape(opt)
                if action.help == argparse.SUPPRESS:
                    assert escaped not in page, f"suppressed {opt} is in the page"
                else:
                    assert f"\\fB{escaped}\\fR" in body, f"{' '.join(command)} {opt}"
            if not action.option_strings and action.help != argparse.SUPPRESS:
                metavar = action.metavar if isinstance(action.metavar, str) else action.dest
                assert f"\\fI{manpage.escape(metavar)}\\fR" in body
    assert "worker\\-metrics" not in page and "worker\\-index" not in page
    assert "\\fB\\-h\\fR, \\fB\\-\\-help\\fR" in section(page, ("smtpgate",))


def test_exit_status_and_files_come_from_the_parser() -> None:
    page = manpage.render(parser())
    exits = page.split("\n.SH EXIT STATUS\n")[1].split("\n.SH ")[0]
    # each description that names exit codes (check's 3, the key commands' 1) is there
    assert "\\fBsmtpgate check\\fR\nExit 0 when the plan allows" in exits
    assert "\\fBsmtpgate keygen\\fR\nExit 0 when done, 1 when refused" in exits
    assert "\\fBsmtpgate run \\-\\-check\\fR\n" in exits  # from the option's help
    files = page.split("\n.SH FILES\n")[1].split("\n.SH ")[0]
    assert "\\fI/etc/smtpgate/smtpgate.yaml\\fR" in files
    assert "smtpgate run" in files and "smtpgate firewall" in files


def test_a_new_command_and_option_appear_generically() -> None:
    """The renderer knows no command by name: a parser it has never seen, with nesting,
    aliases, a hidden command, a mutually exclusive group, choices and a Raw description."""
    top = argparse.ArgumentParser(prog="tool", description="A tool for things.")
    sub = top.add_subparsers(dest="cmd", metavar="COMMAND")
    a = sub.add_parser("alpha", aliases=["al"], help="the first",
                       description="Alpha does it. Exit 0 when done, 4 when not.")
    a.add_argument("--level", choices=("low", "high"), help="how much (default: %(default)s)",
                   default="low")
    group = a.add_mutually_exclusive_group()
    group.add_argument("--on", action="store_true", help="switch on")
    group.add_argument("--off", action="store_true", help="switch off")
    a.add_argument("--tag", action="append", metavar="T", help="a tag")
    a.add_argument("file", nargs="+", help="the files")
    sub.add_parser("secret", help=argparse.SUPPRESS).add_argument("--hidden", help="no")
    b = sub.add_parser("beta", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="keep\n  these lines\n\n.as they are")
    bsub = b.add_subparsers(dest="x")
    bsub.add_parser("gamma", help="nested").add_argument("--deep", help="nested option")
    page = manpage.render(top)
    assert '.SS "alpha"' in page and '.SS "beta gamma"' in page and "secret" not in page
    assert "hidden" not in page
    assert "Also: \\fBal\\fR." in page
    assert "[\\fB\\-\\-on\\fR\\ |\\ \\fB\\-\\-off\\fR]" in page
    assert "[\\fB\\-\\-level\\fR\\ {\\fBlow\\fR|\\fBhigh\\fR}]" in page
    assert "[\\fB\\-\\-tag\\fR\\ \\fIT\\fR]\\ ...\\&" in page
    assert "how much (default: low)" in page  # %(default)s expanded as --help does
    assert "\\fIfile [file ...]\\fR" in page
    assert "\\fBtool alpha\\fR\nExit 0 when done, 4 when not." in page
    assert ".nf\nkeep\n  these lines\n.fi\n.PP\n.nf\n\\&.as they are\n.fi" in page
    assert "\\fB\\-\\-deep\\fR" in page


@pytest.mark.parametrize(("text", "roff"), [
    ("--check", "\\-\\-check"),
    ("C:\\path", "C:\\epath"),
    ("it's `x` ~ ^", "it\\(aqs \\(gax\\(ga \\(ti \\(ha"),
    ("A → B ≠ C", "A \\[u2192] B \\[u2260] C"),
])
def test_escape(text: str, roff: str) -> None:
    assert manpage.escape(text) == roff


def test_no_help_text_starts_a_request() -> None:
    """A description or help beginning with '.' or "'" would be a roff request: \\& first."""
    top = argparse.ArgumentParser(prog="tool", description=".TH EVIL")
    sub = top.add_subparsers()
    c = sub.add_parser("c", help="x", description="'br now")
    c.add_argument("--x", help=".SH INJECTED")
    page = manpage.render(top)
    lines = page.splitlines()
    assert "\\&.TH EVIL" in lines
    assert "\\(aqbr now" in lines  # escaped: no longer a quote at the start
    assert "\\&.SH INJECTED" in lines
    assert not [line for line in lines if line.startswith((".TH EVIL", ".SH INJECTED", "'"))]


def test_the_date_is_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert '.TH "SMTPGATE" "1" "2023\\-11\\-14"' in manpage.render(parser())


def test_python_m_gateway_manpage_writes_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    cp = subprocess.run([sys.executable, "-m", "gateway.manpage"], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=60, check=False)
    assert (cp.returncode, cp.stderr) == (0, "")
    assert cp.stdout.startswith('.\\" smtpgate(1)')
    assert cp.stdout == manpage.render(parser())


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap-debian installs groff-base "
                    "and man-db)")
    return path


def test_groff_renders_it_without_a_warning(tmp_path: Path) -> None:
    page = tmp_path / "smtpgate.1"
    page.write_text(manpage.render(parser()))
    cp = subprocess.run([_tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(page)],
                        capture_output=True, text=True, timeout=60, check=False)
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, "", "")


def test_man_renders_it_without_a_warning_and_options_copy_as_ascii(tmp_path: Path) -> None:
    page = tmp_path / "smtpgate.1"
    page.write_text(manpage.render(parser()))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MANWIDTH": "80",
           "LANG": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    cp = subprocess.run([_tool("man"), "--warnings", "-E", "UTF-8", "-l", str(page)],
                        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert (cp.returncode, cp.stderr) == (0, "")
    text = re.sub(r".\x08", "", cp.stdout)  # overstrike bold, if the pager is bypassed
    assert "smtpgate - transparent encryption gateway for port-25 SMTP" in text
    assert "-c, --config CONFIG" in text  # ASCII hyphens: a copied option works
    assert "smtpgate firewall [-h] [-c CONFIG]" in text
    assert "/etc/smtpgate/smtpgate.yaml" in text
