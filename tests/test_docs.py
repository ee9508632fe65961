"""The documentation: generated tables match ``--help``, links resolve, commands exist.

``docs/`` pages carry flag tables that ``python -m envoymesh.docs`` (``make docs``) writes
from the parsers the commands use; these tests regenerate them and compare, read the real
``--help`` of each command, follow every relative link in README.md and ``docs/`` (anchors
included, computed as GitHub computes them), and check that the README's quick start names
only make targets and ``meshctl`` subcommands that exist.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from envoymesh import docs
from meshctl.__main__ import build_parser as meshctl_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, ROOT / "CHANGELOG.md", *PAGES]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(path: Path) -> str:
    """A Markdown file without its fenced code blocks, where no link is a link."""
    return FENCE.sub("", path.read_text())


def github_anchors(path: Path) -> set[str]:
    """The ``#anchors`` GitHub gives the headings of ``path``."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(path), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(path: Path) -> list[str]:
    """Every link target in ``path`` that is not a URL."""
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z]+:", t)]


def resolves(page: Path, target: str) -> bool:
    """Whether a link in ``page`` reaches a file, and a heading of it when it names one."""
    file, _, anchor = target.partition("#")
    resolved = (page.parent / file).resolve() if file else page
    if not resolved.exists():
        return False
    return not anchor or resolved.suffix != ".md" or anchor in github_anchors(resolved)


def quick_start() -> str:
    """The README's shell blocks: the commands a newcomer copies."""
    return "\n".join(re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.S | re.M))


def help_flags(command: list[str]) -> set[str]:
    """The ``--flags`` a command's real ``--help`` prints."""
    # A wide terminal keeps each option on the line argparse starts it on.
    env = {**os.environ, "COLUMNS": "10000"}
    out = subprocess.run(
        [sys.executable, *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
    ).stdout
    flags: set[str] = set()
    for line in out.splitlines():
        if line.lstrip().startswith("--"):
            # The option's names come before the first wide gap; its help after.
            names = re.split(r"\s{2,}", line.strip())[0]
            flags |= set(re.findall(r"--[a-z][a-z0-9-]*", names))
    return flags - {"--help"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_generated_tables_are_what_make_docs_writes(page: Path) -> None:
    text = page.read_text()
    assert docs.render(text) == text, f"run `make docs`: {page.name} is stale"


@pytest.mark.parametrize(
    ("command", "page"),
    [
        (["-m", "sds"], "sds.md"),
        (["-m", "usersvc"], "usersvc.md"),
        (["-m", "meshctl", "up"], "deploy.md"),
        (["-m", "sds", "bootstrap"], "proxyless-grpc.md"),
    ],
)
def test_every_flag_of_help_is_in_its_docs_table(command: list[str], page: str) -> None:
    tables = re.findall(
        r"<!-- settings:[a-z-]+:start -->(.*?)<!-- settings:",
        (ROOT / "docs" / page).read_text(),
        re.S,
    )
    documented = set(re.findall(r"`(--[a-z][a-z0-9-]*)`", "".join(tables)))
    assert help_flags(command) == documented


def test_the_settings_markers_name_known_tables() -> None:
    names = {
        m
        for page in PAGES
        for m in re.findall(r"<!-- settings:([a-z-]+):start -->", page.read_text())
    }
    assert names == set(docs.PARSERS)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    assert [target for target in relative_links(path) if not resolves(path, target)] == []


def test_readme_is_at_most_150_lines() -> None:
    assert len(README.read_text().splitlines()) <= 150


def test_readme_links_every_docs_page() -> None:
    linked = {Path(t.partition("#")[0]).name for t in relative_links(README)}
    assert {page.name for page in PAGES} <= linked


def test_quick_start_make_targets_exist() -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", quick_start()))
    assert {"demo", "test"} <= named
    assert named <= targets


def test_quick_start_meshctl_subcommands_exist() -> None:
    commands = next(
        a.choices for a in meshctl_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    named = set(re.findall(r"\bmeshctl ([a-z][\w-]*)", quick_start()))
    assert named <= set(commands)


def test_module_map_names_every_module() -> None:
    packages = ["sds", "usersvc", "meshctl", "envoymesh"]
    modules = {
        str(p.relative_to(ROOT))
        for package in packages
        for p in (ROOT / package).rglob("*.py")
        if p.name != "__init__.py" and "_pb2" not in p.name
    }
    mapped = set(re.findall(r"\[`([\w/]+\.py)`\]", (ROOT / "docs" / "architecture.md").read_text()))
    assert modules - mapped == set()
