"""FSDP2 over the policy and the reference: ``fully_shard`` on each decoder layer, then on the pass root.

Each process keeps 1/W of every weight (a ``DTensor`` shard); a module's forward gathers its layer's full
weights in FSDP2's pre-forward hook and frees them after. That is why every pass runs through the root of
:mod:`grpo_lightning.hf.passes`: the root owns what no layer does (the embedding, tied to the LM head, and the
final norm), so a weight read outside its passes would be a shard. Its passes are methods other than
``forward``: :func:`shard` registers each with ``register_fsdp_forward_method``, so that it gathers as a
forward does.

Three things differ from a plain module, and each has one function here:
- weights: the model is built on the meta device on every process; process 0 alone reads the checkpoint and
  :func:`materialize` sends each process its shards (one full copy in host memory, not W);
- ``generate`` calls the model once per new token: :func:`gathered` keeps the layers gathered for the whole
  rollout instead of gathering them at every step;
- gradient accumulation: :func:`gradient_sync` skips the reduce-scatter of every chunk but the last.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.hf.models import DTYPES, decoder

COMPUTE_DTYPES = {k: v for k, v in DTYPES.items() if k != "auto"}


@dataclasses.dataclass
class Sharding:
    """FSDP2 options (``model.sharding``); set them to shard with ``trainer.strategy: ModelParallelStrategy``.

    Args:
        param_dtype: Dtype the gathered weights are cast to for compute (``bfloat16`` on GPUs); ``None``
            computes in the weights' own dtype. The sharded master weights and Adam's state keep theirs.
        reduce_dtype: Dtype of the gradient reduce-scatter; ``None`` for ``param_dtype``.
        reshard_after_forward: Free each layer's gathered weights after its forward (gathered again for
            the backward): less memory, one more all-gather per layer and update.
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in COMPUTE_DTYPES:
                raise ValueError(f"model.sharding.{name} must be one of {sorted(COMPUTE_DTYPES)} or null, got {value!r}")

    def mixed_precision(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = {None: None, **COMPUTE_DTYPES}
        return MixedPrecisionPolicy(param_dtype=dtype[self.param_dtype], reduce_dtype=dtype[self.reduce_dtype])


def is_sharded(module: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(root: torch.nn.Module, mesh: Any, options: Sharding, trains: bool = True) -> None:
    """``fully_shard`` each decoder layer of ``root.model`` (its own all-gather group), then ``root``.

    A root that ``trains`` keeps its own weights gathered from the forward to the backward; the frozen
    reference's root, which has no backward, frees them after each pass.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from grpo_lightning.hf.passes import PASSES  # (here: the passes module imports this one)

    kwargs = {"mesh": mesh, "mp_policy": options.mixed_precision(), "reshard_after_forward": options.reshard_after_forward}
    for layer in decoder(root.model).layers:
        fully_shard(layer, **kwargs)
    # the root's own weights (embedding = LM head, final norm) serve the first and last step of every pass
    fully_shard(root, **{**kwargs, "reshard_after_forward": not trains})
    for name in PASSES:  # each pass gathers the root's weights (and frees them) as a forward would
        register_fsdp_forward_method(root, name)
    root.reshard_layers = options.reshard_after_forward  # what :func:`gathered` restores


def materialize(root: torch.nn.Module, full_state: dict[str, Tensor], device: torch.device) -> None:
    """Give a sharded root over a meta-device model its weights: process 0 holds ``full_state``, the others ``{}``.

    ``set_model_state_dict`` broadcasts each tensor from process 0 and keeps the local shard. Buffers that no
    state dict holds (the rotary frequencies) are broadcast too: on the meta device they have no values.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = root.model
    persistent = set(model.state_dict())
    root.to_empty(device=device)  # (DTensor parameters are swapped in place: tied weights stay one)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, {k: v for k, v in full_state.items() if k in persistent}, options=options)
    for name, buffer in model.named_buffers():
        if name not in persistent:
            if dist.get_rank() == 0:
                buffer.copy_(full_state[name])
            dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def gathered(root: torch.nn.Module) -> Iterator[None]:
    """Every sharded layer of ``root`` gathered once, kept for all the forwards inside, then freed."""
    layers = [m for m in root.modules() if is_sharded(m) and m is not root]
    if not layers:
        yield
        return
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
        layer.unshard()
    try:
        yield
    finally:
        for layer in layers:
            layer.reshard()
            layer.set_reshard_after_forward(getattr(root, "reshard_layers", True), recurse=False)


@contextlib.contextmanager
def gradient_sync(root: Any, enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, backward passes inside keep unsharded gradients and reduce nothing."""
    if enabled or not is_sharded(root):
        yield
        return
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def full_tensor(t: Tensor) -> Tensor:
    """A DTensor's whole value (a collective: every process calls it), a plain tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """``model``'s whole state on process 0 (CPU tensors), ``{}`` on the others; every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

