"""The gated MLP of Qwen2 / Llama-style decoders, down_proj(silu(gate_proj(x)) · up_proj(x)), with its own backward.

Under autograd the plain module keeps five [T, I] or [T, H] tensors per layer for the backward pass: its
input, gate_proj's output (for SiLU), SiLU's output and up_proj's output (for the product), and the product
(for down_proj). :class:`GatedMLP` keeps the input, the gate and the up projection, and recomputes SiLU and
the product in the backward pass, which are elementwise and cheap: two [T, I] tensors fewer per layer
(I = 4,864 for Qwen2.5-0.5B: 26.5 MiB per layer for the 682 positions of one update of benchmark setting
(a)). Its products without a graph of their own (all of them, here) use :mod:`grpo_lightning.fast.kernels`.

:func:`gated_mlps` switches it on for the layers it applies to (plain bias-free ``nn.Linear`` projections,
SiLU), for the forward passes run inside it; a layer with LoRA adapters, or a model with activation
checkpointing on (its recomputation would not match), keeps the module's own forward.

Under autocast (``bf16-mixed``) the forward's products run in bf16 as ``nn.Linear``'s would, and the
backward pass runs under the autocast state its forward recorded, whatever surrounds it: its products then
take bf16 gradients and fp32 weights alike, as autograd's own backward of ``nn.Linear`` under autocast does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo_lightning.fast.kernels import autocast_as, autocast_state, linear, times_weight


def flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])  # [.., n] → [T, n]


class GatedMLP(torch.autograd.Function):
    """(x [.., H], W_gate [I, H], W_up [I, H], W_down [H, I]) → down(silu(gate x) · up x) [.., H]."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        gate, up = linear(x, w_gate), linear(x, w_up)  # [.., I] each
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate, up)
        ctx.amp = autocast_state(x.device.type)
        return linear(F.silu(gate) * up, w_down)

    @staticmethod
    def backward(ctx, dy):
        with autocast_as(ctx.amp):
            return GatedMLP._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, w_gate, w_up, w_down, gate, up = ctx.saved_tensors
        act = F.silu(gate)  # recomputed, [.., I]
        da = times_weight(dy, w_down)  # [.., I]
        d_down = flat(dy).t() @ flat(act * up) if ctx.needs_input_grad[3] else None  # [H, I]
        d_up = act.mul_(da)  # (act is spent)
        # silu'(g)·(da·up) in one elementwise pass, written over da: one [T, I] buffer fewer, one read of g
        d_gate = torch.ops.aten.silu_backward.grad_input(da.mul_(up), gate, grad_input=da)
        dx = times_weight(d_gate, w_gate) + times_weight(d_up, w_up) if ctx.needs_input_grad[0] else None
        d_gate_w = flat(d_gate).t() @ flat(x) if ctx.needs_input_grad[1] else None  # [I, H]
        d_up_w = flat(d_up).t() @ flat(x) if ctx.needs_input_grad[2] else None
        return dx, d_gate_w, d_up_w, d_down


def _is_silu(act: Any) -> bool:
    # transformers 5 has its own SiLUActivation module (F.silu); earlier releases use torch's nn.SiLU
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _applies(mlp: torch.nn.Module) -> bool:
    projections = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(type(p) is torch.nn.Linear and p.bias is None for p in projections) and _is_silu(getattr(mlp, "act_fn", None))


def _forward(mlp: torch.nn.Module, x: Tensor) -> Tensor:
    return GatedMLP.apply(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)


@contextmanager
def gated_mlps(model: Any, enabled: bool = True) -> Iterator[None]:
    """Forward passes inside run every gated MLP of ``model`` it applies to through :class:`GatedMLP`."""
    mlps = [m for m in model.modules() if _applies(m)] if enabled else []
    for mlp in mlps:
        mlp.forward = _forward.__get__(mlp)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward
