"""Group-relative advantages (Shao et al., "DeepSeekMath", arXiv:2402.03300, §4.1.2) and the loss mask.

Rewards are viewed as [B, G], the G samples of each prompt adjacent; each one's advantage is its reward less
its group's mean, divided by a spread that ``scale_rewards`` picks.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

ADVANTAGE_EPS = 1e-4  # the seed's: added to the std, so a group of equal rewards gets advantages of 0


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
