"""The rollout-engine seam: generate prompts × G → :class:`Rollout`, take the policy's weights, free memory.

The training step (``GRPOModule._rollout``) and evaluation (``EvaluationMixin.evaluate_batch``) sample only
through this interface. An engine that samples from the policy object itself (:class:`GenerateEngine`) needs
no weights pushed; one that keeps its own copy of the weights (vLLM) is told after each update that its copy is
stale (:meth:`RolloutEngine.update_weights`) and refreshes it before it samples again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grpo_lightning.rollout import Rollout


@dataclass
class Sampling:
    """The sampling options of one :meth:`RolloutEngine.generate` call (documented there)."""

    temperature: float
    generation_kwargs: dict[str, Any]
    use_model_generation_config: bool
    rows_per_call: int | None
    share_prompt: bool
    record_logprobs: bool


class RolloutEngine(ABC):
    """Samples rollouts for the training step and for evaluation.

    An engine whose log-probs are not the trainer's sets ``Rollout.importance_sampling`` on its rollouts: the
    correction the loss applies for the gap (:class:`~grpo_lightning.importance.ImportanceSampling`).
    """

    timings: dict[str, float] = {}  # seconds of the engine's own stages in its last call, logged as time/<name>

    def generate(
        self,
        policy: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        num_generations: int,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        generation_kwargs: dict[str, Any] | None = None,
        use_model_generation_config: bool = False,
        rows_per_call: int | None = None,
        share_prompt: bool = True,
        record_logprobs: bool = False,
    ) -> Rollout:
        """``num_generations`` completions of each prompt, the G of a prompt adjacent: B prompts → N = B*G rows.

        Tokens are drawn from softmax(logits / ``temperature``) unless ``generation_kwargs`` ask otherwise
        (``{"do_sample": False}``: greedy). ``rows_per_call`` bounds the rows sampled at once (memory) and
        ``share_prompt`` reads each prompt once for its G samples, where the engine can. ``record_logprobs``
        keeps each sampled token's log-prob in ``Rollout.sample_logprobs``.
        """
        options = Sampling(
            temperature, dict(generation_kwargs or {}), use_model_generation_config, rows_per_call, share_prompt,
            record_logprobs,
        )
        return self._generate(policy, tokenizer, list(prompts), num_generations, max_new_tokens, options)

    @abstractmethod
    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: Sampling
    ) -> Rollout:
        """What :meth:`generate` does, in each engine."""

    def update_weights(self, policy: Any) -> None:
        """The policy's weights changed (an optimizer step, a checkpoint load): sample from the new ones next."""

    def free(self) -> None:
        """Between rollouts: give back what the engine holds that the update could use."""
