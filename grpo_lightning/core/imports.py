"""Objects named by import paths in a config: reward functions, answer extractors."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """The object an import path names: ``package.module.name`` or ``package.module:name``.

    One clear error for a path that is malformed, a module that does not import, or a missing attribute.
    """
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path like 'package.module.name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import {path!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"cannot import {path!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
