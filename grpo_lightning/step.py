"""What passes between the stages of one GRPO step: rollout → scoring → advantages → μ updates.

:class:`GRPOBatch` is everything the updates need, built by :func:`prepare_batch` from a rollout and its
rewards before any update runs. In particular it carries the step-wide counts that every loss type divides
by, so that however the updates cut the rows into chunks (``rows_per_update``), the chunks' losses add up
to the loss of the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.loss import drop_truncated, frac_reward_zero_std, group_advantages
from grpo_lightning.rollout import Rollout
from grpo_lightning.scoring import RewardFunc, Scores, score


@dataclass
class GRPOBatch:
    """One step's rollout with its rewards and advantages; N = B*G rows, C completion positions."""

    rollout: Rollout
    scores: Scores  # each reward function's values and the weighted total
    rewards: Tensor  # [N] the weighted total, float32
    advantages: Tensor  # [N]
    loss_mask: Tensor  # [N, C] the completion mask, truncated rows zeroed when asked
    num_sequences: int  # N: rows of the whole step, the denominator of per-sequence means
    num_tokens: int  # masked-in tokens of the whole step, the denominator of token means
    frac_reward_zero_std: Tensor  # [] share of groups whose rewards are all equal
    ref_logp: Tensor | None = None  # [N, C] reference log-probs, filled in when β ≠ 0


def score_rollout(
    reward_funcs: dict[str, tuple[RewardFunc, float]], batch: dict[str, list[Any]], rollout: Rollout, num_generations: int
) -> Scores:
    """Every reward function on the rollout's N completions, called as TRL calls them.

    ``batch`` holds B prompts and their columns; each is repeated for its G samples, and every column but
    ``prompt`` becomes a keyword (``expected``, ``answer``, ...), with ``completion_ids`` (through EOS).
    """

    def per_completion(values: list[Any]) -> list[Any]:
        return [v for v in values for _ in range(num_generations)]  # [B] → [B*G], groups adjacent

    columns = {key: per_completion(values) for key, values in batch.items() if key != "prompt"}
    completion_ids = [
        ids[m.bool()].tolist() for ids, m in zip(rollout.input_ids[:, rollout.prompt_length :], rollout.completion_mask)
    ]
    return score(reward_funcs, per_completion(batch["prompt"]), rollout.completions, completion_ids=completion_ids, **columns)


def prepare_batch(
    rollout: Rollout,
    scores: Scores,
    num_generations: int,
    scale_rewards: str = "group",
    mask_truncated_completions: bool = False,
) -> GRPOBatch:
    """Rewards → advantages, the loss mask, and the step's counts, counted here, before any chunk runs."""
    mask = rollout.completion_mask
    rewards = torch.tensor(scores.total, dtype=torch.float32, device=mask.device)  # [N]
    if mask_truncated_completions:
        mask = drop_truncated(mask, rollout.truncated)
    return GRPOBatch(
        rollout=rollout,
        scores=scores,
        rewards=rewards,
        advantages=group_advantages(rewards, num_generations, scale_rewards),
        loss_mask=mask,
        num_sequences=mask.shape[0],
        num_tokens=int(mask.sum()),
        frac_reward_zero_std=frac_reward_zero_std(rewards, num_generations),
    )


def step_metrics(data: GRPOBatch) -> dict[str, Tensor]:
    """The step's reward and completion statistics, as logged (``reward/<function>``: its unweighted mean)."""
    lengths = data.rollout.completion_mask.sum(dim=1).float()  # [N]
    return {
        "reward/std": data.rewards.std(),
        **{f"reward/{name}": torch.tensor(mean) for name, mean in data.scores.means().items()},
        "frac_reward_zero_std": data.frac_reward_zero_std,
        "completion/length_mean": lengths.mean(),
        "completion/length_max": lengths.max(),
        "completion/truncated_fraction": data.rollout.truncated.float().mean(),
    }
