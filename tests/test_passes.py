"""Every pass over the policy runs inside one of the root module's passes (:class:`~grpo_lightning.hf.passes.PolicyPasses`).

A sharding wrapper gathers weights around the root's passes (registered as forward methods), so a weight
read outside them would be a shard. A torch-function mode records each torch call that takes one of the
policy's (or the reference's) parameters while no root pass is running, through a real training step: sampling with the shared-prompt
prefill, the reference pass, μ = 2 updates (the old policy's log-probs from the first) and their backward
passes. The optimizer's step, gradient clipping and zeroing read the weights by design, outside any pass.
"""

from __future__ import annotations

import traceback
from typing import Any

import lightning as L
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from grpo_lightning.hf.passes import PASSES, PolicyPasses
from grpo_lightning.train.cli import run
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Loss, Sampling
from test_train import make_config

QUIET = ["--eval.before", "false", "--eval.after", "false", "--torch_threads", "1", "--trainer.max_steps", "2"]


class OutsideReads(TorchFunctionMode):
    """Torch calls that take a watched parameter while no root pass runs and nothing excuses them."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.ids = {id(p) for p in params}
        self.inside = self.excused = 0
        self.found: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        metadata = getattr(func, "__name__", "") == "__get__"  # .shape, .device, .dtype: no weight is read
        if not (self.inside or self.excused or metadata):
            if any(id(a) in self.ids for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)):
                where = [f for f in traceback.extract_stack() if "grpo_lightning" in f.filename]
                self.found.append(f"{getattr(func, '__qualname__', func)} at {where[-1].filename}:{where[-1].lineno}" if where else str(func))
        return func(*args, **kwargs)


class RecordReads(L.Callback):
    """Watches the policy's and the reference's parameters during every ``training_step``."""

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        params = list(module.policy.parameters()) + list(module.reference.parameters() if module.reference else [])
        self.mode = mode = OutsideReads(params)
        self.steps = 0
        self.passes = {name: getattr(PolicyPasses, name) for name in PASSES}

        def inside(method: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                mode.inside += 1
                try:
                    return method(*args, **kwargs)
                finally:
                    mode.inside -= 1
            return counted

        for name, method in self.passes.items():
            setattr(PolicyPasses, name, inside(method))
        step = module.training_step

        def watched_step(*args: Any) -> Any:
            self.steps += 1
            with mode:
                return step(*args)

        module.training_step = watched_step
        module._clip_gradients = self.excusing(module._clip_gradients)  # rescales gradients: the optimizer's side
        module.guard.allow_step = self.excusing(module.guard.allow_step)

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        for optimizer in (module.optimizers(), module.optimizers().optimizer):  # Lightning's wrapper and the optimizer
            optimizer.step, optimizer.zero_grad = self.excusing(optimizer.step), self.excusing(optimizer.zero_grad)

    def excusing(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.mode.excused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.mode.excused -= 1

        return call

    def teardown(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        for name, method in self.passes.items():
            setattr(PolicyPasses, name, method)


@pytest.mark.parametrize("fused", [True, False])
def test_no_parameter_is_read_outside_a_root_pass(tmp_path, tiny_model_dir, gsm8k_dir, fused):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "passes", optimization={"mu": 2}, loss={"beta": 0.04}, fast=fused)
    cli = run(["fit", "--config", str(config), *QUIET, "--trainer.callbacks+=test_passes.RecordReads"])
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, RecordReads))
    assert recorder.steps == 1 and cli.trainer.global_step == 2  # one rollout step, μ = 2 updates ran
    assert sorted(set(recorder.mode.found)) == []


def test_the_mode_sees_a_read_outside_the_root():
    weight = torch.nn.Parameter(torch.ones(2, 2))
    root = PolicyPasses(torch.nn.Linear(2, 2))
    mode = OutsideReads([weight, root.model.weight])
    with mode:
        torch.matmul(torch.ones(1, 2), weight)
        _ = weight.shape  # metadata only
    assert len(mode.found) == 1 and "matmul" in mode.found[0]


def test_the_roots_add_no_state_dict_keys(tiny_model_dir):
    """A checkpoint's weights are ``policy.*`` and ``reference.*`` as before: the pass roots are not children."""
    module = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2))
    module.passes  # made on first use
    names = {f"policy.{k}" for k in module.policy.state_dict()} | {f"reference.{k}" for k in module.reference.state_dict()}
    assert set(module.state_dict()) == names
    assert sum(1 for _ in module.parameters()) == 2 * sum(1 for _ in module.policy.parameters())


def test_the_root_has_no_forward_and_its_passes_are_typed(tiny_model_dir):
    root = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2), loss=Loss(beta=0)).passes
    with pytest.raises(TypeError, match="call one of its passes, prefill, generate, logprobs, loss"):
        root(torch.zeros(1, 2, dtype=torch.long))
    assert all(callable(getattr(root, name)) for name in PASSES)
