"""Per-token log-probs through the LM head with a hand-written backward: no logits kept between the passes.

For logits z = h·Wᵀ / T and log p = z[target] − logsumexp(z), the gradient of log p with respect to z is
onehot(target) − softmax(z). So for an upstream gradient g (one number per position):

    dz = g · (onehot − p) / T          [n, V], p = exp(z − lse)
    dh = dz · W                        [n, H]
    dW = Σ over chunks of dzᵀ · h      [V, H]

The forward pass keeps only the hidden states, the targets and one logsumexp per position ([N, C]);
the backward pass recomputes one chunk's logits at a time and turns them into dz in place. Compared with
checkpointing :func:`~grpo_lightning.core.logprobs._chunk_logprobs`, the backward recomputes only the product
(not the gather, logsumexp and entropy of the whole chunk function), keeps one [n, C, V] buffer per chunk
instead of autograd's chain of temporaries, and adds every chunk's weight gradient into one [V, H]
buffer with ``addmm_`` instead of returning a fresh [V, H] gradient per chunk for autograd to sum.

:class:`HeadLogProb` still takes four head products (forward, recompute, dh, dW): its backward cannot
know g before the loss exists. :class:`HeadLoss` takes the loss itself, computes g while a chunk's logits
exist and so needs three; the update uses it (:class:`MemorySafeHead`, on every device).

Precision. The head products run as autocast runs ``F.linear`` (bf16 or fp16 on a GPU, or ``bf16-mixed``
on the CPU), the softmax, logsumexp and entropy in fp32 (fp64 for fp64 weights). A backward pass that
computes runs under the autocast state its forward recorded. Under ``16-mixed`` the GradScaler multiplies
the loss by S before the backward pass, but :class:`HeadLoss` takes its gradients inside the forward pass:
it is told S (``loss_scale``) and forms its fp16 products on S-scaled values, as the backward pass would
have, so small gradients do not underflow; its backward then scales by the incoming gradient over S.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo_lightning.fast.gated_mlp import gated_mlps
from grpo_lightning.fast.kernels import autocast_as, autocast_state, linear, times_weight
from grpo_lightning.hf.models import causal_lm, is_checkpointing
from grpo_lightning.hf.passes import LossFn, PlainHead, completion_hidden


def _wide(weight: Tensor) -> torch.dtype:
    """The dtype the head's softmax runs in: fp32, or fp64 for fp64 weights (``trainer.precision: 64-true``)."""
    return torch.promote_types(weight.dtype, torch.float32)


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    z = linear(h, weight, bias).to(_wide(weight))  # [n, C, V]
    return z.div_(temperature) if temperature != 1.0 else z


def _add_chunk_grads(dz: Tensor, h: Tensor, weight: Tensor, rows: slice, dh: Tensor | None, dw: Tensor | None,
                     db: Tensor | None) -> None:
    """One chunk's share of the gradients, from its dz [n, C, V]: dh[rows] = dz·W, dW += dzᵀ·h, db += Σ dz."""
    if dh is not None:
        dh[rows] = times_weight(dz, weight)
    if dw is not None:
        dw.addmm_(dz.reshape(-1, dz.shape[-1]).t(), h.reshape(-1, h.shape[-1]))
    if db is not None:
        db += dz.sum((0, 1))


# A softmax block's two fp32 temporaries, p and p·z, take at most this many bytes each. Whole positions per
# block, not a fixed count: 8 positions of a 151,936-token vocabulary made 500 blocks of ~8 kernels each per
# [8, 500, V] chunk on a GPU; 128 MiB holds 220 of those positions (19 blocks).
SOFTMAX_BLOCK_BYTES = 128 << 20


