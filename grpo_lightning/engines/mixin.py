"""The LightningModule's side of the rollout seam: one training rollout through the configured engine.

:class:`~grpo_lightning.train.module.GRPOModule` samples each step through :meth:`RolloutMixin._rollout`, and
evaluation through the same ``engine`` (:class:`~grpo_lightning.train.evaluation.EvaluationMixin`). The module tells
the engine when the policy's weights change (after each step's updates, on a checkpoint load); the engine
pushes them before it samples again, if it holds a copy of its own.
"""

from __future__ import annotations

from typing import Any

from grpo_lightning.core.types import Rollout


class RolloutMixin:
    """For a LightningModule with ``engine``, ``passes`` (the policy's pass root), ``tokenizer``, ``timings`` and the ``sampling`` and ``fast`` options."""

    def _rollout(self, batch: dict[str, list[Any]]) -> Rollout:
        """The step's B prompts × G samples, [B*G] rows; the engine's own stage times join the step's (``time/*``)."""
        s = self.sampling
        rollout = self.engine.generate(
            self.passes, self.tokenizer, batch["prompt"], s.num_generations, s.max_new_tokens, temperature=s.temperature,
            rows_per_call=s.rows_per_generate, generation_kwargs=s.generation_kwargs, share_prompt=s.share_prompt,
            use_model_generation_config=s.use_model_generation_config, fast=self.fast,
        )
        self.engine.free()  # between rollouts the engine's memory is the update's
        self.timings.update(self.engine.timings)  # e.g. weight_sync
        return rollout
