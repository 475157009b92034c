"""The typed values that pass between the stages of one GRPO step: a :class:`Rollout`, then a :class:`GRPOBatch`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from grpo_lightning.core.importance import ImportanceSampling
from grpo_lightning.core.scoring import Scores


@dataclass
class Rollout:
    """The samples of one training step, N = B*G rows, the G samples of a prompt adjacent."""

    input_ids: Tensor  # [N, P + C] left-padded prompt, then completion (right-padded)
    attention_mask: Tensor  # [N, P + C] prompt padding 0, completion through its first EOS 1
    completion_mask: Tensor  # [N, C] 1 up to and including the first EOS
    prompt_length: int  # P
    completions: list[str]  # N decoded completions, EOS and what follows removed
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    sample_logprobs: Tensor | None = None  # [N, C] log-probs seen by the sampler, when recorded
    # how the loss corrects for a sampler whose log-probs are not the trainer's (None: it samples as the trainer)
    importance_sampling: ImportanceSampling | None = None


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
    # the step's per-row values over every process ([W*N] each; this process's N rows with one process):
    # "reward", "length", "truncated", "tokens", and "reward/<function>" (NaN where it did not apply)
    step_rows: dict[str, Tensor] = field(default_factory=dict)
