"""The GPU config's settings, run on the CPU as a GPU would run them: oneDNN off, bf16-mixed or fp16 autocast.

Each run is ``configs/qwen2.5-0.5b-gsm8k.yaml`` with only what the CPU needs overridden (test_configs), so
its fused Adam, clipping at 0.1, gradient checkpointing and loss options are the ones under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.plugins.precision import MixedPrecision
import torch
import yaml

from grpo_lightning.hf.models import load_model_and_tokenizer
from grpo_lightning.train import distributed, module as module_file
from grpo_lightning.train.cli import run
from test_configs import TINY, args_of, grpo_overrides

GPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-0.5b-gsm8k.yaml"
FP16_PLUGIN = {
    "class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
    "init_args": {"precision": "16-mixed", "device": "cpu",
                  "scaler": {"class_path": "torch.amp.GradScaler", "init_args": {"device": "cpu"}}},
}


class Record(L.Callback):
    """Keeps each step's logged metrics and the autocast state the updates ran under."""

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []
        self.autocast: set[tuple[bool, torch.dtype]] = set()

    def on_train_batch_start(self, trainer, module, *args) -> None:
        update = module._update

        def recorded(data):
            self.autocast.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return update(data)

        module._update = recorded

    def on_train_batch_end(self, trainer, *args) -> None:
        self.logged.append({k: float(v) for k, v in trainer.logged_metrics.items()})


def moved_fraction(policy: torch.nn.Module) -> float:
    initial = load_model_and_tokenizer(TINY, "float32")[0].state_dict()
    now = policy.state_dict()
    return sum(int((now[k] != initial[k]).sum()) for k in initial) / sum(w.numel() for w in initial.values())


@pytest.fixture
def cuda_kernels_only(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)


def run_recorded(tmp: Path, *extra: str) -> tuple:
    overrides = grpo_overrides(yaml.safe_load(GPU_CONFIG.read_text()), tmp)
    cli = run(["fit", "--config", str(GPU_CONFIG), *args_of(overrides), "--eval.before", "false",
               "--eval.after", "false", "--trainer.callbacks+=test_gpu_path.Record", *extra])
    record = next(c for c in cli.trainer.callbacks if isinstance(c, Record))
    return cli, record


def test_one_step_at_the_seeds_lr_moves_every_fp32_weight_under_bf16_mixed(tmp_path, cuda_kernels_only):
    cli, record = run_recorded(tmp_path, "--trainer.max_steps", "1")
    assert record.autocast == {(True, torch.bfloat16)}
    assert cli.model.optimization.grad_clip == 0.1 and cli.model.optimizers().optimizer.defaults["fused"]
    assert moved_fraction(cli.model.policy) >= 0.99  # measured: 100%


def autocast_cache(cache: bool):
    """Autocast as Lightning's MixedPrecision enters it, with its weight-cast cache on (Lightning 2.4, 2.5) or off (2.6)."""
    def manager(self):
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.half
        return torch.autocast(self.device, dtype=dtype, cache_enabled=cache)

    return manager


def test_the_second_update_sees_the_first_ones_weights_whatever_the_autocast_cache(tmp_path, cuda_kernels_only,
                                                                                   monkeypatch):
    # μ = 2: the logged ratio is the second update's, exp(logp − old_logp) after one optimizer step. A bf16 cast
    # of a weight cached before that step would serve the second update the weight as it was (measured without
    # clearing the cache: ratios 1.017, 0.997 against 0.896, 0.830).
    runs = []
    for cache in (False, True):
        monkeypatch.setattr(MixedPrecision, "autocast_context_manager", autocast_cache(cache))
        cli, record = run_recorded(tmp_path / str(cache), "--model.optimization.mu", "2", "--trainer.max_steps", "4",
                                   "--model.optimizer.init_args.lr", "1e-3")
        assert record.autocast == {(True, torch.bfloat16)}
        runs.append(([step["ratio"] for step in record.logged], cli.model.policy.state_dict()))
    (ratios, weights), (cached_ratios, cached_weights) = runs
    assert len(ratios) == 2 and all(abs(r - 1) > 1e-4 for r in ratios), ratios
    assert cached_ratios == ratios
    assert all(torch.equal(weights[k], cached_weights[k]) for k in weights)


