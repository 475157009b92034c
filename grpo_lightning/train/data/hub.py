"""The Hugging Face hub: a dataset id (``openai/gsm8k``), the kind every source no other kind claims falls to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def matches(source: str) -> bool:
    return True  # last in the registry: any name the other kinds do not claim is a hub id


def rows(source: str, split: str, config_name: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of the split, ``where`` naming source, split and row for error messages."""
    import datasets

    try:
        table = datasets.load_dataset(source, config_name, split=split)
    except Exception as e:  # offline, unknown id, unknown split: one message that names the source
        raise ValueError(f"could not load dataset '{source}' ({config_name}, {split}) from the hub: {e}") from e
    return ((f"{source} {split} row {n}", r) for n, r in enumerate(table, start=1))
