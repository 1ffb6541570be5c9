"""Write the flag lists of docs/cli.md from the click commands themselves.

docs/cli.md is hand-written prose with two generated parts, each between a pair of markers: the
synopsis (``<!-- generated: synopsis -->``) and every command's flags with their values and help
(``<!-- generated: flags -->``), both read from ``peftkit.cli`` (whose options and help text are
listed in ``peftkit.cli_spec``, the options built from ``peftkit.settings``), so they cannot drift
from what the commands take. ``tests/test_settings.py``
fails when the page differs from what this script writes.

    python scripts/cli_docs.py           # rewrite the generated parts of docs/cli.md
    python scripts/cli_docs.py --check   # exit 1 if docs/cli.md is out of date
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import click

from peftkit.cli import cli

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "cli.md"
REGION = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.DOTALL)
WIDTH = 110


def _value(param: click.Parameter) -> str:
    """What a flag takes: its metavar, its choices, N for an integer, X for a number."""
    if isinstance(param, click.Option) and param.is_flag:
        return ""
    if isinstance(param.type, click.Choice):
        return "|".join(str(c) for c in param.type.choices)
    if param.metavar:
        return param.metavar
    return {click.INT: "N", click.FLOAT: "X"}.get(param.type, "FILE" if isinstance(param.type, click.Path) else "TEXT")


def _usage(param: click.Parameter) -> str:
    """One parameter as the synopsis shows it: ``[--epochs N]``, ``--adapter TEXT``, ``[TEXTS]...``."""
    if isinstance(param, click.Argument):
        name = param.name.upper() if param.name else "ARG"
        return f"[{name}]..." if param.nargs == -1 else name
    text = " ".join(part for part in (param.opts[0], _value(param)) if part)
    text += " ..." if param.multiple else ""
    return text if param.required else f"[{text}]"


def _commands() -> list[tuple[str, click.Command]]:
    """The commands in the order ``peftkit --help`` introduces them."""
    return list(cli.commands.items())


def _wrap(head: str, parts: list[str]) -> list[str]:
    """``parts`` after ``head``, wrapped at WIDTH between parts (never inside ``[--flag VALUE]``)."""
    lines, line = [], head.rstrip()
    for part in parts:
        if len(line) + 1 + len(part) > WIDTH and line.strip():
            lines.append(line)
            line = " " * len(head) + part
        else:
            line += " " + part
    return lines + [line]


def synopsis() -> str:
    """Every command's usage, wrapped, in a code block."""
    lines = ["```"]
    for name, command in _commands():
        head = f"peftkit {name} "
        lines += _wrap(head, [_usage(p) for p in command.params if p.name != "help"])
    lines += ["peftkit --debug COMMAND ...", "```"]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flags() -> str:
    """A table per command: every flag, what it takes, its help (and its default where shown)."""
    out: list[str] = []
    for name, command in _commands():
        summary = (command.help or "").split("\n\n")[0].replace("\n", " ").strip()
        out += [f"### `peftkit {name}`", "", summary, "", "| flag | value | what it does |", "|---|---|---|"]
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            help_text = param.help or ""
            if param.show_default and param.default is not None:
                help_text += f" Default: {param.default}."
            if param.required:
                help_text += " Required."
            value = _value(param)
            out.append(
                f"| {', '.join(f'`{o}`' for o in param.opts)} | {f'`{_cell(value)}`' if value else ''} | "
                f"{_cell(help_text)} |"
            )
        out.append("")
    return "\n".join(out)


GENERATORS = {"synopsis": synopsis, "flags": flags}


def render(page: str) -> str:
    """``page`` with each generated region written afresh."""
    regions = REGION.findall(page)
    if {r[1] for r in regions} != set(GENERATORS):
        raise SystemExit(f"docs/cli.md must hold one region of each of: {', '.join(GENERATORS)}")
    return REGION.sub(lambda m: m.group(1) + GENERATORS[m.group(2)]() + m.group(4), page)


def main() -> int:
    """Rewrite docs/cli.md (or, with --check, say whether it is up to date)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date; write nothing")
    args = parser.parse_args()
    current = PAGE.read_text(encoding="utf-8")
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("docs/cli.md is out of date: run python scripts/cli_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
