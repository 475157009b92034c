"""Local files: a jsonl or parquet file, or a directory holding one file per split (``train.jsonl``, hub layout)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grpo_lightning.builtin import is_path

SUFFIXES = (".jsonl", ".json", ".parquet")


def matches(source: str) -> bool:
    """A path (``./``, ``/``, ``~``), a name with a data file's suffix, or anything that exists on disk."""
    return is_path(source) or source.endswith(SUFFIXES) or Path(source).exists()


def rows(source: str, split: str, config_name: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of the file, ``where`` naming file and line (or row) for error messages.

    ``config_name`` is the hub's; a local file has none.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {source} does not exist")
    file = split_file(path, split)
    return read_parquet(file) if file.suffix == ".parquet" else read_jsonl(file)


def split_file(path: Path, split: str) -> Path:
    """A file as given, or the ``split`` file of a directory (``train.jsonl``, ``test.parquet``, hub layout)."""
    if path.is_file():
        return path
    candidates = [path / f"{split}{s}" for s in SUFFIXES]
    candidates += sorted(path.glob(f"{split}-*.parquet")) + sorted(path.glob(f"*/{split}-*.parquet"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"data directory {path} has no '{split}' file (looked for {split}.jsonl / .parquet)")


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line parsed, where = ``path:line``; a line that is not JSON stops with its place."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None


def read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    for n, row in enumerate(table, start=1):
        yield f"{path}: row {n}", row
