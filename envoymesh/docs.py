"""``python -m envoymesh.docs``: the flag and environment tables in ``docs/``, from ``--help``.

Each table is rendered from the argparse parser the command itself uses (for sds and usersvc,
``envoymesh.cli.build_parser`` over their settings models), so a table cannot say what
``--help`` does not. A table lives between ``<!-- settings:NAME:start -->`` and
``<!-- settings:NAME:end -->`` in any page of ``docs/``; ``--check`` exits 1 when a page is
not what this command would write.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from envoymesh import cli
from meshctl.__main__ import build_parser as meshctl_parser
from sds.bootstrap import build_parser as bootstrap_parser
from sds.config import Settings as SdsSettings
from usersvc.config import Settings as UsersvcSettings

DOCS = Path(__file__).resolve().parent.parent / "docs"
_MARKERS = re.compile(
    r"(<!-- settings:(?P<name>[a-z-]+):start -->\n).*?(<!-- settings:(?P=name):end -->)", re.S
)
# build_parser appends "[env NAME, default VALUE]" to each field's description.
_ENV_SUFFIX = re.compile(r"\s*\[env (?P<env>[A-Z0-9_]+)(?:, default (?P<default>.*?))?\]")


def _sds() -> argparse.ArgumentParser:
    return cli.build_parser(SdsSettings, "sds", "")


def _usersvc() -> argparse.ArgumentParser:
    return cli.build_parser(UsersvcSettings, "usersvc", "")


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, as ``meshctl NAME --help`` uses it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def _meshctl_up() -> argparse.ArgumentParser:
    return _subcommand(meshctl_parser(), "up")


# Table name -> the parser whose --help it shows.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "sds": _sds,
    "usersvc": _usersvc,
    "meshctl-up": _meshctl_up,
    "sds-bootstrap": bootstrap_parser,
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def table(parser: argparse.ArgumentParser) -> str:
    """A Markdown table of every flag of ``parser``: flag, environment, default, meaning."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        help_text = action.help or ""
        env = default = ""
        match = _ENV_SUFFIX.search(help_text)
        if match:
            env = f"`{match['env']}`"
            default = f"`{match['default']}`" if match["default"] else ""
            help_text = _ENV_SUFFIX.sub("", help_text)
        lines.append(f"| {flags} | {env} | {default} | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` with every marked table replaced by the one its parser gives today."""

    def replace(match: re.Match[str]) -> str:
        return match[1] + table(PARSERS[match["name"]]()) + match[3]

    return _MARKERS.sub(replace, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the tables in ``docs/*.md``, or with ``--check`` report the stale pages."""
    parser = argparse.ArgumentParser(prog="python -m envoymesh.docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    for page in stale:
        print(f"{'stale' if args.check else 'updated'}: {page.relative_to(DOCS.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