def softmax_block_rows(rows: int, vocab: int, budget: int = SOFTMAX_BLOCK_BYTES) -> int:
    """Positions per block: the byte budget, and at most a quarter of the chunk, so that the two temporaries
    never exceed half the chunk's fp32 logits (under autocast, the size of the bf16 product freed just
    before). At least one position."""
    return max(1, min(budget // (4 * vocab), -(-rows // 4)))


def _softmax_in_place(z: Tensor, block: int | None = None) -> tuple[Tensor, Tensor]:
    """Turn logits z [n, C, V] into softmax(z) in place; return their logsumexp and entropy, [n, C] each.

    ``block`` positions at a time (default :func:`softmax_block_rows`), so no second [n, C, V] buffer ever
    exists (``torch.logsumexp`` and ``exp(z − lse)`` would each make one: 78 MiB for 2 rows × 64 tokens of
    Qwen2.5's vocabulary).
    H = lse − Σ p·z is taken from each block's p and z before p replaces z, as an elementwise product and a
    sum: fp32 even under autocast (a matmul there would run in bf16, off by up to 0.1 nat), and a summation
    that stays within 1e-5 nat over 151,936 entries (a fp32 row-by-column product drifted by 2e-3).
    """
    flat = z.view(-1, z.shape[-1])  # [n·C, V]
    block = block or softmax_block_rows(flat.shape[0], flat.shape[1])
    lse, entropy = flat.new_empty(flat.shape[0]), flat.new_empty(flat.shape[0])
    for start in range(0, flat.shape[0], block):
        zb = flat[start : start + block]
        m = zb.amax(-1, keepdim=True)
        p = (zb - m).exp_()  # [block, V]
        total = p.sum(-1, keepdim=True)
        p.div_(total)
        lse[start : start + block] = (m + total.log()).squeeze(-1)
        entropy[start : start + block] = lse[start : start + block] - (p * zb).sum(-1)
        zb.copy_(p)
    return lse.view(z.shape[:-1]), entropy.view(z.shape[:-1])


class HeadLogProb(torch.autograd.Function):
    """(hidden [N, C, H], weight [V, H], bias [V] | None, targets [N, C]) → (log-probs [N, C], entropies).

    Entropies ([N, C], no gradient) are computed only when asked for; otherwise an empty tensor comes back.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, with_entropy):
        N, C, _ = hidden.shape
        logp = torch.empty(N, C, dtype=_wide(weight), device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for start in range(0, N, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = _logits(hidden[rows], weight, bias, temperature)
            picked = z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
            lse[rows], chunk_entropy = _softmax_in_place(z)  # z is spent: the backward recomputes it
            logp[rows] = picked - lse[rows]
            if with_entropy:
                entropy[rows] = chunk_entropy
            del z  # the next chunk's logits reuse the memory
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk_rows, ctx.amp = temperature, chunk_rows, autocast_state(hidden.device.type)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        T, chunk_rows = ctx.temperature, ctx.chunk_rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None  # the one [V, H] buffer every chunk adds into
        db = torch.zeros_like(bias) if need_b else None
        with autocast_as(ctx.amp):  # the recomputed logits must be the forward's
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, scale = hidden[rows], grad_logp[rows].to(lse.dtype) / T  # [n, C, H], [n, C]
                dz = _logits(h, weight, bias, T).sub_(lse[rows].unsqueeze(-1)).exp_()  # p, in place
                dz.mul_(-scale.unsqueeze(-1)).scatter_add_(-1, targets[rows].unsqueeze(-1), scale.unsqueeze(-1))
                dz = dz.to(weight.dtype)  # a no-op in fp32; in half precision the products run as the forward's did
                _add_chunk_grads(dz, h, weight, rows, dh, dw, db)
                del dz
        return dh, dw, db, None, None, None, None


def head_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 2, bias: Tensor | None = None,
    temperature: float = 1.0, with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(h·Wᵀ / T)[target] for each position, with the hand-written backward of :class:`HeadLogProb`."""
    logp, entropy = HeadLogProb.apply(hidden, weight, bias, targets, temperature, chunk_rows, with_entropy)
    return (logp, entropy) if with_entropy else logp


class HeadLoss(torch.autograd.Function):
    """A loss of the per-token log-probs whose gradient is taken chunk by chunk inside the forward pass.

    ``loss_fn(logp [n, C], start, stop) -> (loss, stats)`` scores rows [start, stop) alone; the total loss is
    the sum over chunks, so the loss must split over rows with every other input fixed (the GRPO loss does:
    its denominators are the step's counts). Knowing the upstream gradient g while a chunk's logits exist
    saves the recompute: three head products (logits, dh, dW) instead of four. dh and dW wait on ``ctx``
    for the backward pass, which only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, loss_fn, side, sink, loss_scale):
        N, C, _ = hidden.shape
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros_like(bias) if need_b else None
        logp = torch.empty(N, C, dtype=_wide(weight), device=hidden.device)
        entropy, total, stats = torch.empty_like(logp), logp.new_zeros(()), {}
        for start in range(0, N, chunk_rows):
            rows, h, t = slice(start, start + chunk_rows), hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            z = _logits(h, weight, bias, temperature)  # [n, C, V]
            picked = z.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            lse, entropy[rows] = _softmax_in_place(z)
            logp[rows] = picked - lse
            p = z  # now softmax(z): the chunk's one [n, C, V] buffer
            with torch.enable_grad():  # forward passes of Functions run without grad mode
                x = logp[rows].detach().requires_grad_()
                loss, chunk_stats = loss_fn(x, start, start + h.shape[0])
                (g,) = torch.autograd.grad(loss, x)
            total += loss.detach()
            for key, value in chunk_stats.items():
                stats[key] = stats.get(key, 0) + value
            scale = g * (loss_scale / temperature)  # S-scaled, as the backward pass's incoming gradient will be
            dz = p.mul_(-scale.unsqueeze(-1)).scatter_add_(-1, t.unsqueeze(-1), scale.unsqueeze(-1)).to(weight.dtype)
            _add_chunk_grads(dz, h, weight, rows, dh, dw, db)
            del p, dz
        side.update(logp=logp, entropy=entropy, stats=stats)
        ctx.grads, ctx.sink, ctx.loss_scale = (dh, dw, db), sink, loss_scale
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("HeadLoss keeps its gradients for one backward pass only (retain_graph is not supported)")
        # in place: the buffers are this node's own, and a second [V, H] tensor is what the fusion avoids
        factor = grad_loss.item() / ctx.loss_scale  # the buffers already hold the loss scale S
        dh, dw, db = [None if g is None else g if factor == 1.0 else g.mul_(factor) for g in ctx.grads]
        ctx.grads = None  # a caller holding the loss must not keep the [V, H] buffer alive after the backward pass
        if ctx.sink is not None and dw is not None:  # the tied embedding's backward adds to it and hands it on
            ctx.sink.grad, dw = dw, None
        return dh, dw, db, None, None, None, None, None, None, None


def head_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, loss_fn: LossFn, chunk_rows: int = 2, bias: Tensor | None = None,
    temperature: float = 1.0, sink: TiedWeightGrad | None = None, loss_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """(loss, log-probs [N, C] detached, entropies [N, C], summed stats) of :class:`HeadLoss`.

    With a ``sink``, the weight's gradient goes there instead (see :class:`TiedWeightGrad`). ``loss_scale``:
    the factor S a GradScaler will multiply the loss by before the backward pass (1 without one).
    """
    side: dict = {}
    loss = HeadLoss.apply(hidden, weight, bias, targets, temperature, chunk_rows, loss_fn, side, sink, loss_scale)
    return loss, side["logp"], side["entropy"], side["stats"]


class TiedWeightGrad:
    """Where the LM head leaves its [V, H] weight gradient for the embedding that shares the weight.

    Plain autograd holds the head's [V, H] gradient and the embedding lookup's dense [V, H] gradient at the
    same time, then sums them: one extra [V, H] tensor at the peak of the backward pass (519 MiB for Qwen2.5's
    vocabulary in fp32). With a sink, :class:`HeadLoss` leaves its buffer here instead of returning it, and
    :class:`TiedEmbedding`'s backward, which runs after it (the embedding comes first in the forward pass),
    adds its rows into that buffer and returns it as the weight's one gradient.
    """

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class TiedEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` [..] → [.., H] whose weight gradient goes into the sink's buffer."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, sink):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx, ctx.sink = weight.shape, padding_idx, sink
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        dw = ctx.sink.grad if ctx.sink.grad is not None else grad.new_zeros(ctx.shape)
        ctx.sink.grad = None
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])  # [n], [n, H]
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            keep = ids != ctx.padding_idx
            ids, grad = ids[keep], grad[keep]
        dw.index_add_(0, ids, grad.to(dw.dtype))  # explicit: the gradient's dtype is autocast's, the buffer's fp32
        return None, dw, None, None


def tied_embedding(ids: Tensor, weight: Tensor, padding_idx: int | None, sink: TiedWeightGrad) -> Tensor:
    """The embedding lookup of :class:`TiedEmbedding`: [..] → [.., H]."""
    return TiedEmbedding.apply(ids, weight, padding_idx, sink)


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


class MemorySafeHead(PlainHead):
    """The LM head the trainer runs on every device: no pass holds full-vocabulary logits for all its rows.

    Log-probs whose backward recomputes each chunk (:class:`HeadLogProb`), and the update's loss gradient
    taken inside the head pass (:class:`HeadLoss`, with the tied embedding's two gradients in one buffer).
    :class:`~grpo_lightning.hf.passes.PlainHead` computes the same with autograd, keeping every chunk's
    logits for the backward pass (``tests/test_fast_switch.py`` holds them equal). ``fused_mlps``, one of
    ``model.fast``'s speed pieces, runs the update's gated MLPs through :class:`~grpo_lightning.fast.gated_mlp.GatedMLP`.
    """

    def __init__(self, fused_mlps: bool = True):
        self.fused_mlps = fused_mlps

    def logprobs(self, model: Any, hidden: Tensor, targets: Tensor, chunk_rows: int, temperature: float,
                 with_entropy: bool) -> Tensor | tuple[Tensor, Tensor]:
        head = causal_lm(model).get_output_embeddings()
        return head_logprobs(hidden, head.weight, targets, chunk_rows, head.bias, temperature, with_entropy)

    def loss(self, model: Any, ids: Tensor, attn: Tensor, P: int, group: int, loss_fn: LossFn, chunk_rows: int,
             temperature: float, loss_scale: float) -> tuple[Tensor, Tensor, Tensor, dict]:
        head = causal_lm(model).get_output_embeddings()
        sink, embed = _tied_embedding(model, head.weight)
        # (a checkpoint's recompute must match its forward: no fused MLPs under activation checkpointing)
        with gated_mlps(model, enabled=self.fused_mlps and not is_checkpointing(model)):
            hidden = completion_hidden(model, ids, attn, P, group, embed)
        return head_loss(hidden, head.weight, ids[:, P:], loss_fn, chunk_rows, head.bias, temperature, sink, loss_scale)
