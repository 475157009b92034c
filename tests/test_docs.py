"""The README is a front door that stays true: short, its links resolve, its commands are the ones CI runs.

The README and the pages under docs/ link each other, bench/README.md and files of the repository; a link to
a file that was moved or renamed fails here. The README's first section holds the commands a newcomer types
first: each must be what ``.ci/run`` runs (so CI tests what the README says) or the main command, whose config
the quick-start test runs.
"""

from __future__ import annotations

import re
import sys
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


# --- every file, option and function the README and docs/ name exists ---------------------------------------
# (bench/README.md is left out: it is a log of measurements, and its history names the code as it was then)

DOC_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = ROOT / "grpo_lightning"
LAYERS = ("core", "hf", "fast", "engines", "train", "builtin")
FILE = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|yaml|md|jsonl))`")  # a path with a folder: `core/step.py`
FILE_NAME = re.compile(r"`((?:[\w-]+/)+[\w-]+\.py)`'s `(\w+)`")  # `fast/allocator.py`'s `heap_kept`
MODULE_NAME = re.compile(rf"`((?:grpo_lightning[./])?(?:{'|'.join(LAYERS)})(?:[./]\w+)+)`")  # `hf/passes.PolicyPasses`
CLASS_NAME = re.compile(r"`([A-Z]\w+)\.(\w+)`")  # `GRPOModule._update`
OPTION = re.compile(r"`((?:model|data)(?:\.\w+)+)`")  # `model.sampling.num_generations`, `data.source`


def defined_names(path: Path) -> dict[str, set[str]]:
    """A module's names: ``""`` → its top-level definitions, each class's name → its methods and attributes
    (those of its body and those its methods set on ``self``)."""
    import ast

    tree = ast.parse(path.read_text())
    names: dict[str, set[str]] = {"": set()}

    def assigned(node: ast.stmt) -> list[str]:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        return [t.id for t in targets if isinstance(t, ast.Name)]

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[""].add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names[""].update(assigned(node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names[""].update((a.asname or a.name).split(".")[0] for a in node.names)
        if isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            names[node.name] |= {t for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign)) for t in assigned(n)}
            names[node.name] |= {  # and the attributes its methods set: self.NAME = ...
                n.attr for n in ast.walk(node)
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) and n.value.id == "self"
            }
    return names


def package_file(name: str) -> Path | None:
    """The file a doc means by ``name`` (``core/step.py``, ``grpo_lightning/hf/passes.py``, ``tests/...``)."""
    for base in (ROOT, PACKAGE):
        if (base / name).exists():
            return base / name
    return None


def classes() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for name, members in defined_names(path).items():
            if name:
                found.setdefault(name, set()).update(members)
    return found


def doc_texts() -> list[tuple[str, str]]:
    return [(str(page.relative_to(ROOT)), page.read_text()) for page in DOC_PAGES]


def test_every_named_file_exists():
    missing = [(page, name) for page, text in doc_texts() for name in FILE.findall(text) if package_file(name) is None]
    assert not missing, f"files the docs name that do not exist: {missing}"


def test_every_named_function_and_class_exists():
    members, missing = classes(), []
    for page, text in doc_texts():
        for file, name in FILE_NAME.findall(text):
            path = package_file(file)
            if path is not None and name not in set().union(*defined_names(path).values()):
                missing.append((page, f"{file}'s {name}"))
        for dotted in MODULE_NAME.findall(text):
            parts = dotted.removeprefix("grpo_lightning").strip("./").replace(".", "/").split("/")
            if parts[-1] in ("py", "md", "yaml", "jsonl"):  # a file's name: the check above
                continue
            for cut in range(len(parts), 0, -1):  # the longest prefix that is a module; the rest are names in it
                path = PACKAGE.joinpath(*parts[:cut]).with_suffix(".py")
                path = path if path.is_file() else PACKAGE.joinpath(*parts[:cut], "__init__.py")
                if cut == len(parts) and path.is_file():  # the module itself
                    break
                if path.is_file():
                    names = defined_names(path)
                    owner, *rest = parts[cut:]
                    if owner not in names[""] or (rest and rest[0] not in names.get(owner, set())):
                        missing.append((page, dotted))
                    break
            else:
                if not PACKAGE.joinpath(*parts).is_dir():
                    missing.append((page, dotted))
        for owner, name in CLASS_NAME.findall(text):
            if owner in members and name not in members[owner]:
                missing.append((page, f"{owner}.{name}"))
    assert not missing, f"functions and classes the docs name that do not exist: {missing}"


def option_exists(key: str) -> bool:
    import dataclasses
    import inspect

    from grpo_lightning.hf.lora import LoRA
    from grpo_lightning.hf.sharding import Sharding
    from grpo_lightning.train.data import PromptDataModule
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import GROUPS

    section, name, *rest = key.split(".")
    owner = GRPOModule if section == "model" else PromptDataModule
    if name not in inspect.signature(owner.__init__).parameters:
        return False
    groups = {**GROUPS, "lora": LoRA, "sharding": Sharding} if section == "model" else {}
    if not rest or name in ("optimizer", "lr_scheduler", "rollout"):  # class paths: their arguments are theirs
        return True
    return name in groups and rest[0] in {f.name for f in dataclasses.fields(groups[name])} and len(rest) == 1


def test_every_named_option_exists():
    missing = [(page, key) for page, text in doc_texts() for key in OPTION.findall(text) if not option_exists(key)]
    assert not missing, f"options the docs name that do not exist: {missing}"


def test_the_checks_see_a_missing_name(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("`core/nothing.py`, `core/loss.py`'s `no_such_loss`, `hf/passes.NoRoot`, `model.sampling.nope`, `data.nope`")
    monkeypatch.setattr(sys.modules[__name__], "DOC_PAGES", [page])
    monkeypatch.setattr(sys.modules[__name__], "doc_texts", lambda: [("page.md", page.read_text())])
    with pytest.raises(AssertionError, match=r"core/nothing.py"):
        test_every_named_file_exists()
    with pytest.raises(AssertionError, match=r"no_such_loss.*hf/passes.NoRoot"):
        test_every_named_function_and_class_exists()
    with pytest.raises(AssertionError, match=r"model.sampling.nope.*data.nope"):
        test_every_named_option_exists()


def test_the_one_step_outline_calls_what_its_files_define():
    """The README's "One GRPO step" is the update's code path: every function it calls is defined in a file it
    names (or is Python's, functools', Lightning's or the optimizer's own)."""
    import builtins

    block = FENCE.findall(README.read_text().split("## One GRPO step", 1)[1])[0][1]
    files = [package_file(name) for name in re.findall(r"((?:[\w]+/)+\w+\.py)", block)]
    assert files and None not in files, "the outline names a file that does not exist"
    defined = set().union(*(set().union(*defined_names(path).values()) for path in files))
    outside = {"partial", "manual_backward", "step", "zero_grad", "detach"}
    called = set(re.findall(r"(\w+)\(", block)) - set(dir(builtins)) - outside
    assert called and sorted(called - defined) == [], "the outline calls what none of its files defines"
    assert {"_rollout", "score_rollout", "prepare_batch", "reference_logprobs", "grpo_update", "loss"} <= called
