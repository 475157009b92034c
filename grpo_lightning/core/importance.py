"""Importance-sampling correction for a sampler whose log-probs differ from the trainer's (TRL's
``vllm_importance_sampling_correction``).

A vLLM engine samples with its own kernels, so the probability it drew a token with, π_sample, differs a
little from the trainer's π_old for the same weights. The surrogate assumes samples from π_old; weighting each
token's surrogate by ρ = π_old / π_sample (truncated or masked where it is extreme) corrects for the gap
(Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025). The modes and
bounds are TRL's:

- ``token_truncate``: each token's ρ_t = exp(old_t − sample_t), clipped to [clip_min, clip_max];
- ``token_mask``: each token's ρ_t, set to 0 outside [clip_min, clip_max];
- ``sequence_truncate``: one ρ = exp(Σ_t mask·(old_t − sample_t)) per completion, clipped, on all its tokens;
- ``sequence_mask``: that ρ, with the whole completion set to 0 when it is outside the bounds (TRL's default).

TRL #6789: with top-p or top-k sampling, π_sample is the truncated distribution while π_old is the full one,
so ρ is biased. This trainer's engines sample softmax(logits / T) untruncated, so the two measure the same
distribution (tests/test_vllm.py, the T = 2 frequency test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class ImportanceSampling:
    """How the loss corrects for the sampler's log-probs (TRL's ``vllm_importance_sampling_*`` options).

    Args:
        mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or ``sequence_mask`` (see the module).
        clip_max: Upper bound C_max of the ratio; ``None`` for none.
        clip_min: Lower bound C_min of the ratio; ``None`` for none.
    """

    mode: str = "sequence_mask"
    clip_max: float | None = 3.0
    clip_min: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"importance_sampling.mode must be one of {list(MODES)}, got {self.mode!r}")
        lo = 0.0 if self.clip_min is None else self.clip_min  # ratios are never negative
        hi = math.inf if self.clip_max is None else self.clip_max
        if not 0 <= lo <= hi:
            raise ValueError(
                f"importance_sampling.clip_min ({self.clip_min}) and clip_max ({self.clip_max}) must satisfy "
                "0 <= clip_min <= clip_max"
            )


def importance_weights(old_logp: Tensor, sample_logp: Tensor, mask: Tensor, options: ImportanceSampling) -> Tensor:
    """The per-token weights ρ of the surrogate: [n, C] in token modes, [n, 1] (one per completion) in sequence modes.

    old_logp: [n, C] the trainer's log-probs of the sampled tokens under the sampling weights; sample_logp: [n, C]
    the sampler's; mask: [n, C] the sampled tokens. No gradient flows through ρ.
    """
    level, rule = options.mode.split("_")
    diff = (old_logp.detach() - sample_logp) * mask  # [n, C]; 0 outside the completion
    if level == "sequence":
        diff = diff.sum(dim=-1, keepdim=True)  # [n, 1]: log of the product of the token ratios
    ratio = diff.exp()
    lo, hi = options.clip_min, options.clip_max
    if rule == "truncate":
        return ratio if lo is None and hi is None else ratio.clamp(min=lo, max=hi)
    outside = (ratio < (-math.inf if lo is None else lo)) | (ratio > (math.inf if hi is None else hi))
    return ratio.masked_fill(outside, 0.0)


def ratio_values(weights: Tensor, mask: Tensor) -> Tensor:
    """The ratios to summarise (min, mean, max): each sampled token's in token modes, each completion's in
    sequence modes, as TRL logs them. weights: [n, C] or [n, 1]; mask: [n, C] → a flat tensor."""
    if weights.shape[1] == 1:
        return weights.flatten()  # [n]
    return weights[mask.bool()]  # [tokens]


def ratio_summary(values: Tensor) -> dict[str, Tensor]:
    """``importance/ratio_min``, ``_mean`` and ``_max`` of the ratios kept over a step (none when empty)."""
    if values.numel() == 0:
        return {}
    return {"importance/ratio_min": values.min(), "importance/ratio_mean": values.mean(), "importance/ratio_max": values.max()}
