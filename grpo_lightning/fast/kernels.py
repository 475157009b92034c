"""oneDNN's linear kernel for the fp32 products on the CPU that need no autograd graph.

torch's CPU ``F.linear`` and ``@`` go to a GEMM that runs well below what the machine allows on the shapes
of this workload; bench/README.md has the measured times of both.

Values agree within float rounding (relative 1e-6). The kernel has no backward, so it serves what runs
without a graph: decoding, the reference pass, and the products inside the LM head's own autograd
functions. Everything else, other dtypes and devices, and anything under autocast (``bf16-mixed``: the
products then run in bf16, as on a GPU) keep torch's ``F.linear``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_applies(x: Tensor, weight: Tensor) -> bool:
    # Under autocast the product must run as autocast runs it (bf16 or fp16, as on a GPU): the kernel steps aside.
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (not needs_graph and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and onednn_available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [.., in] · Wᵀ [in, out] + b → [.., out], through oneDNN where it applies."""
    if _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def times_weight(x: Tensor, weight: Tensor) -> Tensor:
    """x [.., out] · W [out, in] → [.., in] (a linear layer's input gradient), through oneDNN where it applies."""
    if _onednn_applies(x, weight):  # oneDNN reads Wᵀ through its strides: no copy of W
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.t(), None, "none", [], "")
    return x @ weight


class OneDNNLinear(torch.nn.Module):
    """Stands in for an ``nn.Linear`` while no graph is needed: the same weight, multiplied by oneDNN.

    ``packed_rows`` reorders the weight into oneDNN's own layout for products of about that many rows: a
    copy of the weight, as long as this module lives (worth it while decoding: 8 rows through the LM head
    take 18–22 ms instead of 34). The wrapped layer's ``weight`` and ``bias`` stay reachable (peft reads them).
    """

    def __init__(self, layer: torch.nn.Linear, packed_rows: int | None = None):
        super().__init__()
        self.layer = layer
        w = layer.weight.detach()
        self.kernel_weight = torch.ops.mkldnn._reorder_linear_weight(w, packed_rows) if packed_rows else w

    @property
    def weight(self) -> Tensor:
        return self.layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.layer.bias

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("OneDNNLinear has no backward: use it only where no graph is built")
        if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):  # autocast's own product, as on a GPU
            return self.layer(x)
        bias = None if self.layer.bias is None else self.layer.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.kernel_weight, bias, "none", [], "")


@contextmanager
def onednn_linears(model: Any, packed_rows: int | None = None) -> Iterator[None]:
    """Every fp32 CPU ``nn.Linear`` of ``model`` runs through :class:`OneDNNLinear` meanwhile, then is put back.

    ``packed_rows`` reorders the LM head's weight and every trainable one for products of that many rows (the
    rows of a decoding step): at 24 layers 0.4 s of copies saved 0.1–1.0 s of 64 steps of 8 rows, measured
    in alternated pairs (bench/README.md). The copies live for the duration and are no larger than the
    gradients an update holds (freed before sampling), so sampling does not raise a run's peak; frozen weights
    (a LoRA's base layers) are used as they are. For passes without gradients only; where torch has no oneDNN
    (some non-x86 builds), or under autocast (whose bf16 or fp16 products are what a GPU runs), this does nothing.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps = []
    if onednn_available() and not torch.is_autocast_enabled("cpu"):
        for parent in model.modules():
            for name, child in parent.named_children():
                w = getattr(child, "weight", None)
                # (a DTensor weight is a shard, gathered only inside its layer's forward: FSDP2 runs it as is)
                plain = type(w) in (torch.Tensor, torch.nn.Parameter)
                if type(child) is torch.nn.Linear and plain and w.device.type == "cpu" and w.dtype == torch.float32:
                    packed = packed_rows if child is head or w.requires_grad else None
                    swaps.append((parent, name, child, OneDNNLinear(child, packed)))
    for parent, name, _, replacement in swaps:
        setattr(parent, name, replacement)
    try:
        yield
    finally:
        for parent, name, layer, _ in swaps:
            setattr(parent, name, layer)


def autocast_state(device_type: str) -> tuple[str, torch.dtype, bool]:
    """(device type, dtype, enabled) of autocast now: what a custom autograd Function's forward ran under."""
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


def autocast_as(state: tuple[str, torch.dtype, bool]) -> torch.autocast:
    """Autocast as recorded by :func:`autocast_state`, for a backward pass to compute as its forward did.

    (``torch.amp.custom_bwd`` does the same for one device type fixed when the Function is defined; these
    Functions run on whatever device the model is on.) Casts are not cached: the weights change in place.
    """
    device_type, dtype, enabled = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)
