"""The default rollout engine: Hugging Face ``generate`` on the policy itself (:mod:`grpo_lightning.sampling`).

It samples from the very weights being trained, so nothing is pushed after an update and its recorded
log-probs are the trainer's own: no importance-sampling correction applies.
"""

from __future__ import annotations

from typing import Any

from grpo_lightning.engines.base import RolloutEngine, Sampling
from grpo_lightning.rollout import Rollout
from grpo_lightning.sampling import generate_rollout


class GenerateEngine(RolloutEngine):
    """Samples with ``generate`` in eval mode with the KV cache on (see :func:`~grpo_lightning.sampling.generate_rollout`)."""

    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: Sampling
    ) -> Rollout:
        o = options
        return generate_rollout(
            policy, tokenizer, prompts, num_generations, max_new_tokens, o.temperature, o.rows_per_call,
            o.generation_kwargs, record_logprobs=o.record_logprobs, share_prompt=o.share_prompt,
            use_model_generation_config=o.use_model_generation_config,
        )
