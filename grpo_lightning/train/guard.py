"""Keeping non-finite numbers away from the weights: reward checks, and skipping non-finite optimizer steps.

Rewards finite in float32 (scoring refuses 1e39, which is ``inf`` there) can still overflow on the way to the
advantages: a group of 3e38 and 3e38 has an infinite mean and NaN advantages. That is reported as a bad reward
before any update (:func:`check_step_rewards`). A loss or gradient norm that is not finite (half precision, an
unlucky batch) skips that optimizer step instead: :class:`SkipGuard` decides, with one decision for every
process, counts consecutive skips (saved in the checkpoint) and stops the run after too many.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor



class NonFiniteStepsError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def any_process(strategy: Any, flag: bool) -> bool:
    """``flag`` or'ed over processes (one all-reduce), so every process takes the same decision."""
    if strategy is None or getattr(strategy, "world_size", 1) == 1:
        return flag
    device = getattr(strategy, "root_device", torch.device("cpu"))
    total = strategy.reduce(torch.tensor(float(flag), device=device), reduce_op="sum")
    return bool(total.item() > 0)


class SkipGuard:
    """Decides whether an optimizer step runs, and counts the steps skipped for a non-finite loss or norm.

    Args:
        max_consecutive: Stop after this many skipped optimizer steps in a row; 0 never stops (checked as
            ``model.optimization.max_consecutive_skips``).
    """

    def __init__(self, max_consecutive: int = 3):
        self.max_consecutive = max_consecutive
        self.consecutive = 0  # skipped steps since the last step that ran
        self.total = 0  # every skipped step of the run

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])

    def step_is_finite(self, strategy: Any, loss: Tensor, norm: Tensor | None) -> bool:
        """True when the step may run: loss and norm finite on every process. Counts a skip otherwise.

        ``norm`` is ``None`` under an fp16 GradScaler: its scaled gradients overflow by design and the
        scaler skips those steps itself, which are not failures; only the loss is checked then.
        """
        bad = not bool(torch.isfinite(loss).all()) or (norm is not None and not bool(torch.isfinite(norm)))
        if not any_process(strategy, bad):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        return False

    def allow_step(self, trainer: Any, loss: Tensor, norm: Tensor | None) -> bool:
        """:meth:`step_is_finite` for a trainer's optimizer step; on a skip, warn and stop after too many.

        ``norm`` is the gradient norm the step clipped with, or ``None`` under an fp16 GradScaler (which skips
        its own overflows).
        """
        if self.step_is_finite(trainer.strategy, loss, norm):
            return True
        rank_zero_warn(self.message(trainer.global_step, loss, norm))
        self.check_limit(getattr(trainer.checkpoint_callback, "last_model_path", None) or None)
        return False

    def message(self, step: int, loss: Tensor, norm: Tensor | None) -> str:
        """The warning for a skipped step; ``step`` is the optimizer step that did not run."""
        shown = "not checked (GradScaler)" if norm is None else f"{float(norm):g}"
        return (
            f"optimizer step {step} skipped: loss {float(loss):g}, gradient norm {shown} on this process "
            f"(weights, optimizer and scheduler unchanged; {self.consecutive} in a row, {self.total} in all)"
        )

    def check_limit(self, last_checkpoint: str | None) -> None:
        """Raise :class:`NonFiniteStepsError` once ``max_consecutive`` steps in a row were skipped."""
        if not self.max_consecutive or self.consecutive < self.max_consecutive:
            return
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteStepsError(
            f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient norm "
            f"(model.optimization.max_consecutive_skips = {self.max_consecutive}); stopped, {kept}. Lower the learning "
            "rate, check the rewards, or train in float32 or bf16-mixed"
        )
