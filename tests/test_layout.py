"""The package's layers: imports point one way, from the Lightning glue down to the algorithm.

core (the algorithm, plain PyTorch) ← hf (Hugging Face plumbing) ← fast, engines ← train (Lightning). The
built-ins (answer format, GSM8K rewards, the arithmetic task, the tiny model) import only the algorithm; the
warm-up's command is Lightning glue (train/warmup.py). hf, fast and engines run passes over a model and are
handed the loss: they import no part of the algorithm's step. Every import counts, those inside functions too.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grpo_lightning"

# layer → the layers its modules may import from
ALLOWED = {
    "core": {"core"},
    "builtin": {"core", "builtin"},
    "hf": {"core", "builtin", "hf"},  # builtin: where the packaged tiny model lies
    "fast": {"core", "hf", "fast"},
    "engines": {"core", "hf", "fast", "engines"},
    "train": {"core", "builtin", "hf", "fast", "engines", "train"},
}
# third-party packages a layer must not need: the algorithm is plain PyTorch, the plumbing knows no Lightning
FORBIDDEN = {"core": {"lightning", "transformers", "peft"}, "hf": {"lightning"}, "fast": {"lightning"}}
# modules of an allowed layer that a layer must not import all the same: the plumbing, the speed pieces and
# the engines run passes over a model and are handed the loss; the update (train/update.py) runs the algorithm
ALGORITHM = {"grpo_lightning.core.loss", "grpo_lightning.core.step"}
FORBIDDEN_MODULES = {"hf": ALGORITHM, "fast": ALGORITHM, "engines": ALGORITHM}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the file, relative ones resolved."""
    name, found = module_name(path), []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "grpo_lightning" and parts[1] in ALLOWED else None


def wrong_way(path: Path) -> list[str]:
    name = module_name(path)
    layer = layer_of(name)
    problems = []
    for line, target in imports(path):
        top = target.split(".")[0]
        if layer in FORBIDDEN and top in FORBIDDEN[layer]:
            problems.append(f"{name}:{line} imports {target} (the {layer} layer needs none of {sorted(FORBIDDEN[layer])})")
        if top != "grpo_lightning" or target == "grpo_lightning":
            continue
        to = layer_of(target)
        if target in FORBIDDEN_MODULES.get(layer, ()):
            problems.append(f"{name}:{line} imports {target}: the {layer} layer is handed the loss, it runs none")
        elif to is None:
            problems.append(f"{name}:{line} imports {target}, which is in no layer")
        elif to not in ALLOWED[layer]:
            problems.append(f"{name}:{line} imports {target}: {layer} must not import {to}")
    return problems


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_is_in_a_layer():
    assert len(FILES) > 30  # the parametrised test below must not pass on an empty list
    assert [module_name(p) for p in FILES if layer_of(module_name(p)) is None] == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_point_one_way(path):
    assert wrong_way(path) == []


def test_the_check_sees_a_wrong_way_import(tmp_path, monkeypatch):
    core = tmp_path / "grpo_lightning" / "core"
    core.mkdir(parents=True)
    bad = core / "bad.py"
    bad.write_text("def f():\n    from grpo_lightning.train.module import GRPOModule\n    import lightning\n")
    hf = tmp_path / "grpo_lightning" / "hf"
    hf.mkdir()
    runs_the_loss = hf / "runs.py"
    runs_the_loss.write_text("from grpo_lightning.core.logprobs import token_logprobs\nfrom grpo_lightning.core.loss import grpo_loss\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "grpo_lightning")
    assert wrong_way(bad) == [
        "grpo_lightning.core.bad:2 imports grpo_lightning.train.module: core must not import train",
        "grpo_lightning.core.bad:3 imports lightning (the core layer needs none of ['lightning', 'peft', 'transformers'])",
    ]
    assert wrong_way(runs_the_loss) == [
        "grpo_lightning.hf.runs:2 imports grpo_lightning.core.loss: the hf layer is handed the loss, it runs none"
    ]


def test_each_data_file_has_its_test_file():
    """train/data/ has one file per kind of source (and the registry, the data module); each its own tests."""
    from grpo_lightning.train.data import KINDS

    data = PACKAGE / "train" / "data"
    stems = sorted(p.stem for p in data.glob("*.py") if p.name != "__init__.py")
    assert set(KINDS) <= set(stems)  # every kind of source is a file of its own
    tests = Path(__file__).resolve().parent
    assert [s for s in stems if not (tests / f"test_data_{s}.py").is_file()] == []
