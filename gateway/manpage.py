"""``smtpgate(1)``: the manual page, rendered from the command line's own definition
(``gateway.cli.parser()``), so that a command or an option cannot be added without appearing
in it.  ``python -m gateway.manpage > smtpgate.1`` (scripts/build-deb does this).

Generic over the parser: every subcommand (nested ones too) and every option argparse would
show in ``--help``; whatever argparse hides (``help=argparse.SUPPRESS``) stays hidden.  The
EXIT STATUS section is what the descriptions and option helps themselves say about exit
codes.  Standard library only, and roff escaped so that no help text can inject a request.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from . import __version__
from .cli import DEFAULT_CONFIG, parser

# Roff special characters in text.  Hyphens become \- (copy-pastable option dashes); quotes
# and the other ASCII characters groff would typeset as typographic glyphs keep their
# ASCII form (\(aq, \(ga, ...), so that a command copied from the page runs.
_ESCAPES = {"\\": "\\e", "-": "\\-", "'": "\\(aq", "`": "\\(ga", "^": "\\(ha", "~": "\\(ti"}


def escape(text: str) -> str:
    """``text`` as roff text: special characters escaped, non-ASCII as ``\\[uXXXX]`` (groff
    reads its input as Latin-1 unless told otherwise).  Not safe at the start of a line
    by itself: see ``_line``."""
    return "".join(_ESCAPES.get(c, c) if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _line(text: str, keep_indent: bool = False) -> str:
    """A text line: a leading ``.`` or ``'`` would make it a request (``\\&``, a zero-width
    character, defuses it); a leading space breaks a filled line (stripped unless the
    line is in a no-fill block, where it is the author's indentation)."""
    text = text.rstrip() if keep_indent else text.strip()
    return "\\&" + text if text[:1] in (".", "'") else text


def _request(name: str, *args: str) -> str:
    quoted = ['"' + escape(a).replace('"', '\\(dq') + '"' for a in args]
    return " ".join([f".{name}", *quoted])


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class Command:
    """One (sub)command: ``path`` is what is typed (``("smtpgate", "firewall")``)."""

    path: tuple[str, ...]
    parser: argparse.ArgumentParser
    aliases: tuple[str, ...] = ()
    summary: str | None = None  # the one line of the parent's command list

    @property
    def name(self) -> str:
        return " ".join(self.path)


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction[
        argparse.ArgumentParser] | None:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(p: argparse.ArgumentParser, path: tuple[str, ...] = (),
             aliases: tuple[str, ...] = (), summary: str | None = None) -> Iterator[Command]:
    """``p`` and every subcommand below it, depth first, in the order they were added.  A
    subcommand added with ``help=argparse.SUPPRESS`` is hidden, as in ``--help``."""
    path = path or (p.prog,)
    yield Command(path, p, aliases, summary)
    sub = _subparsers(p)
    if sub is None:
        return
    helps = {a.dest: a.help for a in sub._choices_actions}
    names: dict[int, list[str]] = {}  # a parser's names: its own first, then its aliases
    children: list[argparse.ArgumentParser] = []
    for name, child in sub.choices.items():
        if id(child) not in names:
            children.append(child)
        names.setdefault(id(child), []).append(name)
    for child in children:
        own, *others = names[id(child)]
        if helps.get(own) != argparse.SUPPRESS:
            yield from commands(child, (*path, own), tuple(others), helps.get(own))


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """What ``--help`` would list: no suppressed argument, no subcommand selector."""
    return [a for a in p._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._SubParsersAction)]


def _arg(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The argument an option takes (``\\fIPATH\\fR``, ``{\\fBnft\\fR|...}``), or ""."""
    if action.nargs == 0:
        return ""
    if action.choices is not None and action.metavar is None and action.nargs is None:
        return "{" + "|".join(bold(str(c)) for c in action.choices) + "}"
    fmt = p._get_formatter()
    default = (fmt._get_default_metavar_for_optional(action) if action.option_strings
               else fmt._get_default_metavar_for_positional(action))
    return italic(fmt._format_args(action, default))


def _usage_item(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    arg = _arg(p, action)
    if not action.option_strings:
        return arg
    item = bold(action.option_strings[0]) + ("\\ " + arg if arg else "")
    return item


def _repeatable(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction | argparse._CountAction
                      | argparse._ExtendAction)


def synopsis(p: argparse.ArgumentParser) -> list[str]:
    """The usage of one command as text lines: ``[option ARG]``, required ones bare,
    mutually exclusive ones as ``[a | b]``, repeatable ones followed by ``...``."""
    grouped: dict[int, argparse._MutuallyExclusiveGroup] = {}
    for group in p._mutually_exclusive_groups:
        for a in group._group_actions:
            grouped[id(a)] = group
    items: list[str] = []
    done: set[int] = set()
    shown = options(p)
    # as argparse's usage: options first, then the positional arguments
    for action in sorted(shown, key=lambda a: not a.option_strings):
        exclusive = grouped.get(id(action))
        if exclusive is not None:
            if id(exclusive) in done:
                continue
            done.add(id(exclusive))
            members = [a for a in exclusive._group_actions if a in shown]
            inner = "\\ |\\ ".join(_usage_item(p, a) for a in members)
            items.append(f"({inner})" if exclusive.required else f"[{inner}]")
            continue
        item = _usage_item(p, action)
        if action.option_strings and not action.required:
            item = f"[{item}]"
        # "\\&" after "...": not the end of a sentence (groff would add a space)
        items.append(item + ("\\ ...\\&" if _repeatable(action) else ""))
    sub = _subparsers(p)
    if sub is not None:
        metavar = sub.metavar if isinstance(sub.metavar, str) else "COMMAND"
        items.append(italic(metavar) + "\\ ...\\&")
    return items


def _paragraphs(p: argparse.ArgumentParser, text: str | None) -> list[str]:
    """A description as roff: argparse's default formatter joins the lines of a paragraph
    (so does this); under a Raw formatter the author's line breaks are kept."""
    if not text:
        return []
    raw = isinstance(p.formatter_class, type) and issubclass(
        p.formatter_class, argparse.RawDescriptionHelpFormatter)
    if not raw:
        return [_line(escape(_collapse(text)))]
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text.strip("\n")):
        if out:
            out.append(".PP")
        out.append(".nf")
        out.extend(_line(escape(line), keep_indent=True) if line.strip() else "\\&"
                   for line in para.splitlines())
        out.append(".fi")
    return out


