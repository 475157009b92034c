"""What the two-process tests run and record (importable by every process: the tests put tests/ on PYTHONPATH).

``python tests/ddp_probe.py PLAN.json`` runs each command of the plan through the ``grpo-lightning`` CLI in
this process; with ``--trainer.strategy ddp --trainer.devices 2`` Lightning's launcher starts the second
process by running the same command line again, so both processes run the same plan. :class:`Probe` saves
what each process ends with; :class:`FixedRollouts` replaces sampling by rows given in a file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from grpo_lightning.engines.vllm import policy_weights


def by_length(prompts, completions, **kwargs):
    """A reward that differs within groups: advantages are non-zero, the step moves the weights."""
    return [1.0 / (1 + len(c)) for c in completions]


def odd_lengths(prompts, completions, **kwargs):
    """A reward that applies to some completions only (``None`` elsewhere): its mean counts fewer rows."""
    return [float(len(c) % 3) if len(c) % 2 else None for c in completions]


class Probe(L.Callback):
    """Saves, per process, the policy's parameters, the metrics logged at each step and the gradient all-reduces.

    The all-reduces are counted with a DDP communication hook, which sees every gradient bucket DDP reduces:
    ``allreduces`` counts buckets, ``syncs`` the backward passes that reduced gradients at all (the passes whose
    last bucket was reduced). DDP's first backward cuts the gradients into more buckets (its first is capped at
    1 MB) than the later ones, after it has rebuilt them.
    """

    def __init__(self, out: str):
        self.out = Path(out)
        self.allreduces = 0
        self.syncs = 0
        self.logged: list[dict[str, float]] = []

    def on_fit_start(self, trainer: L.Trainer, module: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        def counting_hook(state, bucket):  # no annotations: DDP checks them
            self.allreduces += 1
            self.syncs += bucket.is_last()
            return allreduce_hook(None, bucket)

        self.initial = full_weights(module.policy)
        self.local_bytes = {"params": local_bytes(module.policy.parameters()), "full": full_bytes(module.policy.parameters())}
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(None, counting_hook)

    def on_before_optimizer_step(self, trainer: L.Trainer, module: Any, optimizer: Any) -> None:
        self.local_bytes["grads"] = local_bytes(p.grad for p in module.policy.parameters() if p.grad is not None)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.logged.append({k: float(v) for k, v in trainer.logged_metrics.items()})

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = module.optimizers().optimizer.state.values()
        self.local_bytes["adam"] = local_bytes(t for s in state for k, t in s.items() if k != "step")
        torch.save(
            {
                "initial": self.initial,
                "params": full_weights(module.policy),
                # what the vLLM engine would push: the Hugging Face names, each weight whole
                "pushed": {k: v.clone() for k, v in policy_weights(module.policy)},
                "local_bytes": self.local_bytes,
                "allreduces": self.allreduces,
                "syncs": self.syncs,
                "global_step": trainer.global_step,
                "logged": self.logged,
                "world_size": trainer.world_size,
                "precision": trainer.precision,
                "fused": module.optimizers().optimizer.defaults.get("fused"),
                # what a recording engine (grpo_lightning.engines.RecordingEngine) sampled, step by step
                "completions": [r.completions for r in getattr(module.engine, "rollouts", [])],
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def full_weights(model: Any) -> dict[str, torch.Tensor]:
    """Copies of ``model``'s weights, gathered from their shards under FSDP2 (every process must call it)."""
    from grpo_lightning.hf.sharding import full_tensor

    return {k: full_tensor(v.detach()).clone() for k, v in model.state_dict().items()}


def local_bytes(tensors: Any) -> int:
    """Bytes this process holds of ``tensors``: the local shard of a DTensor, all of a plain tensor."""
    locals_ = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in locals_)


def full_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CudaKernelsOnly(L.Callback):
    """Switches the CPU-only oneDNN kernels off in this process from its construction on, as on CUDA."""

    def __init__(self) -> None:
        torch.backends.mkldnn.is_available = lambda: False


class FixedRollouts(L.Callback):
    """Every step samples nothing: process r gets its share of the rows saved in ``path`` (a dict of a Rollout).

    Process r of W takes the r-th of W equal row blocks, whole groups each, so W processes together hold the
    rows that one process holds alone.
    """

    def __init__(self, path: str):
        self.path = path

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        from grpo_lightning.core.types import Rollout
        from grpo_lightning.engines.replay import ReplayEngine

        saved = torch.load(self.path, weights_only=False)
        W, r = trainer.world_size, trainer.global_rank
        n = len(saved["completions"]) // W
        rows = slice(r * n, (r + 1) * n)
        share = Rollout(**{k: v[rows] if isinstance(v, (torch.Tensor, list)) else v for k, v in saved.items()})
        module.engine = ReplayEngine([share] * (trainer.max_steps or 1))  # the same rows at every step


if __name__ == "__main__":
    from grpo_lightning.train.cli import run

    for args in json.loads(Path(sys.argv[1]).read_text()):
        if isinstance(args, dict):  # a config of configs/: test_configs' run, checked by rank 0
            from test_configs import check_grpo_run, run_grpo

            if args["kernels_off"]:
                CudaKernelsOnly()
            cli, config, overrides = run_grpo(Path(args["config"]), Path(args["tmp"]))
            if cli.trainer.is_global_zero:
                check_grpo_run(cli, config, overrides)
            continue
        run(args)
