"""The LightningModule's side of the rollout seam: one training rollout through the configured engine.

:class:`~grpo_lightning.module.GRPOModule` samples each step through :meth:`RolloutMixin._rollout`, and
evaluation through the same ``engine`` (:class:`~grpo_lightning.evaluation.EvaluationMixin`). The module tells
the engine when the policy's weights change (after each step's updates, on a checkpoint load); the engine
pushes them before it samples again, if it holds a copy of its own.
"""

from __future__ import annotations

from typing import Any

from grpo_lightning.rollout import Rollout


class RolloutMixin:
    """For a LightningModule with ``engine``, ``policy``, ``tokenizer``, ``timings`` and the sampling hyperparameters."""

    def _rollout(self, batch: dict[str, list[Any]]) -> Rollout:
        """The step's B prompts × G samples, [B*G] rows; the engine's own stage times join the step's (``time/*``)."""
        hp = self.hparams
        rollout = self.engine.generate(
            self.policy, self.tokenizer, batch["prompt"], hp.num_generations, hp.max_new_tokens, temperature=hp.temperature,
            rows_per_call=hp.rows_per_generate, generation_kwargs=hp.generation_kwargs, share_prompt=hp.share_prompt,
            use_model_generation_config=hp.use_model_generation_config,
        )
        self.engine.free()  # between rollouts the engine's memory is the update's
        self.timings.update(self.engine.timings)  # e.g. weight_sync
        return rollout