def _help(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An option's help with argparse's %(default)s-style fields filled in."""
    if not action.help:
        return ""
    return _collapse(p._get_formatter()._expand_help(action))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", _collapse(text)) if s]


_EXIT = re.compile(r"\bexit(?: status| code)?:?\s+\d", re.IGNORECASE)


def exit_statuses(cmds: list[Command]) -> list[tuple[str, str]]:
    """(where, what): each sentence of a description, and each option help, that names
    exit codes."""
    found: list[tuple[str, str]] = []
    for c in cmds:
        said = [s for s in _sentences(c.parser.description or "") if _EXIT.search(s)]
        if said:
            found.append((c.name, " ".join(said)))
        for action in options(c.parser):
            helped = _help(c.parser, action)
            if action.option_strings and _EXIT.search(helped):
                found.append((f"{c.name} {action.option_strings[-1]}", helped))
    return found


def _date() -> str:
    """SOURCE_DATE_EPOCH (reproducible builds) when set, else today (UTC)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%d")


def _name_line(top: argparse.ArgumentParser) -> str:
    summary = _collapse(top.description or "").rstrip(".")
    if summary[1:2].islower():
        summary = summary[0].lower() + summary[1:]
    return _line(f"{escape(top.prog)} \\- {escape(summary)}")


def _option_item(p: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    arg = _arg(p, action)
    if action.option_strings:
        head = ", ".join(bold(o) for o in action.option_strings) + (" " + arg if arg else "")
    else:
        head = arg
    lines = [".TP", _line(head)]
    text = _help(p, action)
    lines.append(_line(escape(text)) if text else "\\&")
    return lines


def render(top: argparse.ArgumentParser) -> str:
    """The whole page for ``top`` (``gateway.cli.parser()``), as roff (man macros)."""
    cmds = list(commands(top))
    subs = cmds[1:]
    out = [f'.\\" {escape(top.prog)}(1): generated by gateway/manpage.py from '
           "gateway.cli.parser(); do not edit",
           _request("TH", top.prog.upper(), "1", _date(), f"{top.prog} {__version__}",
                    "User Commands"),
           # No hyphenation, ragged right: paths and options stay whole and copyable (the
           # synopsis macros restore hyphenation from the HY register: 0 keeps it off).
           ".nr HY 0", ".nh", ".ad l",
           ".SH NAME", _name_line(top),
           ".SH SYNOPSIS"]
    for c in cmds:
        out.append(".SY " + '"' + escape(c.name).replace('"', "\\(dq") + '"')
        out.extend(_line(item) for item in synopsis(c.parser))
        out.append(".YS")

    out.append(".SH DESCRIPTION")
    out += _paragraphs(top, top.description)
    if top.epilog:
        out += [".PP", *_paragraphs(top, top.epilog)]
    if subs:
        out += [".PP", _line(f"Each command has its own options: {bold(top.prog)} "
                             f"{italic('COMMAND')} {bold('-h')} prints them.")]

    out.append(".SH OPTIONS")
    for action in options(top):
        out += _option_item(top, action)

    if subs:
        out.append(".SH COMMANDS")
        for c in subs:
            out.append(_request("SS", " ".join(c.path[1:])))
            if c.aliases:
                out += [_line("Also: " + ", ".join(bold(a) for a in c.aliases) + "."), ".PP"]
            described = c.parser.description or c.summary
            if described:
                out += _paragraphs(c.parser, described)
            for action in options(c.parser):
                if isinstance(action, argparse._HelpAction):
                    continue  # -h is the same everywhere: once, under OPTIONS
                out += _option_item(c.parser, action)
            if c.parser.epilog:
                out += [".PP", *_paragraphs(c.parser, c.parser.epilog)]

    out.append(".SH EXIT STATUS")
    for where, what in exit_statuses(cmds):
        out += [".TP", _line(bold(where)), _line(escape(what))]
    out += [".PP", _line("A command line that cannot be parsed (an unknown command or "
                         "option, a missing or malformed argument) exits 2 with a usage "
                         "message.")]

    users = [c.name for c in subs if any(a.default == DEFAULT_CONFIG
                                         for a in options(c.parser))]
    out += [".SH FILES", ".TP", _line(italic(DEFAULT_CONFIG)),
            _line(escape("The configuration file"
                         + (f" ({', '.join(users)}) unless -c names another" if users else "")
                         + ". Annotated examples: outbound.yaml and inbound.yaml beside it "
                           "(Debian package), deploy/ in the source."))]

    out += [".SH SEE ALSO",
            _line(", ".join(f"\\fB{escape(page)}\\fR({section})" for page, section in
                            (("nft", 8), ("iptables", 8), ("systemctl", 1),
                             ("systemd.exec", 5)))),
            ".PP",
            _line(escape("The documentation: README.md and docs/ in the source (configuration.md "
                         "for every key, operations.md, deployment.md, metrics.md); the "
                         "Debian package installs them in /usr/share/doc/smtpgate."))]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render(parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
