"""The GRPO objective as pure functions of tensors.

Shao et al., "DeepSeekMath" (arXiv:2402.03300), eq. 3: a PPO-style clipped surrogate on group-relative
advantages, minus β times the k3 estimate of KL(policy ‖ reference), averaged over each completion's
tokens and then over completions (the seed's per-sequence mean).
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_EPS = 1e-4  # the seed's guard against a zero standard deviation


def group_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """(r − mean of its group) / (unbiased std of its group + 1e-4), for rewards ordered group by group.

    rewards: [B*G], the G completions of each prompt adjacent. Returns [B*G].
    A group whose rewards are all equal gets advantage 0: it carries no signal about which sample is better.
    """
    if num_generations < 2:
        raise ValueError(f"num_generations must be at least 2 to compare samples within a group, got {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not divide into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)  # [B, G]
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased (n − 1), as the seed
    return ((grouped - mean) / (std + ADVANTAGE_EPS)).view(-1)


def approx_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π ‖ π_ref): exp(ref − logp) − (ref − logp) − 1, never negative."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def masked_mean(values: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Mean of ``values`` over ``dim`` counting only positions where ``mask`` is 1."""
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss and detached statistics.

    logp, old_logp, ref_logp, mask: [N, C] per completion token (N = B*G rows, C completion positions);
    advantages: [N]. ``old_logp=None`` means the samples came from the current policy (μ = 1), so the
    ratio is exp(logp − logp.detach()) = 1 with the policy-gradient gradient. ``ref_logp=None`` requires β = 0.
    Returns ``(loss, stats)`` with stats ``kl``, ``clip_fraction`` and ``ratio`` (token means).
    """
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()
    ratio = torch.exp(logp - old_logp)  # [N, C]
    adv = advantages.unsqueeze(1)  # [N, 1]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    objective = torch.min(ratio * adv, clipped * adv)  # [N, C]
    if beta != 0:
        if ref_logp is None:
            raise ValueError("ref_logp is required when beta != 0")
        kl = approx_kl(logp, ref_logp)
        objective = objective - beta * kl
    loss = -masked_mean(objective, mask).mean()

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        is_clipped = ((ratio - clipped).abs() > 0).to(mask.dtype)
        stats = {
            "kl": (kl * mask).sum() / tokens if beta != 0 else torch.zeros((), device=logp.device),
            "clip_fraction": (is_clipped * mask).sum() / tokens,
            "ratio": (ratio * mask).sum() / tokens,
        }
    return loss, {k: v.detach() for k, v in stats.items()}
