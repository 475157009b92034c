"""FSDP2 under Lightning's ``ModelParallelStrategy``: which runs shard, and the sharding done in ``configure_model``.

``model.sharding`` (:class:`~grpo_lightning.hf.sharding.Sharding`) and ``trainer.strategy: ModelParallelStrategy``
go together: the options build the policy on the meta device, the strategy gives the processes and their
mesh. All W processes form one data-parallel group that each weight is sharded over (tensor parallelism is
not supported). Mixed precision is FSDP2's own (``model.sharding.param_dtype``), so the trainer's precision
stays ``32-true``: Lightning's autocast would cast a second time.
"""

from __future__ import annotations

from typing import Any

import torch

from grpo_lightning.hf.models import load_model_and_tokenizer
from grpo_lightning.hf.sharding import Sharding, is_sharded, materialize, shard

STRATEGY = "lightning.pytorch.strategies.ModelParallelStrategy"


def is_model_parallel(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def check_sharding(options: Sharding | None, strategy: Any, precision: str) -> bool:
    """Whether this run shards; one clear error for a strategy and options that do not go together."""
    if not is_model_parallel(strategy):
        if options is not None:
            raise ValueError(
                f"model.sharding shards the policy with FSDP2 and needs trainer.strategy: {STRATEGY} "
                f"(this run has {type(strategy).__name__}); remove model.sharding for DDP or one process"
            )
        return False
    if options is None:
        raise ValueError(
            f"trainer.strategy {type(strategy).__name__} shards the policy with FSDP2: set model.sharding "
            "(`sharding: {}` for its defaults; docs/several-gpus.md)"
        )
    if "mixed" in str(precision):
        raise ValueError(
            f"trainer.precision {precision} is Lightning's autocast; with model.sharding, mixed precision is FSDP2's "
            "own: set trainer.precision: 32-true and model.sharding.param_dtype: bfloat16"
        )
    return True


def data_mesh(mesh: Any) -> Any:
    """The 1-D mesh over every process (the dimension of Lightning's 2-D mesh that spans them all)."""
    for name in mesh.mesh_dim_names:
        if mesh[name].size() == mesh.size():
            return mesh[name]
    raise ValueError(
        f"tensor parallelism is not supported (device mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))}): use "
        f"{STRATEGY} with data_parallel_size equal to the number of processes and tensor_parallel_size 1"
    )


def full_checkpoint_state(name_or_path: str, dtype: str, **load: Any) -> dict[str, torch.Tensor]:
    """The checkpoint's weights and the model's buffers (rotary frequencies), read into host memory once."""
    model, _ = load_model_and_tokenizer(name_or_path, dtype, **load)
    return {**model.state_dict(), **dict(model.named_buffers())}


def configure_sharding(module: Any) -> None:
    """Shard the policy's root and the reference's root (each layer, then the root) and load their weights.

    Process 0 reads the checkpoint; every process then receives its shards. A second call (``validate``
    after ``fit``) finds the roots sharded and does nothing.
    """
    if module._trainer is None:  # (load_from_checkpoint calls the hook too: sharding waits for a trainer)
        return
    hp, trainer = module.hparams, module.trainer
    if not check_sharding(module.sharding, trainer.strategy, trainer.precision) or is_sharded(module.passes):
        return
    mesh = data_mesh(module.device_mesh)
    roots = [module.passes] + ([module.reference_passes] if module.reference is not None else [])
    for root in roots:
        shard(root, mesh, module.sharding, trains=root is module.passes)
    load = {k: hp[k] for k in ("attn_implementation", "revision", "trust_remote_code")}  # as the module loaded
    full = full_checkpoint_state(hp.model_name_or_path, hp.dtype, **load) if trainer.global_rank == 0 else {}
    for root in roots:
        materialize(root, full, trainer.strategy.root_device)
