"""What passes between the stages of one GRPO step: rollout → scoring → advantages → μ updates.

:class:`GRPOBatch` is everything the updates need, built by :func:`prepare_batch` from a rollout and its
rewards before any update runs. In particular it carries the step-wide counts that every loss type divides
by, so that however the updates cut the rows into chunks (``rows_per_update``), the chunks' losses add up
to the loss of the whole step.

With several processes a step is the rows of every process: :func:`prepare_batch` takes a ``gather`` that
turns this process's per-row values into the whole step's (one collective), and the counts, the batch reward
scale and the logged metrics come from those, so each process divides by the same step-wide counts and logs
the same step-wide values that one process holding all the rows would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.core.advantages import drop_truncated, frac_reward_zero_std, group_advantages
from grpo_lightning.core.importance import importance_weights, ratio_summary
from grpo_lightning.core.scoring import RewardFunc, Scores, applied_mean, check_step_rewards, score
from grpo_lightning.core.types import GRPOBatch, Rollout


# this process's per-row columns → the whole step's, every process's rows concatenated
Gather = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _alone(columns: dict[str, Tensor]) -> dict[str, Tensor]:
    return columns  # one process: its rows are the whole step


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
    gather: Gather = _alone,
) -> GRPOBatch:
    """Rewards → advantages, the loss mask, and the step's counts, counted here, before any chunk runs.

    ``gather`` maps this process's per-row columns to the whole step's (see the module docstring).
    """
    mask = rollout.completion_mask
    rewards = torch.tensor(scores.total, dtype=torch.float32, device=mask.device)  # [N]
    if mask_truncated_completions:
        mask = drop_truncated(mask, rollout.truncated)
    columns = {
        "reward": rewards,
        "length": rollout.completion_mask.sum(dim=1).float(),
        "truncated": rollout.truncated.float(),
        "tokens": mask.sum(dim=1).float(),
        **{f"reward/{name}": column for name, column in scores.columns(mask.device).items()},
    }
    step_rows = gather({k: v.to(mask.device) for k, v in columns.items()})
    step_rewards = step_rows["reward"]  # [W*N]
    advantages = group_advantages(rewards, num_generations, scale_rewards, step_rewards)  # [N]
    check_step_rewards(step_rewards, advantages, scores.largest())  # before any update: overflowing rewards stop here
    return GRPOBatch(
        rollout=rollout,
        scores=scores,
        rewards=rewards,
        advantages=advantages,
        loss_mask=mask,
        num_sequences=step_rewards.shape[0],
        num_tokens=int(step_rows["tokens"].sum()),
        frac_reward_zero_std=frac_reward_zero_std(step_rewards, num_generations),
        step_rows=step_rows,
    )


def step_metrics(data: GRPOBatch, importance_ratios: Tensor | None = None) -> dict[str, Tensor]:
    """The step's reward and completion statistics over every process, as logged.

    ``reward/<function>`` is its unweighted mean over the completions it applied to (left out when none).
    ``importance_ratios``: the importance-sampling ratios the updates used ([k], this process's), when any.
    """
    rows = data.step_rows
    lengths = rows["length"]  # [W*N]
    means = {f"reward/{name}": applied_mean(rows[f"reward/{name}"]) for name in data.scores.per_function}
    per_function = {name: mean.float() for name, mean in means.items() if mean is not None}
    return {
        "reward": rows["reward"].mean(),
        "reward/std": rows["reward"].std(),
        **per_function,
        "frac_reward_zero_std": data.frac_reward_zero_std,
        "completion/length_mean": lengths.mean(),
        "completion/length_max": lengths.max(),
        "completion/truncated_fraction": rows["truncated"].mean(),
        # this process's sampled tokens (or completions, in sequence modes), as TRL logs them
        **ratio_summary(importance_ratios if importance_ratios is not None else torch.zeros(0)),
    }


def token_weights(rollout: Rollout, part: slice, old_logp: Tensor) -> Tensor | None:
    """The importance weights of rows ``part`` ([n, C] or [n, 1]); None without a correction.

    ``old_logp`` [n, C]: the trainer's log-probs at the step's first update, detached: the weights that sampled,
    or one update later under one-step-off rollouts, where ρ then also corrects for the staleness.
    """
    if rollout.importance_sampling is None or rollout.sample_logprobs is None:
        return None
    return importance_weights(old_logp, rollout.sample_logprobs[part], rollout.completion_mask[part], rollout.importance_sampling)
