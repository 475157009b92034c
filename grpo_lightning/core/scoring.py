"""Reward functions named in the config, called the way TRL calls them, and their weighted total.

A reward function follows TRL's ``GRPOTrainer`` convention: ``f(prompts, completions, **columns)`` returns
one value per completion. ``prompts`` and ``completions`` are lists of N = B*G strings (each prompt repeated
for its G samples), ``completion_ids`` is passed too (token ids up to and including EOS), and every other
column of the batch arrives as a keyword argument holding one value per completion (GSM8K: ``question``,
``answer`` and ``expected``, the extracted final answer). A function should accept ``**kwargs`` for the
columns it does not use, so a TRL reward function works here unchanged and the reverse.

A value may be ``None``, as in TRL: the function does not apply to that completion. It then adds nothing
to the total and is left out of that function's logged mean. Anything else that is not a finite number
(NaN, inf, a string, a number beyond float32's range such as 1e39), the wrong number of values, or an
exception is a :class:`RewardFunctionError` that names the function, raised before any update touches the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.core.imports import import_object


RewardFunc = Callable[..., Sequence[Any]]
FLOAT32_MAX = torch.finfo(torch.float32).max


class RewardFunctionError(ValueError):
    """A reward function raised, or returned something that is not one number (or None) per completion."""


DEFAULT_REWARD_FUNCS = ("grpo_lightning.builtin.gsm8k.correctness", "grpo_lightning.builtin.gsm8k.format")


def function_name(func: Callable) -> str:
    """The name a reward function is logged under: its ``__name__``, else its class's."""
    return getattr(func, "__name__", None) or type(func).__name__


def load_reward_funcs(paths: Sequence[str], weights: Sequence[float] | None = None) -> dict[str, tuple[RewardFunc, float]]:
    """Import each path; ``{name: (function, weight)}`` in the given order. Weights default to 1 each."""
    if not paths:
        raise ValueError("model.loss.reward_funcs needs at least one reward function")
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"model.loss.reward_weights has {len(weights)} values for {len(paths)} reward functions")
    funcs: dict[str, tuple[RewardFunc, float]] = {}
    for path, weight in zip(paths, weights):
        func = import_object(path)
        if not callable(func):
            raise RewardFunctionError(f"reward function {path!r} is not callable")
        name = function_name(func)
        if name in funcs:  # the logs would mix two functions under one name
            raise ValueError(f"two reward functions are named {name!r}; their logged means would collide")
        funcs[name] = (func, float(weight))
    return funcs


@dataclass
class Scores:
    """The rewards of N completions: the weighted total and each function's own values."""

    total: list[float]  # [N] Σ weight·value, a None counting 0
    per_function: dict[str, list[float | None]]  # name → [N] values as returned (None: not applicable)

    def columns(self, device: Any = None) -> dict[str, Tensor]:
        """Each function's values as a float64 column [N], NaN where it did not apply."""
        return {
            name: torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64, device=device)
            for name, values in self.per_function.items()
        }

    def largest(self) -> dict[str, float]:
        """Each function's largest absolute value (0 when it applied to none): what error messages name."""
        return {
            name: max((abs(v) for v in values if v is not None), default=0.0) for name, values in self.per_function.items()
        }

    def means(self) -> dict[str, float]:
        """Each function's mean over the completions it applied to (functions that applied to none are left out)."""
        means = {name: applied_mean(column) for name, column in self.columns().items()}
        return {name: mean.item() for name, mean in means.items() if mean is not None}


def applied_mean(column: Tensor) -> Tensor | None:
    """The mean of a :meth:`Scores.columns` column over the completions it applied to; None if it applied to none."""
    applied = column[~column.isnan()]
    return applied.mean() if applied.numel() else None


def float32_finite(value: float) -> bool:
    """Whether ``value`` stays finite as float32 (1e39 is a finite Python float but ``inf`` in float32)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _checked(name: str, values: Any, n: int) -> list[float | None]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardFunctionError(f"reward function {name!r} returned {type(values).__name__}, not a list of {n} numbers")
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        try:
            number = float(value) if not isinstance(value, (str, bytes)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not float32_finite(number):  # the advantages are float32: 1e39 would be inf there
            raise RewardFunctionError(
                f"reward function {name!r} returned {value!r} for completion {i}; rewards must be numbers "
                "finite in float32 (|r| ≤ 3.4e38) or None"
            )
        out.append(number)
    return out


def score(
    funcs: dict[str, tuple[RewardFunc, float]], prompts: list[str], completions: list[str], **columns: Any
) -> Scores:
    """Call every reward function on the N completions and check what each returns; see the module docstring."""
    n = len(completions)
    per_function: dict[str, list[float | None]] = {}
    total = [0.0] * n
    for name, (func, weight) in funcs.items():
        try:
            values = func(prompts=prompts, completions=completions, **columns)
        except Exception as e:  # any failure of user code becomes one error that names the function
            raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        per_function[name] = _checked(name, values, n)
        total = [t + weight * v if v is not None else t for t, v in zip(total, per_function[name])]
    return Scores(total=total, per_function=per_function)


def check_step_rewards(step_rewards: Tensor, advantages: Tensor, maxima: dict[str, float]) -> None:
    """Raise a reward error when the step's rewards [W*N] overflow float32 on the way to the advantages [N].

    ``maxima`` holds each reward function's largest absolute value, to name the functions in the message.
    The std is checked with the advantages, since an infinite std would turn every advantage into a finite 0.
    (Rewards of 0 and 1e20 have a variance of 2.5e39, ``inf`` in float32, yet torch's std does not square in
    float32: it is 5e19 and the advantages are exact, so those rewards pass.)
    """
    spread = step_rewards.std() if step_rewards.numel() > 1 else step_rewards.new_zeros(())
    if bool(torch.isfinite(step_rewards).all() and torch.isfinite(spread) and torch.isfinite(advantages).all()):
        return
    named = ", ".join(f"{name!r} up to {value:g}" for name, value in maxima.items())
    raise RewardFunctionError(
        f"the rewards overflow float32 in the advantages (their sum, mean or variance is not finite); "
        f"reward functions returned {named}: scale the rewards down"
    )
