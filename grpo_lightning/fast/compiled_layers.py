"""The update's decoder layers through ``torch.compile``: their elementwise work fused, forward and backward.

A decoder layer's products are a few large matrix products; the rest (the RMSNorms, rotary embeddings,
residual adds, SiLU and the gate's product, each with its backward) is some forty elementwise operators per
layer, each reading and writing whole [T, H] or [T, I] tensors and allocating a new one. inductor fuses
them into a few loops, forward and backward, and keeps fewer tensors for the backward pass. On the CPU
(bench/README.md) a 24-layer update of benchmark setting (a) took 7.5–7.6 s instead of 9.1–9.9 s, after
compiling for about 80 s in the first update (less with inductor's cache warm); a run's later updates
reuse what was compiled while their shapes vary.

:func:`compiled_layers` switches it on for the forward passes run inside it, as :func:`~grpo_lightning.fast.gated_mlp.gated_mlps`
does for the MLPs (it replaces them: inductor fuses the MLP too). One compiled function serves every layer:

- the layers' integer attributes (``layer_idx``) are not specialised on, or each layer would be compiled anew;
- the KV cache's ``update`` (the update's prompt pass shares a prompt's keys and values with its
  completions, :mod:`grpo_lightning.hf.passes`) runs outside the compiled graphs: its Python state would
  otherwise be guarded on, and compiled again, pass by pass.

A model under activation checkpointing keeps its layers' own forward (the recomputation would not match).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Compiles allowed per function: the update's two passes (prompts, completions), each with and without
# an attention mask, and shapes that meet by chance (a prompt as long as the completions) stay well within.
RECOMPILE_LIMIT = 32


@functools.cache
def _compiled_forward(layer_class: type) -> Callable:
    # cached: a new compiled function each update would compile again
    return torch.compile(layer_class.forward, dynamic=True)


@functools.cache
def _cache_update_outside(update: Callable) -> Callable:
    return torch.compiler.disable(update, recursive=True)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """transformers' decoder layers (``GradientCheckpointingLayer``) of ``model``, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@contextmanager
def compiled_layers(model: Any, enabled: bool = True) -> Iterator[None]:
    """Forward passes inside run ``model``'s decoder layers through one compiled forward per layer class."""
    from transformers.cache_utils import Cache

    layers = decoder_layers(model) if enabled else []
    if not layers:
        yield
        return
    for layer in layers:  # an instance attribute: nn.Module.__call__ finds it first
        layer.forward = types.MethodType(_compiled_forward(type(layer)), layer)
    own_update = Cache.__dict__["update"]
    Cache.update = _cache_update_outside(own_update)
    try:
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True, recompile_limit=RECOMPILE_LIMIT):
            yield
    finally:
        Cache.update = own_update
        for layer in layers:
            del layer.forward
