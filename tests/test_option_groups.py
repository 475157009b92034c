"""The option groups of train/options.py: each checks itself with one message naming its full key, they nest
in a YAML config and on the command line, and a resumed run takes its checkpoint's options."""

import dataclasses

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI
from test_train import make_config

from grpo_lightning.train.cli import run
from grpo_lightning.train.options import GROUPS, Evaluation, Loss, Memory, Optimization, Sampling, check_across_groups

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


# the resumed run writes to a directory of its own on purpose: Lightning notes it keeps the old one's best path only
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_resumed_run_takes_its_checkpoints_options(tmp_path, tiny_model_dir, gsm8k_dir):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "first", sampling={"temperature": 0.9}, optimization={"mu": 1})
    first = run(["fit", "--config", str(config), *QUIET, "--trainer.max_steps", "2"])
    old = first.trainer.checkpoint_callback.last_model_path
    # a new config that leaves the temperature at its default: a resume takes the checkpoint's options
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "resumed", optimization={"mu": 1})
    resumed = run(["fit", "--config", str(config), *QUIET, "--trainer.max_steps", "3", "--ckpt_path", str(old)])
    assert resumed.trainer.global_step == 3
    # Lightning 2.6 reads a --ckpt_path file's options over the config's (the command line's own reading,
    # through the checkpoint checks); older releases keep the config's
    takes_checkpoints = hasattr(LightningCLI, "_parse_ckpt_path")
    assert resumed.model.sampling.temperature == (0.9 if takes_checkpoints else 1.0)
    assert resumed.model.sampling.num_generations == 4
    assert yaml.safe_load((tmp_path / "resumed.yaml").read_text())["model"]["sampling"].get("temperature") is None
