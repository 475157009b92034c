"""Engines for parity tests: one records the rollouts another engine samples, one serves given rollouts.

Comparing two ways of running a step (several processes against one, a sharded pass against a plain one)
needs both to update on the same samples; sampling again would draw different ones. Record a run's rollouts
with :class:`RecordingEngine`, then run the other way with a :class:`ReplayEngine` of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpo_lightning.core.types import Rollout
from grpo_lightning.engines.base import PendingRollout, RolloutEngine, SamplingCall


class ReplayEngine(RolloutEngine):
    """Serves the given rollouts in order, one per call, each for as many rows as the call asks for.

    ``weight_updates`` counts the calls of :meth:`update_weights` (what a pushing engine would have pushed).
    ``max_staleness`` 1 serves them as a one-step-off engine would (sent a step before they are trained on).
    """

    def __init__(self, rollouts: Sequence[Rollout], max_staleness: int = 0):
        self.rollouts, self.served, self.weight_updates = list(rollouts), 0, 0
        self.max_staleness = max_staleness

    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> Rollout:
        if self.served == len(self.rollouts):
            raise IndexError(f"the replay engine has served all of its {len(self.rollouts)} rollouts")
        rollout = self.rollouts[self.served]
        rows, wanted = rollout.input_ids.shape[0], len(prompts) * num_generations
        if rows != wanted:
            raise ValueError(
                f"replayed rollout {self.served} has {rows} rows, the call asks for {len(prompts)} prompts × "
                f"{num_generations} = {wanted}"
            )
        if rollout.completion_mask.shape[1] > max_new_tokens:
            raise ValueError(
                f"replayed rollout {self.served} has {rollout.completion_mask.shape[1]} completion positions, "
                f"more than max_new_tokens ({max_new_tokens})"
            )
        self.served += 1
        return rollout

    def update_weights(self, policy: Any) -> None:
        self.weight_updates += 1


class RecordingEngine(RolloutEngine):
    """Another engine, with every rollout it returns kept in ``rollouts`` (for a :class:`ReplayEngine`), in the
    order they are waited for."""

    def __init__(self, engine: RolloutEngine):
        self.engine, self.rollouts = engine, []

    def _submit(self, *args: Any) -> PendingRollout:
        pending = self.engine._submit(*args)

        def finish() -> Rollout:
            rollout = pending.result()
            self.rollouts.append(rollout)
            return rollout

        return PendingRollout(finish)

    def _generate(self, *args: Any) -> Rollout:
        return self._submit(*args).result()

    # the other engine's
    timings = property(lambda self: self.engine.timings)  # type: ignore[assignment]
    max_staleness = property(lambda self: self.engine.max_staleness)  # type: ignore[assignment]
    collective = property(lambda self: self.engine.collective)  # type: ignore[assignment]
    run_dir = property(lambda self: self.engine.run_dir, lambda self, value: setattr(self.engine, "run_dir", value))  # type: ignore[assignment]

    def update_weights(self, policy: Any) -> None:
        self.engine.update_weights(policy)

    def free(self) -> None:
        self.engine.free()

    def close(self) -> None:
        self.engine.close()
