"""The option groups of train/options.py: each checks itself with one message naming its full key, they nest
in a YAML config and on the command line, and the flat keys of before get one message naming the new key
(in a config, on the command line) or are put in their groups (a checkpoint's hyperparameters)."""

import dataclasses

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from test_train import make_config

from grpo_lightning.train.checkpoints import read_checkpoint
from grpo_lightning.train.cli import MOVED_KEYS, check_moved_keys, main, run
from grpo_lightning.train.options import (
    FAST_KEYS, FLAT_KEYS, GROUPS, Evaluation, Loss, Memory, Optimization, Sampling, check_across_groups,
    nest_flat_options,
)

QUIET = ["--eval.before", "false", "--eval.after", "false"]

BAD = {
    "G 1": (Sampling, {"num_generations": 1}, r"model.sampling.num_generations must be at least 2 \(advantages"),
    "max_new_tokens 0": (Sampling, {"max_new_tokens": 0}, "model.sampling.max_new_tokens must be at least 1, got 0"),
    "T 0": (Sampling, {"temperature": 0.0}, "model.sampling.temperature must be positive"),
    "rows_per_generate": (Sampling, {"num_generations": 4, "rows_per_generate": 6},
                          r"model.sampling.rows_per_generate \(6\) must be a positive multiple of model.sampling.num_generations \(4\)"),
    "loss_type": (Loss, {"loss_type": "ppo"}, "model.loss.loss_type must be one of"),
    "scale_rewards": (Loss, {"scale_rewards": "rank"}, "model.loss.scale_rewards must be one of"),
    "clip_eps": (Loss, {"clip_eps": -0.1}, r"model.loss.clip_eps \(-0.1\) and model.loss.epsilon_high \(None\) must not be negative"),
    "epsilon_high": (Loss, {"epsilon_high": -0.2}, r"model.loss.epsilon_high \(-0.2\) must not be negative"),
    "mu 0": (Optimization, {"mu": 0}, "model.optimization.mu must be at least 1, got 0"),
    "grad_clip": (Optimization, {"grad_clip": -1.0}, "model.optimization.grad_clip must be 0 \\(no clipping\\) or more"),
    "skips": (Optimization, {"max_consecutive_skips": -1}, "model.optimization.max_consecutive_skips must be 0"),
    "ref_update_every": (Optimization, {"ref_update_every": -2}, "model.optimization.ref_update_every must be at least 0"),
    "rows_per_update": (Memory, {"rows_per_update": 0}, "model.memory.rows_per_update must be at least 1"),
    "chunk rows": (Memory, {"logprob_chunk_rows": 0}, "model.memory.logprob_chunk_rows must be at least 1"),
    "eval tokens": (Evaluation, {"max_new_tokens": 0}, "model.evaluation.max_new_tokens must be at least 1"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_value_names_its_full_key(name):
    cls, values, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        cls(**values)


def test_the_defaults_are_valid_and_frozen():
    for cls in GROUPS.values():
        default = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):  # one default instance serves every module
            setattr(default, dataclasses.fields(cls)[0].name, None)


def test_the_checks_across_groups():
    with pytest.raises(ValueError, match=r"model.memory.rows_per_update \(6\) must be a positive multiple of model.sampling.num_generations \(4\)"):
        check_across_groups(Sampling(num_generations=4), Memory(rows_per_update=6), Optimization(), Loss(), None)
    with pytest.raises(ValueError, match="model.optimization.ref_update_every must be 0 with model.lora"):
        check_across_groups(Sampling(), Memory(), Optimization(ref_update_every=2), Loss(), lora=object())
    check_across_groups(Sampling(num_generations=4), Memory(rows_per_update=8), Optimization(ref_update_every=2), Loss(beta=0), object())


def test_groups_nest_in_yaml_and_on_the_command_line(tmp_path, tiny_model_dir, gsm8k_dir):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "nested", sampling={"num_generations": 2, "temperature": 0.7},
                         optimization={"mu": 1}, memory={"logprob_chunk_rows": 3})
    cli = run(["fit", "--config", str(config), *QUIET, "--trainer.max_steps", "1", "--model.sampling.num_generations", "4",
               "--model.fast", "false"])
    module = cli.model
    # the command line's value over the YAML's; the group's other YAML values and defaults stay
    assert module.sampling == Sampling(num_generations=4, max_new_tokens=12, temperature=0.7)
    assert module.memory == Memory(logprob_chunk_rows=3) and module.optimization == Optimization(mu=1)
    assert module.fast is False and module.head.fused_mlps is False  # (the LM head is memory-safe either way)
    assert module.hparams["sampling"]["num_generations"] == 4  # saved as the config's values
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("old", sorted(k for k in MOVED_KEYS if k.removeprefix("model.") in {*FLAT_KEYS, *FAST_KEYS}))
def test_every_flat_key_on_the_command_line_names_its_new_key(old):
    with pytest.raises(ValueError, match=f"^{old} has moved: set {MOVED_KEYS[old]} instead$"):
        check_moved_keys(["fit", f"--{old}=1"])


