"""Data packaged with the project, by name: ``builtin:gsm8k-sample`` (read as a local directory)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from grpo_lightning.builtin import BUILTIN_PREFIX
from grpo_lightning.train.data import local

BUILTIN_DATA = ("gsm8k-sample",)  # packaged under grpo_lightning/assets/, with their licenses


def matches(source: str) -> bool:
    return source.startswith(BUILTIN_PREFIX)


def builtin_data_dir(name: str) -> Path:
    """The directory of a packaged data set: ``gsm8k-sample`` is 64 train and 32 test GSM8K problems (MIT)."""
    if name not in BUILTIN_DATA:
        raise ValueError(f"unknown built-in data set {name!r}; built-in data sets are {BUILTIN_DATA}")
    return Path(str(resources.files("grpo_lightning") / "assets" / name))


def rows(source: str, split: str, config_name: str) -> Iterator[tuple[str, Any]]:
    """The packaged directory's ``split`` file, its rows named by file and line as any local file's."""
    return local.rows(str(builtin_data_dir(source[len(BUILTIN_PREFIX) :])), split, config_name)
