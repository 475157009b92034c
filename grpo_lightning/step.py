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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.gated_mlp import gated_mlps
from grpo_lightning.guard import check_step_rewards
from grpo_lightning.head_logprob import TiedWeightGrad, head_loss, tied_embedding
from grpo_lightning.importance import importance_weights, ratio_summary, ratio_values
from grpo_lightning.loss import drop_truncated, frac_reward_zero_std, group_advantages, grpo_loss
from grpo_lightning.rollout import Rollout, causal_lm, completion_hidden, is_checkpointing, sequence_logprobs
from grpo_lightning.scoring import RewardFunc, Scores, applied_mean, score


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
    # the importance-sampling ratios the updates used (rollout.importance_sampling), kept for the log
    importance_ratios: list[Tensor] = field(default_factory=list)


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


def step_metrics(data: GRPOBatch) -> dict[str, Tensor]:
    """The step's reward and completion statistics over every process, as logged.

    ``reward/<function>`` is its unweighted mean over the completions it applied to (left out when none).
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
        **ratio_summary(torch.cat(data.importance_ratios) if data.importance_ratios else torch.zeros(0)),
    }


def rows_loss(
    model: Any, data: GRPOBatch, rows: slice, old_logp: Tensor | None, *, fused: bool, chunk_rows: int, group: int,
    recompute: bool, temperature: float, loss_scale: float = 1.0, **loss_kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(log-probs [rows, C], entropies [rows, C], the step's GRPO loss part of ``rows``, its detached stats).

    ``old_logp`` [n, C] covers all of this process's rows (``None`` at the first update); ``loss_kwargs`` go to
    :func:`~grpo_lightning.loss.grpo_loss` with the step's counts. ``fused`` takes the loss's gradient inside
    the LM-head pass (:class:`~grpo_lightning.head_logprob.HeadLoss`); otherwise autograd runs through
    :func:`~grpo_lightning.rollout.sequence_logprobs`. Both give the same loss and gradients. ``loss_scale``
    is the GradScaler's factor for the coming backward pass (``16-mixed``), which the fused pass applies itself.
    """
    r = data.rollout
    ids, attn, P = r.input_ids[rows], r.attention_mask[rows], r.prompt_length

    def loss_of(logp: Tensor, lo: int, hi: int) -> tuple[Tensor, dict[str, Tensor]]:  # rows [lo, hi) of ``rows``
        part = slice((rows.start or 0) + lo, (rows.start or 0) + hi)
        old = None if old_logp is None else old_logp[part]
        return grpo_loss(
            logp, old, None if data.ref_logp is None else data.ref_logp[part],
            data.advantages[part], data.loss_mask[part], num_sequences=data.num_sequences,
            num_tokens=data.num_tokens, token_weights=_importance(data, part, logp if old is None else old), **loss_kwargs,
        )

    if not fused:
        logp, entropy = sequence_logprobs(model, ids, attn, P, chunk_rows, group, recompute, temperature, with_entropy=True)
        return (logp, entropy, *loss_of(logp, 0, logp.shape[0]))
    head = causal_lm(model).get_output_embeddings()
    sink, embed = _tied_embedding(model, head.weight)
    with gated_mlps(model, enabled=not is_checkpointing(model)):  # a checkpoint's recompute must match
        hidden = completion_hidden(model, ids, attn, P, group, embed)
    loss, logp, entropy, stats = head_loss(
        hidden, head.weight, ids[:, P:], loss_of, chunk_rows, head.bias, temperature, sink, loss_scale
    )
    return logp, entropy, loss, stats


def _importance(data: GRPOBatch, part: slice, old_logp: Tensor) -> Tensor | None:
    """The importance weights of rows ``part`` ([n, C] or [n, 1]; None without a correction), kept for the log.

    ``old_logp`` [n, C]: the trainer's log-probs under the weights that sampled (the first update's, detached).
    """
    rollout = data.rollout
    if rollout.importance_sampling is None or rollout.sample_logprobs is None:
        return None
    mask = rollout.completion_mask[part]
    weights = importance_weights(old_logp, rollout.sample_logprobs[part], mask, rollout.importance_sampling)
    data.importance_ratios.append(ratio_values(weights, mask))
    return weights


def _tied_embedding(model: Any, head_weight: Tensor) -> tuple[TiedWeightGrad | None, Callable | None]:
    """(sink, embedding lookup) that gather the tied weight's two gradients in one buffer, or (None, None).

    Only for a trained weight that a plain ``nn.Embedding`` shares with the head: an embedding with its own
    forward (scaled, say), max_norm, frequency scaling or sparse gradients keeps the decoder's own lookup.
    """
    emb = causal_lm(model).get_input_embeddings()
    plain = type(emb) is torch.nn.Embedding and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse
    if not (plain and emb.weight is head_weight and head_weight.requires_grad):
        return None, None
    sink = TiedWeightGrad()
    return sink, lambda ids: tied_embedding(ids, emb.weight, emb.padding_idx, sink)
