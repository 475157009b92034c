"""The GRPO objective as pure functions of tensors.

Shao et al., "DeepSeekMath" (arXiv:2402.03300), eq. 3: a PPO-style clipped surrogate on group-relative
advantages, minus β times the k3 estimate of KL(policy ‖ reference), averaged over each completion's
tokens and then over completions (the seed's per-sequence mean, ``loss_type="grpo"``).

The variants users know from TRL's ``GRPOConfig`` are small pieces picked by name: how the per-token
objective is averaged (:data:`LOSS_AGGREGATIONS`: ``bnpo``/``dapo`` from Yu et al., "DAPO",
arXiv:2503.14476; ``dr_grpo`` from Liu et al., "Understanding R1-Zero-Like Training", arXiv:2503.20783),
how rewards are scaled into advantages (:data:`REWARD_SCALES`), and DAPO's asymmetric clip range
(``epsilon_high``). Every average divides by counts of the *whole* step (``num_sequences``,
``num_tokens``), passed in by the caller: a step cut into row chunks then sums its chunks' losses to exactly
the loss of the uncut step, whatever the loss type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ADVANTAGE_EPS = 1e-4  # the seed's guard against a zero standard deviation


# Each scale sees this process's groups [B, G] and the whole step's rewards (every process's, [B_all*G]).
def _group_std(grouped: Tensor, step_rewards: Tensor) -> Tensor:
    return grouped.std(dim=1, keepdim=True)  # [B, 1], unbiased (n − 1), as the seed


def _batch_std(grouped: Tensor, step_rewards: Tensor) -> Tensor:
    return step_rewards.std()  # [], one scale for every group of the step (TRL's scale_rewards="batch")


def _no_scale(grouped: Tensor, step_rewards: Tensor) -> None:
    return None  # Dr. GRPO: dividing by a group's std favours groups that are nearly all right or all wrong


# scale_rewards name → the std that centred rewards are divided by (None: not divided)
REWARD_SCALES: dict[str, Callable[[Tensor, Tensor], Tensor | None]] = {
    "group": _group_std, "batch": _batch_std, "none": _no_scale,
}


def group_advantages(
    rewards: Tensor, num_generations: int, scale_rewards: str = "group", step_rewards: Tensor | None = None
) -> Tensor:
    """(r − mean of its group) / (std + 1e-4), for rewards ordered group by group.

    rewards: [B*G], the G completions of each prompt adjacent. Returns [B*G]. ``scale_rewards`` picks the
    std: ``group`` (the seed: each group's own), ``batch`` (one std over all B*G rewards) or ``none``
    (no division). A group whose rewards are all equal gets advantage 0 under every choice: it carries no
    signal about which sample is better. ``step_rewards`` are the rewards of the whole step when it spans
    several processes (``batch`` takes its std over them); ``None``: ``rewards`` are the whole step.
    """
    if num_generations < 2:
        raise ValueError(f"num_generations must be at least 2 to compare samples within a group, got {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not divide into groups of {num_generations}")
    if scale_rewards not in REWARD_SCALES:
        raise ValueError(f"scale_rewards must be one of {sorted(REWARD_SCALES)}, got {scale_rewards!r}")
    grouped = rewards.view(-1, num_generations)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    scale = REWARD_SCALES[scale_rewards](grouped, rewards if step_rewards is None else step_rewards)
    advantages = centred if scale is None else centred / (scale + ADVANTAGE_EPS)
    return advantages.view(-1)


def frac_reward_zero_std(rewards: Tensor, num_generations: int) -> Tensor:
    """The share of groups whose G rewards are all equal (they teach nothing): [B*G] → [].

    Compared for equality rather than std == 0, which float rounding of the group mean can miss.
    """
    grouped = rewards.view(-1, num_generations)  # [B, G]
    return (grouped == grouped[:, :1]).all(dim=1).float().mean()


def drop_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """The completion mask with every row that never reached EOS zeroed (``mask_truncated_completions``).

    mask: [N, C], truncated: [N] bool → [N, C]. A cut-off completion's reward judges text the model never
    finished, so DAPO drops its tokens from the loss. The rows still count as sequences in the averages.
    """
    return mask * (~truncated).unsqueeze(1).to(mask.dtype)


def approx_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π ‖ π_ref): exp(ref − logp) − (ref − logp) − 1, never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def masked_mean(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Mean of ``values`` over ``dim`` counting only positions where ``mask`` is 1."""
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean_part(values: Tensor, mask: Tensor, num_tokens: float) -> Tensor:
    """This chunk's part of a token mean over the whole step: Σ mask·values / (the step's token count)."""
    return (values * mask).sum() / max(num_tokens, 1)


# Each aggregation maps a chunk's per-token values [n, C] to its part of the step's average; the parts
# of a step's chunks add up to the average over the whole step because the denominators are the step's.
def _sequence_mean(values: Tensor, mask: Tensor, num_sequences: int, num_tokens: float, max_new_tokens: int | None) -> Tensor:
    # grpo: each completion's token mean, then the mean over completions. A long completion's tokens weigh
    # less than a short one's (the length bias Dr. GRPO points out).
    return masked_mean(values, mask).sum() / num_sequences


def _token_mean(values: Tensor, mask: Tensor, num_sequences: int, num_tokens: float, max_new_tokens: int | None) -> Tensor:
    # bnpo / dapo: every token of the step weighs the same
    return token_mean_part(values, mask, num_tokens)


def _constant_normaliser(values: Tensor, mask: Tensor, num_sequences: int, num_tokens: float, max_new_tokens: int | None) -> Tensor:
    # dr_grpo: a token sum over a constant (completions × max_new_tokens), independent of lengths
    if max_new_tokens is None:
        raise ValueError("loss_type='dr_grpo' divides by max_new_tokens: pass max_new_tokens=")
    return (values * mask).sum() / (num_sequences * max_new_tokens)


# TRL's bnpo divides by the tokens of one micro-batch, so its loss changes with gradient accumulation; here
# the step's count is always used, which makes bnpo and dapo (the whole generation batch's count) the same
# rule: in this trainer a step's batch is its generation batch.
LOSS_AGGREGATIONS = {"grpo": _sequence_mean, "bnpo": _token_mean, "dr_grpo": _constant_normaliser, "dapo": _token_mean}


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    beta: float,
    *,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_new_tokens: int | None = None,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of a chunk of rows and its detached statistics.

    logp, old_logp, ref_logp, mask: [n, C] per completion token (n rows of the step's N = B*G, C completion
    positions); advantages: [n]. ``old_logp=None`` means the samples came from the current policy (μ = 1),
    so the ratio is exp(logp − logp.detach()) = 1 with the policy-gradient gradient. ``ref_logp=None``
    requires β = 0. The ratio is clipped to [1 − clip_eps, 1 + epsilon_high] (``epsilon_high`` defaults to
    ``clip_eps``). ``loss_type`` names an entry of :data:`LOSS_AGGREGATIONS`; ``max_new_tokens`` is
    ``dr_grpo``'s constant.

    ``num_sequences`` and ``num_tokens`` are the step's row count N and its count of masked-in tokens; they
    default to this call's own (the step is one chunk). Loss and statistics are this chunk's parts: summed
    over a step's chunks they give the step's values. Statistics (token means): ``kl``, ``ratio``,
    ``clip_fraction`` and its parts ``clip_fraction/low`` and ``clip_fraction/high``, the shares of tokens
    where clipping binds (as TRL counts them: the ratio is below 1 − ε with a negative advantage, or above
    1 + ε_high with a positive one; there the token contributes no gradient).

    ``token_weights`` ([n, C] or [n, 1], no gradient) multiply each token's surrogate, not its KL term, as TRL
    applies its importance-sampling correction (:mod:`~grpo_lightning.importance`).
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_AGGREGATIONS)}, got {loss_type!r}")
    mask = mask.to(logp.dtype)
    num_sequences = logp.shape[0] if num_sequences is None else num_sequences
    num_tokens = mask.sum().item() if num_tokens is None else num_tokens
    epsilon_high = clip_eps if epsilon_high is None else epsilon_high
    if old_logp is None:
        old_logp = logp.detach()
    ratio = torch.exp(logp - old_logp)  # [n, C]
    adv = advantages.unsqueeze(1)  # [n, 1]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + epsilon_high)
    objective = torch.min(ratio * adv, clipped * adv)  # [n, C]
    if token_weights is not None:
        objective = objective * token_weights
    if beta != 0:
        if ref_logp is None:
            raise ValueError("ref_logp is required when beta != 0")
        kl = approx_kl(logp, ref_logp)
        objective = objective - beta * kl
    loss = -LOSS_AGGREGATIONS[loss_type](objective, mask, num_sequences, num_tokens, max_new_tokens)

    with torch.no_grad():
        low = ((ratio < 1 - clip_eps) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
        stats = {
            "kl": token_mean_part(kl, mask, num_tokens) if beta != 0 else torch.zeros((), device=logp.device),
            "clip_fraction": token_mean_part(low + high, mask, num_tokens),
            "clip_fraction/low": token_mean_part(low, mask, num_tokens),
            "clip_fraction/high": token_mean_part(high, mask, num_tokens),
            "ratio": token_mean_part(ratio, mask, num_tokens),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