def test_fp16_with_a_grad_scaler_moves_every_weight_and_clips_true_gradients(tmp_path, cuda_kernels_only):
    cli, record = run_recorded(tmp_path, "--trainer.precision", "null", "--trainer.plugins", json.dumps(FP16_PLUGIN))
    assert record.autocast == {(True, torch.float16)}
    scaler = cli.trainer.precision_plugin.scaler
    assert scaler is not None and cli.model.optimizers().optimizer.defaults["fused"]
    assert moved_fraction(cli.model.policy) >= 0.99  # measured: 99.999%; before the loss scale reached the head: 93.6%
    # the logged norm is of the unscaled gradients (scaled by 65,536 it would be in the tens of thousands)
    assert all(0 < step["grad_norm"] < 100 for step in record.logged)


def test_evaluation_before_and_after_runs_under_the_trainers_autocast(tmp_path, cuda_kernels_only, monkeypatch):
    seen = []
    evaluate = module_file.GRPOModule.evaluate_batch

    def recorded(self, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return evaluate(self, batch)

    monkeypatch.setattr(module_file.GRPOModule, "evaluate_batch", recorded)
    overrides = grpo_overrides(yaml.safe_load(GPU_CONFIG.read_text()), tmp_path)
    run(["fit", "--config", str(GPU_CONFIG), *args_of(overrides), "--trainer.max_steps", "1"])
    assert len(seen) == 2 and all(seen)  # before and after, each one batch of 4


# --- process settings that differ on a GPU ---------------------------------------------------------------


def test_rng_state_keeps_only_the_current_cuda_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: calls.append(state.tolist()))
    state = distributed.rng_state()
    assert state["cuda"].tolist() == [7]
    drawn = (random.random(), torch.rand(2).tolist())
    distributed.set_rng_state(state)
    assert calls == [[7]]
    assert (random.random(), torch.rand(2).tolist()) == drawn  # the CPU's Python and torch states came back too


def test_phase_times_wait_for_the_gpu_only_on_a_gpu(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    distributed.synchronize(torch.device("cpu"))
    distributed.synchronize(torch.device("cuda", 0))
    assert synced == [torch.device("cuda", 0)]


@pytest.mark.parametrize("device, expected", [("cpu", [1 << 20]), ("cuda", [])])
def test_malloc_threshold_applies_on_the_cpu_only(device, expected, monkeypatch):
    from grpo_lightning.train import cli

    applied = []
    monkeypatch.setattr(cli, "set_mmap_threshold", applied.append)
    monkeypatch.setattr(cli, "check_max_steps", lambda *args: None)
    fake = SimpleNamespace(
        config_init={"fit": {"malloc_mmap_threshold": 1 << 20, "ckpt_path": None}}, subcommand="fit",
        trainer=SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), checkpoint_callback=None,
                                callbacks=[], max_steps=1),
        model=SimpleNamespace(optimization=SimpleNamespace(mu=1)), datamodule=SimpleNamespace(setup=lambda stage: None),
    )
    cli.GRPOCLI.before_fit(fake)
    assert applied == expected


@pytest.mark.slow
def test_gpu_config_runs_as_ddp_on_two_processes(tmp_path):
    from test_distributed import largest_difference, launch, probe, ranks

    overrides = grpo_overrides(yaml.safe_load(GPU_CONFIG.read_text()), tmp_path)
    overrides.update({"trainer.devices": 2, "trainer.strategy": "ddp", "eval.before": False, "eval.after": False})
    out = tmp_path / "out"
    launch(tmp_path, [["fit", "--config", str(GPU_CONFIG), *args_of(overrides), *probe(out),
                       "--trainer.callbacks+=ddp_probe.CudaKernelsOnly"]])
    zero, one = ranks(out)
    assert zero["world_size"] == 2 and zero["global_step"] == one["global_step"] == 2
    assert zero["precision"] == "bf16-mixed" and zero["fused"]
    assert largest_difference(zero["params"], one["params"]) == 0.0  # one all-reduced gradient, one step
    params = zero["params"]
    assert all(torch.isfinite(w).all() for w in params.values())
    moved = sum(int((params[k] != zero["initial"][k]).sum()) for k in params) / sum(w.numel() for w in params.values())
    assert moved >= 0.99
    exported = load_model_and_tokenizer(overrides["export.export_dir"], "float32")[0].state_dict()
    assert all(torch.equal(exported[k], params[k]) for k in params)
