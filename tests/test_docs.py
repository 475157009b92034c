"""The README is a front door that stays true: short, its links resolve, its commands are the ones CI runs.

The README and the pages under docs/ link each other, bench/README.md and files of the repository; a link to
a file that was moved or renamed fails here. The README's first section holds the commands a newcomer types
first: each must be what ``.ci/run`` runs (so CI tests what the README says) or the main command, whose config
the quick-start test runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
MAIN_COMMAND = "grpo-lightning fit --config configs/quickstart.yaml"
MAX_README_LINES = 300

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
CONFIG = re.compile(r"configs/[\w.\-]+\.yaml")


def first_section(text: str) -> str:
    """From the first ``## `` heading up to the next one (``###`` subsections belong to it)."""
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    assert len(parts) > 2, "the README has no second section"
    return parts[1]


def shell_commands(section: str) -> list[str]:
    """Each command of the section's bash blocks: comments dropped, ``&&`` chains split into their commands."""
    commands = []
    for lang, body in FENCE.findall(section):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def ci_commands() -> set[str]:
    # --quiet changes only what pip prints, so CI's `pip install --quiet X` runs the README's `pip install X`.
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return {" ".join(line.replace(" --quiet", "").split()) for line in lines if line.strip()}


def test_readme_is_at_most_300_lines():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; longer topics belong in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file(page):
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):  # https:, mailto:, an anchor on this page
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_the_first_sections_commands_are_what_ci_runs():
    commands = shell_commands(first_section(README.read_text()))
    assert MAIN_COMMAND in commands and "python -m pytest" in commands, commands
    ci = ci_commands()
    strays = [c for c in commands if c != MAIN_COMMAND and " ".join(c.split()) not in ci]
    assert not strays, f"README commands that .ci/run does not run: {strays}"


def test_every_named_config_exists():
    named = {name for page in PAGES for name in CONFIG.findall(page.read_text())}
    assert MAIN_COMMAND.split()[-1] in named
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert not missing, f"configs named in the README or docs/ that do not exist: {missing}"


def tree_paths(text: str) -> set[str]:
    """The paths the README's tree names: each line's first word, under the folders its indentation opens."""
    block = FENCE.findall(text.split("## The tree", 1)[1])[0][1]
    folders: list[tuple[int, str]] = []  # (indent, name/) of the open folders
    paths = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        folders = [(i, f) for i, f in folders if i < indent]
        path = "".join(f for _, f in folders) + name
        if name.endswith("/"):
            folders.append((indent, name))
        paths.add(path)
    return paths


def test_the_tree_has_one_line_per_package_file():
    package = ROOT / "grpo_lightning"
    files = {str(p.relative_to(ROOT)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    named = {p for p in tree_paths(README.read_text()) if p.endswith(".py")}
    assert len(files) > 30  # the package was found
    assert sorted(files - named) == [], "package files missing from the README's tree"
    assert sorted(p for p in named if not (ROOT / p).is_file()) == [], "the README's tree names files that do not exist"
