"""The TRL side's reward: the project's own combined reward behind TRL's reward-function signature.

Both frameworks score with the same function, so rewards cost the same small time on each side.
"""

from __future__ import annotations

from grpo_lightning.builtin.gsm8k import combined_reward


def trl_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL calls reward functions with the batch's columns as keywords; ``answer`` is the expected answer."""
    return [combined_reward(c, a) for c, a in zip(completions, answer)]
