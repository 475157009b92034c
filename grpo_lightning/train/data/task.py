"""Generated tasks, by name: ``task:arithmetic`` and ``task:arithmetic-distilled`` (:mod:`grpo_lightning.builtin.arithmetic`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

PREFIX = "task:"


def matches(source: str) -> bool:
    return source.startswith(PREFIX)


def rows(source: str, split: str, config_name: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for each problem of the split, ``where`` naming task, split and index."""
    from grpo_lightning.builtin.arithmetic import load_task

    return ((f"{source} {split} #{n}", r) for n, r in enumerate(load_task(source[len(PREFIX) :], split)))
