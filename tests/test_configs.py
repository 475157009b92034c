"""Every YAML in configs/ runs two steps, not only parses, with only what the CPU needs overridden.

What a CPU cannot have is replaced: the model (the packaged tiny one), hub data (the packaged GSM8K sample),
the sizes, the accelerator and devices, and the output paths (into the test's directory). Everything else in
effect after the run must equal the YAML's: the precision plugin, the optimizer class and its options (``fused``),
the module's options (``grad_clip``, the loss options, gradient checkpointing, ...), the checkpoint and export
settings. A config whose ``accelerator`` is a GPU runs with the CPU-only oneDNN kernels off, as on CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from grpo_lightning.train.warmup import SFTDataModule, SFTWarmup, WarmupCLI
from grpo_lightning.hf.models import causal_lm, is_checkpointing, load_model_and_tokenizer
from grpo_lightning.train.cli import run

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TINY = "builtin:tiny-arithmetic"
# Strategies the CPU cannot run, with the reason; the rest of such a config still runs. (None ships: the FSDP
# configs use ModelParallelStrategy, which runs here on two processes.)
CPU_CANNOT = {"fsdp": "Lightning's FSDPStrategy refuses the CPU ('requires a GPU accelerator')"}


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; class_path/init_args pairs stay whole (compared by their own check)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "class_path" not in value:
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def grpo_overrides(config: dict, tmp: Path) -> dict[str, Any]:
    trainer, model, data = config["trainer"], config["model"], config["data"]
    mu = model.get("optimization", {}).get("mu", 1)
    out = {
        "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.max_steps": 2 * mu,
        "trainer.default_root_dir": str(tmp / "run"), "trainer.enable_progress_bar": False,
        "model.model_name_or_path": TINY, "model.sampling.num_generations": 4, "model.sampling.max_new_tokens": 32,
        "model.evaluation.max_new_tokens": 8, "data.batch_size": 2, "data.eval_size": 4, "data.eval_batch_size": 4,
        "checkpoint.dirpath": str(tmp / "ckpt"), "export.export_dir": str(tmp / "export"),
    }
    if str(trainer.get("strategy")) in CPU_CANNOT:
        out["trainer.strategy"] = "auto"
    if is_sharded(config):
        out["trainer.devices"] = 2  # FSDP2's shards on two CPU processes
    if not str(data.get("source", "")).startswith(("task:", "builtin:")):
        # the hub's GSM8K, offline: the tiny model's own task in GSM8K's form, where its rewards vary, so an
        # update has something to move (on real GSM8K questions all of its samples score the same)
        out["data.source"] = "task:arithmetic"
    return out


def option(hparams: Any, name: str) -> Any:
    """``hparams["lora"].r`` for ``lora.r``: options that are dataclasses are read through their fields."""
    value = hparams
    for part in name.split("."):
        value = value[part] if isinstance(value, dict) or hasattr(value, "keys") else getattr(value, part)
    return value


def args_of(overrides: dict[str, Any]) -> list[str]:
    return [a for key, value in overrides.items() for a in (f"--{key}", "null" if value is None else str(value))]


def assert_optimizer_is_the_yamls(optimizer: torch.optim.Optimizer, spec: dict | None) -> None:
    if spec is None:  # the module's default: the seed's Adam, fused
        assert type(optimizer) is torch.optim.Adam and optimizer.defaults["fused"]
        return
    assert spec["class_path"] == f"torch.optim.{type(optimizer).__name__}"
    for key, value in (spec.get("init_args") or {}).items():
        assert optimizer.defaults[key] == pytest.approx(value), key


def assert_engine_is_the_yamls(engine: Any, spec: dict) -> None:
    assert f"{type(engine).__module__}.{type(engine).__name__}" == spec["class_path"]
    for key, value in flat(spec.get("init_args") or {}).items():
        first = key.split(".")[0]  # vLLM's own LLM(...) options are kept together, the engine's as attributes
        got = engine.llm_options[key] if first in getattr(engine, "llm_options", {}) else option(engine, key)
        assert got == value, f"model.rollout.init_args.{key}"


def assert_precision_is_the_yamls(trainer: Any, precision: str | None) -> None:
    assert trainer.precision == (precision or "32-true")
    if precision in ("bf16-mixed", "16-mixed"):
        from lightning.pytorch.plugins.precision import MixedPrecision

        assert isinstance(trainer.precision_plugin, MixedPrecision)


def run_grpo(config_path: Path, tmp: Path) -> tuple[Any, dict, dict]:
    config = yaml.safe_load(config_path.read_text())
    overrides = grpo_overrides(config, tmp)
    cli = run(["fit", "--config", str(config_path), *args_of(overrides)])
    return cli, config, overrides


def check_grpo_run(cli: Any, config: dict, overrides: dict) -> None:
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == overrides["trainer.max_steps"]
    assert_precision_is_the_yamls(trainer, config["trainer"].get("precision"))
    assert_optimizer_is_the_yamls(module.optimizers().optimizer, config["model"].get("optimizer"))
    for key, value in flat(config["model"], "model.").items():  # every option in effect, the loss's and grad_clip among them
        if key in overrides or key == "model.optimizer":
            continue
        if key == "model.rollout":  # the engine, an object: its class and options
            assert_engine_is_the_yamls(module.engine, value)
            continue
        assert option(module.hparams, key.removeprefix("model.")) == value, key
    policy = module.policy
    memory = config["model"].get("memory", {})
    assert is_checkpointing(policy) == bool(memory.get("gradient_checkpointing", False))
    has_hook = getattr(causal_lm(policy), "_require_grads_hook", None) is not None
    assert has_hook == bool(memory.get("input_require_grads", False))
    ckpt = trainer.checkpoint_callback
    for key, value in (config.get("checkpoint") or {}).items():
        if f"checkpoint.{key}" not in overrides:
            assert getattr(ckpt, key, getattr(ckpt, f"_{key}", None)) == value, f"checkpoint.{key}"
    assert (Path(overrides["checkpoint.dirpath"]) / "last.ckpt").exists()  # (sharded: a directory)
    # the export: loadable, finite, and moved from the weights the run started from
    exported = AutoModelForCausalLM.from_pretrained(overrides["export.export_dir"]).state_dict()
    initial, _ = load_model_and_tokenizer(TINY, "float32")
    initial = initial.state_dict()
    assert all(torch.isfinite(w).all() for w in exported.values())
    if not str(option(cli.datamodule.hparams, "source")).startswith("task:"):
        return  # (cpu-gsm8k-tiny: real GSM8K rows, where the tiny model's rewards rarely vary)
    moved = sum(int((exported[k] != initial[k]).sum()) for k in initial) / sum(w.numel() for w in initial.values())
    assert moved > 0.5, f"only {moved:.1%} of the weights moved"


def is_sharded(config: dict) -> bool:
    return "ModelParallelStrategy" in str(config["trainer"].get("strategy"))


def run_sharded(config_path: Path, tmp: Path, kernels_off: bool) -> None:
    """:func:`run_grpo` and :func:`check_grpo_run` in two processes (``ddp_probe``'s launch; rank 0 checks)."""
    from test_distributed import launch

    launch(tmp, [{"config": str(config_path), "tmp": str(tmp), "kernels_off": kernels_off}])


def is_warmup(config_path: Path) -> bool:
    return "grpo_lightning.train.warmup" in config_path.read_text().splitlines()[0]


GPU_CONFIGS = [c for c in CONFIGS if not is_warmup(c) and yaml.safe_load(c.read_text())["trainer"]["accelerator"] == "gpu"]


def test_every_config_has_its_command_and_the_set_is_complete():
    names = {c.name for c in CONFIGS}
    assert {"qwen2.5-0.5b-gsm8k.yaml", "cpu-gsm8k-tiny.yaml", "quickstart.yaml", "warmup-tiny.yaml"} <= names
    for config in CONFIGS:
        first = config.read_text().splitlines()[0]
        assert first.startswith(("# grpo-lightning fit --config", "# python -m grpo_lightning.train.warmup fit --config")), first


def needs_extra(config_path: Path) -> str | None:
    """The optional package a config's engine needs (its own environment in .ci/run), or None."""
    return "vllm" if "grpo_lightning.engines.vllm" in config_path.read_text() else None


@pytest.mark.slow
@pytest.mark.parametrize("config_path", [c for c in CONFIGS if not is_warmup(c)], ids=lambda p: p.name)
def test_config_runs_two_steps(config_path, tmp_path, monkeypatch):
    if needs_extra(config_path):
        pytest.importorskip(needs_extra(config_path), reason=f"{config_path.name} runs where its extra is installed")
    if is_sharded(yaml.safe_load(config_path.read_text())):
        return run_sharded(config_path, tmp_path, kernels_off=config_path in GPU_CONFIGS)
    if config_path in GPU_CONFIGS:  # the CUDA path: no CPU-only kernel applies
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    cli, config, overrides = run_grpo(config_path, tmp_path)
    check_grpo_run(cli, config, overrides)


# (not the sharded ones: oneDNN steps aside for sharded weights, and their bf16 products are not fp32 anyway)
@pytest.mark.slow
@pytest.mark.parametrize("config_path", [c for c in GPU_CONFIGS if not is_sharded(yaml.safe_load(c.read_text()))], ids=lambda p: p.name)
def test_gpu_config_runs_with_the_onednn_kernels_on(config_path, tmp_path):
    # bf16-mixed on the CPU with oneDNN present: its kernels must step aside for autocast's products
    assert torch.backends.mkldnn.is_available()
    cli, config, overrides = run_grpo(config_path, tmp_path)
    check_grpo_run(cli, config, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("config_path", [c for c in CONFIGS if is_warmup(c)], ids=lambda p: p.name)
def test_warmup_config_runs_two_steps(config_path, tmp_path):
    config = yaml.safe_load(config_path.read_text())
    overrides = {
        "trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.max_steps": 2, "trainer.max_epochs": 1,
        "trainer.val_check_interval": None, "trainer.limit_val_batches": 1, "trainer.enable_progress_bar": False,
        "trainer.default_root_dir": str(tmp_path / "run"), "model.model_name_or_path": "builtin:tiny-init",
        "model.save_dir": str(tmp_path / "model"), "data.batch_size": 4, "data.val_size": 4,
    }
    if not str(config["data"]["source"]).startswith(("task:", "builtin:")):
        overrides["data.source"] = "builtin:gsm8k-sample"
    cli = WarmupCLI(SFTWarmup, SFTDataModule, args=["fit", "--config", str(config_path), *args_of(overrides)])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 2
    assert_precision_is_the_yamls(trainer, config["trainer"].get("precision"))
    for name in ("accumulate_grad_batches", "gradient_clip_val", "log_every_n_steps"):
        if name in config["trainer"]:
            assert getattr(trainer, name) == config["trainer"][name], name
    for key, value in flat(config["model"], "model.").items():
        if key not in overrides:
            assert option(module.hparams, key.removeprefix("model.")) == value, key
    assert is_checkpointing(module.model) == bool(config["model"].get("gradient_checkpointing", False))
    assert (tmp_path / "model" / "config.json").is_file()
