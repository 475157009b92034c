"""The GRPO update: μ optimizer steps on one rollout, in one loop (the README's "One GRPO step").

Each of the μ updates takes this process's rows ``rows_per_update`` at a time. For each chunk the policy's
root runs its loss pass (:meth:`~grpo_lightning.hf.passes.PolicyPasses.loss`): the decoder, then the LM
head, which calls the loss handed to it, :func:`rows_loss` (:func:`~grpo_lightning.core.loss.grpo_loss` of
those rows), while each piece of rows' logits exists; then the chunk's backward pass. After the last
chunk: clip the gradients, and step, unless the guard skips a non-finite step.

The first update runs on the weights that sampled the rollout, so its log-probs, detached, are the old
policy's: later updates take their ratio against them (at μ = 1 the ratio is exactly 1). Each chunk's loss
and statistics are already its part of the step's (the denominators are the step's counts), so they are
summed: the gradient is that of the uncut step.

With several processes each one runs its own rows; the denominators count every process's rows, so the
parts sum over processes too. DDP and FSDP average gradients over processes, hence the loss is scaled by
their number, and every chunk but the last skips the gradient reduction (one per optimizer step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.core.importance import ratio_values
from grpo_lightning.core.loss import grpo_loss, token_mean_part
from grpo_lightning.core.step import token_weights
from grpo_lightning.core.types import GRPOBatch
from grpo_lightning.train.distributed import gradient_scale, no_backward_sync, sum_over_processes
from grpo_lightning.train.precision import grad_scaler, loss_scale


@dataclass
class UpdateResult:
    """What the μ updates measured."""

    stats: dict[str, Tensor]  # the last update's loss, kl, ratio, clip fractions, entropy (whole step), grad_norm
    importance_ratios: Tensor | None  # [k] this process's importance-sampling ratios; None without a correction


def objective(loss: Any, sampling: Any) -> dict[str, Any]:
    """:func:`~grpo_lightning.core.loss.grpo_loss`'s options from ``model.loss`` and ``model.sampling``."""
    return {"clip_eps": loss.clip_eps, "beta": loss.beta, "epsilon_high": loss.epsilon_high,
            "loss_type": loss.loss_type, "max_new_tokens": sampling.max_new_tokens}


def rows_loss(
    logp: Tensor, start: int, stop: int, *, data: GRPOBatch, rows: slice, old_logp: Tensor | None,
    ratios: list[Tensor], **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of rows [start, stop) of ``rows`` (this process's rows of ``data``) from their log-probs [n, C].

    ``old_logp`` [N, C] covers all of this process's rows (``None`` at the first update); ``options`` go to
    :func:`~grpo_lightning.core.loss.grpo_loss` with the step's counts. The importance-sampling ratios used,
    when the rollout asks for a correction, are appended to ``ratios`` (the update's own list).
    """
    part = slice(rows.start + start, rows.start + stop)
    old = None if old_logp is None else old_logp[part]
    weights = token_weights(data.rollout, part, logp.detach() if old is None else old)  # [n, C] or [n, 1]
    if weights is not None:
        ratios.append(ratio_values(weights, data.rollout.completion_mask[part]))
    ref = None if data.ref_logp is None else data.ref_logp[part]
    return grpo_loss(
        logp, old, ref, data.advantages[part], data.loss_mask[part], num_sequences=data.num_sequences,
        num_tokens=data.num_tokens, token_weights=weights, **options,
    )


def chunk_loss(
    module: Any, data: GRPOBatch, rows: slice, old_logp: Tensor | None, ratios: list[Tensor], loss_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The policy's GRPO loss on this process's ``rows`` of ``data``: (loss, log-probs [n, C], entropies [n, C], stats).

    The root's loss pass runs the decoder, then the LM head, which calls :func:`rows_loss` on each piece of
    rows while its logits exist. ``loss_scale``: the GradScaler's factor for the coming backward pass.
    """
    s, r = module.sampling, data.rollout
    loss_fn = functools.partial(
        rows_loss, data=data, rows=rows, old_logp=old_logp, ratios=ratios, **objective(module.loss_options, s)
    )
    return module.passes.loss(
        r.input_ids[rows], r.attention_mask[rows], r.prompt_length, loss_fn, chunk_rows=module.memory.logprob_chunk_rows,
        group=s.num_generations if s.share_prompt else 1, temperature=s.temperature, loss_scale=loss_scale,
    )


def grpo_update(module: Any, data: GRPOBatch) -> UpdateResult:
    """μ optimizer steps of ``module`` (a :class:`~grpo_lightning.train.module.GRPOModule`) on one rollout."""
    mu, per = module.optimization.mu, module.memory.rows_per_update
    optimizer, scheduler, strategy = module.optimizers(), module.lr_schedulers(), module._strategy
    mask = data.loss_mask
    n, per = mask.shape[0], per or mask.shape[0]  # this process's rows, rows per chunk
    scaler = grad_scaler(module._trainer)  # fp16's GradScaler, or None
    scale = gradient_scale(strategy)
    old_logp = torch.zeros(mask.shape, device=module.device) if mu > 1 else None  # [n, C]
    ratios: list[Tensor] = []
    totals: dict[str, Tensor] = {}
    for update in range(mu):  # (no gradients here: each step ends by freeing its own)
        totals = {}
        for start in range(0, n, per):
            rows = slice(start, start + per)
            last = start + per >= n  # the chunk whose backward reduces the accumulated gradients
            with no_backward_sync(strategy, enabled=not last, root=module.passes):
                # log-probs of these rows from the root's loss pass, and grpo_loss of them (rows_loss)
                loss, logp, entropy, stats = chunk_loss(
                    module, data, rows, None if update == 0 else old_logp, ratios, loss_scale(scaler)
                )
                if update == 0 and old_logp is not None:
                    old_logp[rows] = logp.detach()  # the old policy's log-probs
                module.manual_backward(loss if scale == 1 else loss * scale)
            stats = {"loss": loss.detach(), **stats, "entropy": token_mean_part(entropy, mask[rows], data.num_tokens)}
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        if scaler is None:  # (a GradScaler's gradients are clipped once unscaled, in the step's hook)
            module._clip_gradients()
        # a non-finite loss or norm skips the step (a GradScaler skips its own overflows: the loss is judged)
        if not module.guard.allow_step(module.trainer, totals["loss"], None if scaler else module._grad_norm):
            optimizer.zero_grad()  # skipped: weights, Adam's state and step count, scheduler all unchanged
            continue
        optimizer.step()
        # Autocast may have cached bf16 casts of the weights the step just changed in place (Lightning < 2.6
        # keeps its cache on): the next update must read the new weights.
        torch.clear_autocast_cache()
        optimizer.zero_grad()  # the gradients are spent: sampling and the next forward pass reuse their memory
        if scheduler is not None:
            scheduler.step()
    # statistics of the last of the μ updates, whole step (the norm is already every process's gradients')
    stats = {**sum_over_processes(strategy, totals), "grad_norm": module._grad_norm}
    return UpdateResult(stats, torch.cat(ratios) if ratios else None)