def test_the_moved_keys_cover_every_option_of_before():
    before = {  # GRPOModule's flat options, all of them
        "num_generations", "max_new_tokens", "temperature", "use_model_generation_config", "beta", "clip_eps",
        "epsilon_high", "loss_type", "scale_rewards", "mask_truncated_completions", "reward_funcs", "reward_weights",
        "mu", "ref_update_every", "reset_optimizer_on_ref_update", "grad_clip", "max_consecutive_skips",
        "gradient_checkpointing", "input_require_grads", "rows_per_generate", "rows_per_update", "logprob_chunk_rows",
        "logprob_recompute", "fused_head_loss", "share_prompt", "generation_kwargs", "eval_max_new_tokens",
        "eval_generation_kwargs",
    }
    assert {k.removeprefix("model.") for k in MOVED_KEYS} >= before
    assert MOVED_KEYS["model.eval_max_new_tokens"] == "model.evaluation.max_new_tokens"
    assert MOVED_KEYS["model.fused_head_loss"] == "model.fast"


def test_a_flat_key_in_a_config_file_stops_with_one_message(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "flat", num_generations=4)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), *QUIET])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "model.num_generations has moved: set model.sampling.num_generations instead" in err
    assert err.count("error") == 1 and not (tmp_path / "flat").exists()


def flattened(hparams: dict) -> dict:
    """Hyperparameters as a checkpoint from before the groups saved them: every option flat, two speed switches."""
    out = {k: v for k, v in hparams.items() if k not in GROUPS and k != "fast"}
    for key, new in FLAT_KEYS.items():
        group, name = new.split(".")
        out[key] = hparams[group][name]
    return {**out, "fused_head_loss": True, "logprob_recompute": True}


def test_nest_flat_options_puts_each_option_in_its_group():
    nested = {"model_name_or_path": "m", "sampling": dataclasses.asdict(Sampling(num_generations=3)),
              **{g: dataclasses.asdict(c()) for g, c in GROUPS.items() if g != "sampling"}, "fast": True}
    grouped = nest_flat_options(flattened(nested))
    assert Sampling(**grouped["sampling"]) == Sampling(num_generations=3) and Evaluation(**grouped["evaluation"]) == Evaluation()
    assert "fused_head_loss" not in grouped and "num_generations" not in grouped
    assert nest_flat_options({"sampling": {"num_generations": 3}}) == {"sampling": {"num_generations": 3}}


def test_a_checkpoint_with_flat_hyperparameters_resumes(tmp_path, tiny_model_dir, gsm8k_dir):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "flatckpt", sampling={"temperature": 0.9}, optimization={"mu": 1})
    first = run(["fit", "--config", str(config), *QUIET, "--trainer.max_steps", "2"])
    saved = read_checkpoint(first.trainer.checkpoint_callback.last_model_path)
    saved["hyper_parameters"] = flattened(saved["hyper_parameters"])
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    # a new config that leaves the temperature at its default: a resume takes the checkpoint's options
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "resumed", optimization={"mu": 1})
    resumed = run(["fit", "--config", str(config), *QUIET, "--trainer.max_steps", "3", "--ckpt_path", str(old)])
    assert resumed.trainer.global_step == 3
    # Lightning 2.6 reads a --ckpt_path file's options over the config's (here only through the translation
    # of the flat ones); older releases keep the config's
    takes_checkpoints = hasattr(LightningCLI, "_parse_ckpt_path")
    assert resumed.model.sampling.temperature == (0.9 if takes_checkpoints else 1.0)
    assert resumed.model.sampling.num_generations == 4
    assert yaml.safe_load((tmp_path / "resumed.yaml").read_text())["model"]["sampling"].get("temperature") is None
