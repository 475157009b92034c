"""Half-precision weights and small learning rates: which optimizer steps round away.

Adding a step s to a weight w stored in a float format gives back w whenever |s| is at most half the
spacing of the representable numbers around w, and that spacing is eps · 2^floor(log2 |w|) (eps = 2^-7 for
bfloat16, 2^-10 for float16, 2^-23 for float32). Adam's step is about lr in size whatever the gradient, so
with bfloat16 weights of magnitude 0.02 (spacing 2^-13 ≈ 1.2e-4) a step of 5e-6 changes nothing: the seed's
GPU settings (bf16 weights, lr 5e-6) leave most weights where they started. fp32 master weights with bf16
compute (``trainer.precision: bf16-mixed``, ``model.dtype: float32``) avoid it.

The second half holds what the step needs under mixed precision: the autocast state that the custom
autograd Functions restore in their backward passes, the GradScaler's loss scale (``16-mixed``), and
gradient-norm clipping that works with fused optimizers and sharded gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

HALF_DTYPES = (torch.bfloat16, torch.float16)
STALL_WARN_FRACTION = 0.5  # warn when at least this share of the trainable weights cannot move


def stalled(weight: Tensor, step: float) -> Tensor:
    """Bool mask of the entries of ``weight`` that adding ``±step`` in ``weight.dtype`` leaves unchanged.

    |w| = m · 2^e with m in [0.5, 1) (``frexp``), so floor(log2 |w|) = e − 1 and half the spacing is
    eps / 2 · 2^(e − 1). Zero never stalls (the spacing there is tiny). Going down from an exact power of two
    the spacing halves; that edge is ignored.
    """
    eps = torch.finfo(weight.dtype).eps
    _, exponent = torch.frexp(weight.detach().float())
    half_spacing = torch.ldexp(torch.full_like(exponent, eps / 2, dtype=torch.float32), exponent - 1)
    return (abs(step) <= half_spacing) & (weight != 0)


def stalled_fraction(params: Iterable[Tensor], step: float) -> float:
    """Share of all entries of ``params`` that a step of size ``step`` cannot change (0 for none)."""
    total = frozen = 0
    for p in params:
        total += p.numel()
        frozen += int(stalled(p, step).sum())
    return frozen / total if total else 0.0


def rounding_warning(groups: Iterable[dict]) -> str | None:
    """One message when the optimizer's half-precision weights would mostly not move at their learning rate.

    ``groups`` are an optimizer's ``param_groups`` (``params`` and ``lr`` each).
    """
    worst: tuple[float, float, torch.dtype] | None = None
    for group in groups:
        half = [p for p in group["params"] if p.requires_grad and p.dtype in HALF_DTYPES]
        if not half:
            continue
        fraction = stalled_fraction(half, group["lr"])
        if worst is None or fraction > worst[0]:
            worst = (fraction, group["lr"], half[0].dtype)
    if worst is None or worst[0] < STALL_WARN_FRACTION:
        return None
    fraction, lr, dtype = worst
    return (
        f"the trainable weights are {str(dtype).removeprefix('torch.')}, and an optimizer step of lr={lr:g} is below "
        f"half their rounding step for {fraction:.0%} of them: those weights will not change. Keep fp32 master "
        "weights instead (model.dtype: float32 with trainer.precision: bf16-mixed, which still computes in "
        "bf16), or raise the learning rate."
    )


# --- mixed precision in the step: autocast state, loss scaling and clipping -------------------------------


def grad_scaler(trainer: Any) -> Any:
    """The ``GradScaler`` of the trainer's precision (``16-mixed``); None for every other precision."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def loss_scale(scaler: Any) -> float:
    """The factor the scaler multiplies the loss by in the coming backward pass (1 without one)."""
    return 1.0 if scaler is None else float(scaler.get_scale())


def clip_grad_norm(params: list[Tensor], max_norm: float, root: Any = None) -> Tensor:
    """The gradients' total 2-norm, after scaling them down to ``max_norm`` when it is positive.

    Lightning's own clipping cannot serve here: ``MixedPrecision.clip_gradients`` refuses a fused optimizer
    and ``FSDPPrecision.clip_grad_by_norm`` refuses norm clipping. torch's ``clip_grad_norm_`` takes the norm
    over DTensor shards (FSDP2) as one tensor. FSDP1's flat shards need their root's own method (``root``, when
    it is an FSDP module; not run on this project's test machines, which have no GPU).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        return root.clip_grad_norm_(max_norm if max_norm > 0 else float("inf"))
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=None)
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm of DTensor shards is a DTensor; its value is every shard's
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=None)
    return norm
