"""The LightningModule's side of the rollout seam: the training rollouts, through the configured engine.

:class:`~grpo_lightning.train.module.GRPOModule` samples each step through :meth:`RolloutMixin._rollout`, and
evaluation through the same ``engine`` (:class:`~grpo_lightning.train.evaluation.EvaluationMixin`). The module tells
the engine when the policy's weights change (after each step's updates, on a checkpoint load); the engine
pushes them before it samples again, if it holds a copy of its own.

One-step-off (``engine.max_staleness == 1``): each step sends its batch's rollout, sampled from the weights as
they are, and updates on the rollout the previous step sent, which was sampled while that step updated. So
the sampler works while the trainer does, and the rollout a step trains on is one update old:

    step 0:  send rollout 0 (weights w0)        no update yet
    step 1:  send rollout 1 (w0)                update on rollout 0 → w1    (staleness 0: w0 sampled it)
    step 2:  send rollout 2 (w1)                update on rollout 1 → w2    (staleness 1)

The first step only sends. The last step sends too: no update uses that rollout, but the last checkpoint keeps
it, as every checkpoint keeps the rollout in flight (waited for; every process's), so a resumed run, or one
continued to a larger ``max_steps``, trains on what the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from grpo_lightning.core.types import Rollout
from grpo_lightning.engines.base import PendingRollout


class RolloutMixin:
    """For a LightningModule with ``engine``, ``passes`` (the policy's pass root), ``tokenizer``, ``timings``,
    ``rollout_steps`` and the ``sampling`` and ``fast`` options."""

    # one-step-off: the batch sent, the rollout steps done when it was sent, and its rollout
    in_flight: tuple[dict[str, list[Any]], int, PendingRollout] | None = None
    staleness = 0  # updates between the weights that sampled the step's rollout and the step's own

    def _send(self, batch: dict[str, list[Any]]) -> PendingRollout:
        s = self.sampling
        return self.engine.submit(
            self.passes, self.tokenizer, batch["prompt"], s.num_generations, s.max_new_tokens, temperature=s.temperature,
            rows_per_call=s.rows_per_generate, generation_kwargs=s.generation_kwargs, share_prompt=s.share_prompt,
            use_model_generation_config=s.use_model_generation_config, fast=self.fast,
        )

    def _take(self, pending: PendingRollout) -> Rollout:
        rollout = pending.result()
        self.engine.free()  # between rollouts the engine's memory is the update's
        self.timings.update(self.engine.timings)  # e.g. weight_sync
        return rollout

    def _rollout(self, batch: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], Rollout] | None:
        """The batch to update on and its B prompts × G samples, [B*G] rows; None when there is none yet
        (one-step-off's first step). The engine's own stage times join the step's (``time/*``)."""
        if self.engine.max_staleness == 0:
            return batch, self._take(self._send(batch))
        before, self.in_flight = self.in_flight, None  # (cleared first: a send that fails leaves none)
        self.in_flight = (batch, self.rollout_steps, self._send(batch))  # sampled from the weights as they are
        if before is None:
            return None
        sent, version, pending = before
        self.staleness = self.rollout_steps - version
        return sent, self._take(pending)

    def in_flight_state(self) -> dict[str, Any] | None:
        """This process's rollout in flight, waited for, for the checkpoint; None when there is none."""
        if self.in_flight is None:
            return None
        batch, version, pending = self.in_flight
        fields = dataclasses.asdict(pending.result())
        fields.pop("importance_sampling")  # the engine's option, set again on load
        return {"batch": batch, "version": version, "rollout": fields}

    def load_in_flight_state(self, states: list[dict[str, Any] | None] | None) -> None:
        """Take this process's rollout in flight from every process's (:meth:`in_flight_state`, in process order)."""
        if not states or all(state is None for state in states):
            return
        if len(states) != self.trainer.world_size:
            raise ValueError(
                f"the checkpoint holds the rollouts in flight of {len(states)} processes, this run has "
                f"{self.trainer.world_size}: resume a one-step-off run on as many processes as it was saved from"
            )
        state = states[self.global_rank]
        rollout = Rollout(**state["rollout"], importance_sampling=getattr(self.engine, "importance_sampling", None))
        self.in_flight = (state["batch"], state["version"], PendingRollout(lambda: rollout))
