"""The KL reference, in one of three kinds: a frozen copy of the policy, the policy with its adapters off, or none.

- A frozen copy (full fine-tuning, β ≠ 0): taken at the start and, with ``ref_update_every``, refreshed from
  the policy every N steps (the seed's outer iterations, which may also clear the optimizer's state).
- The policy with its LoRA adapters switched off: the base model, which never changes, costs no second copy.
- None at β = 0: the loss has no KL term, and no reference pass runs.

Its passes need no graph, so with ``model.fast`` their fp32 CPU products run through oneDNN
(:mod:`grpo_lightning.fast.kernels`) and their CPU buffers stay in glibc's heap meanwhile.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.fast.allocator import MAX_THRESHOLD, heap_kept
from grpo_lightning.fast.kernels import onednn_linears
from grpo_lightning.hf.lora import adapters_off
from grpo_lightning.hf.models import causal_lm
from grpo_lightning.hf.passes import PolicyPasses


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with no trainable parameter: the KL reference."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def build_reference(policy: Any, beta: float, lora: Any) -> torch.nn.Module | None:
    """The frozen copy the module holds, or None (β = 0, or LoRA: the adapters-off policy is the reference)."""
    return None if beta == 0 or lora is not None else frozen_copy(policy)


@contextlib.contextmanager
def _fast_pass(model: Any) -> Iterator[None]:
    """oneDNN's products, and every buffer of the pass below glibc's largest threshold kept in the heap
    (:func:`~grpo_lightning.fast.allocator.heap_kept`, trimmed after; only where a CPU run fixed the threshold):
    a pass without a graph holds little at once, and mapping each [T, I] temporary afresh faults its pages in
    again (a 24-layer log-prob pass of bench setting (a): median 5.68 → 5.28 s over 5 alternations; the peak
    is the update's, unchanged)."""
    with onednn_linears(model), heap_kept(MAX_THRESHOLD):
        yield


@contextlib.contextmanager
def _base_model(policy: Any, fast: bool) -> Iterator[None]:
    with adapters_off(policy), _fast_pass(causal_lm(policy)) if fast else contextlib.nullcontext():
        yield


@torch.no_grad()
def reference_logprobs(
    reference: PolicyPasses | None, policy: PolicyPasses, beta: float, logprobs: Callable[[PolicyPasses, Any], Tensor],
    fast: bool = True,
) -> Tensor | None:
    """The reference's per-token log-probs [N, C] through ``logprobs(root, inside)``; None at β = 0.

    ``reference`` and ``policy`` are the roots of the frozen copy and of the policy; ``inside`` is what their
    forward enters (oneDNN products when ``fast``, and for the policy its adapters switched off).
    """
    if beta == 0:
        return None
    if reference is not None:
        return logprobs(reference, _fast_pass(reference.model) if fast else None)
    return logprobs(policy, _base_model(policy.model, fast))


def refresh_reference(reference: torch.nn.Module | None, policy: torch.nn.Module, step: int, every: int) -> bool:
    """Copy the policy into the frozen reference at every ``every``-th step after the first; whether it did."""
    if reference is None or not every or step == 0 or step % every:
        return False
    reference.load_state_dict(policy.state_dict())
    return True
