"""The default rollout engine: Hugging Face ``generate`` on the policy itself (:mod:`grpo_lightning.sampling`).

It samples from the very weights being trained, so nothing is pushed after an update and its recorded
log-probs are the trainer's own: no importance-sampling correction applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpo_lightning.engines.base import RolloutEngine
from grpo_lightning.rollout import Rollout
from grpo_lightning.sampling import generate_rollout


class GenerateEngine(RolloutEngine):
    """Samples with ``generate`` in eval mode with the KV cache on (see :func:`~grpo_lightning.sampling.generate_rollout`)."""

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
        return generate_rollout(
            policy, tokenizer, prompts, num_generations, max_new_tokens, temperature, rows_per_call, generation_kwargs,
            record_logprobs=record_logprobs, share_prompt=share_prompt,
            use_model_generation_config=use_model_generation_config,
        )
