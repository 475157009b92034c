"""FSDP2 (``ModelParallelStrategy`` with ``model.sharding``) on two CPU processes (gloo), against DDP and one process.

One launch runs four fits on the same replayed rows (``ddp_probe.FixedRollouts`` serves them through the
replay engine): FSDP2 for 4 optimizer steps, DDP for 4, and FSDP2 stopped after 2 then resumed to 4.
:class:`ddp_probe.Probe` saves what each process ends with, the weights gathered from their shards.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import DDP, config, fixed_args, largest_difference, launch, probe, ranks

from grpo_lightning.hf.sharding import Sharding
from grpo_lightning.train.checkpoints import CheckpointError, read_checkpoint
from grpo_lightning.train.cli import run

TESTS = Path(__file__).resolve().parent
FSDP = [
    "--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}', "--trainer.devices", "2",
    "--model.sharding.reshard_after_forward", "true",
]


def steps(tmp: Path, name: str, rollout: Path, max_steps: int, *extra: str) -> list[str]:
    """4 prompts' rows per step over the processes, μ = 2 in chunks of 4 rows (``fixed_args``), fused Adam."""
    args = fixed_args(tmp, "grpo", rollout)
    args[args.index("--config") + 1] = str(config(tmp, name))
    # Adam for its two moments, with an eps above the gradients' size: lr · g / (sqrt(v) + eps) then stays about
    # linear in g, where eps 1e-8 would blow a rounding difference in a near-zero gradient up to a whole step
    adam = ["--model.optimizer", "torch.optim.Adam", "--model.optimizer.lr", "1e-3", "--model.optimizer.eps", "0.01",
            "--model.optimizer.fused", "true"]
    return [*args, *adam, "--trainer.max_steps", str(max_steps), *extra]


def sampled_rows(path: Path) -> Path:
    """16 rows (4 prompts × 4 samples) of the packaged arithmetic model, saved for the replay engine."""
    from grpo_lightning.builtin.answer_format import build_prompt
    from grpo_lightning.engines.generate import generate_rollout
    from grpo_lightning.hf.models import load_model_and_tokenizer
    from grpo_lightning.train.data import load_records

    model, tokenizer = load_model_and_tokenizer("builtin:tiny-arithmetic", "float32")
    questions = [r["question"] for r in load_records("task:arithmetic", "train")[:4]]
    torch.manual_seed(0)
    rollout = generate_rollout(model.eval(), tokenizer, [build_prompt(q) for q in questions], 4, 22)
    torch.save(dataclasses.asdict(rollout), path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    rollout = sampled_rows(tmp / "rollout.pt")
    launch(tmp, [
        [*steps(tmp, "fsdp", rollout, 4), *FSDP, *probe(tmp / "out" / "fsdp")],
        [*steps(tmp, "ddp", rollout, 4), *DDP, *probe(tmp / "out" / "ddp")],
        [*steps(tmp, "part", rollout, 2), *FSDP],
        [*steps(tmp, "part", rollout, 4), *FSDP, "--ckpt_path", "last", "--export.overwrite", "true",
         *probe(tmp / "out" / "resumed")],
    ])
    return tmp


@pytest.mark.slow
def test_fsdp2_updates_as_ddp_and_one_process(sharded, tmp_path):
    run([*steps(tmp_path, "one", sharded / "rollout.pt", 4), "--data.batch_size", "4", *probe(tmp_path / "one")])
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    fsdp, ddp = ranks(sharded / "out" / "fsdp"), ranks(sharded / "out" / "ddp")
    assert fsdp[0]["global_step"] == 4 and fsdp[0]["world_size"] == 2
    moved = largest_difference(one["params"], one["initial"])
    assert moved > 1e-4, moved  # (the update is not a no-op)
    assert largest_difference(fsdp[0]["params"], fsdp[1]["params"]) == 0.0  # the same gathered weights
    differ = [largest_difference(fsdp[0]["params"], ddp[0]["params"]), largest_difference(fsdp[0]["params"], one["params"]),
              largest_difference(ddp[0]["params"], one["params"])]
    assert max(differ) < 1e-6, differ
    for tag in ("loss", "kl", "ratio", "grad_norm", "reward"):
        assert fsdp[0]["logged"][-1][tag] == pytest.approx(one["logged"][-1][tag], abs=1e-6), tag


@pytest.mark.slow
def test_each_process_holds_half_of_the_weights_gradients_and_adam_state(sharded):
    for rank in ranks(sharded / "out" / "fsdp"):
        held = rank["local_bytes"]
        full = held["full"]  # fp32 parameters of the whole model; gradients and each Adam moment the same
        assert held["params"] / full == pytest.approx(0.5, abs=0.02)
        assert held["grads"] / full == pytest.approx(0.5, abs=0.02)
        assert held["adam"] / full == pytest.approx(0.5 * 2, abs=0.04)  # exp_avg and exp_avg_sq


@pytest.mark.slow
def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(sharded):
    whole, resumed = ranks(sharded / "out" / "fsdp"), ranks(sharded / "out" / "resumed")
    assert resumed[0]["global_step"] == 4
    assert largest_difference(whole[0]["params"], resumed[0]["params"]) < 1e-6
    checkpoint = read_checkpoint(sharded / "part" / "ckpt" / "last.ckpt")  # a directory of shards
    assert checkpoint["global_step"] == 4 and checkpoint["state_dict"]["policy.lm_head.weight"].is_meta


@pytest.mark.slow
def test_the_export_is_one_model_equal_to_the_one_process_export(sharded, tmp_path):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(sharded / "fsdp" / "export", dtype=torch.float32)
    gathered = ranks(sharded / "out" / "fsdp")[0]["params"]
    mine = exported.state_dict()
    assert set(mine) == set(gathered)
    assert max((mine[k] - gathered[k]).abs().max().item() for k in mine) == 0.0


@pytest.mark.slow
def test_the_weights_pushed_to_vllm_are_gathered_whole(sharded):
    for rank in ranks(sharded / "out" / "fsdp"):
        pushed, gathered = rank["pushed"], rank["params"]
        assert all(type(w) is torch.Tensor for w in pushed.values())  # no DTensor reaches the engine
        assert set(pushed) == set(gathered)  # (the policy is the causal LM itself: the same names)
        assert max((pushed[k] - gathered[k]).abs().max().item() for k in pushed) == 0.0


@pytest.mark.slow
def test_resuming_on_one_process_and_under_ddp(sharded, tmp_path):
    from grpo_lightning.train.checkpoints import AtomicCheckpointIO

    checkpoint = sharded / "part" / "ckpt" / "last.ckpt"
    # DDP (or one process without sharding) cannot read shards: one message that says what can
    with pytest.raises(CheckpointError, match="is sharded .*ModelParallelStrategy"):
        AtomicCheckpointIO().load_checkpoint(checkpoint)
    # one sharded process resumes the two processes' shards (they are resharded as they load), refreshing
    # its sharded reference from the sharded policy at every step (ref_update_every 1), in a process
    # of its own: the process group it starts would outlive the run in this one
    args = [*steps(tmp_path, "alone", sharded / "rollout.pt", 6), *FSDP, "--trainer.devices", "1",
            "--data.batch_size", "4", "--model.optimization.ref_update_every", "1", "--ckpt_path", str(checkpoint)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "grpo_lightning.train.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "random states of 2 processes, this run has 1" in done.stdout + done.stderr
    assert read_checkpoint(tmp_path / "alone" / "ckpt" / "last.ckpt")["global_step"] == 6


def test_sharding_options_check_themselves():
    assert Sharding().mixed_precision().param_dtype is None
    assert Sharding(param_dtype="bfloat16").mixed_precision().param_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model.sharding.param_dtype must be one of"):
        Sharding(param_dtype="bf16")


def test_a_strategy_and_options_that_do_not_go_together_get_one_message():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from grpo_lightning.train.model_parallel import check_sharding

    with pytest.raises(ValueError, match="model.sharding shards the policy with FSDP2 and needs trainer.strategy"):
        check_sharding(Sharding(), DDPStrategy(), "32-true")
    with pytest.raises(ValueError, match="set model.sharding"):
        check_sharding(None, ModelParallelStrategy(), "32-true")
    with pytest.raises(ValueError, match="trainer.precision bf16-mixed is Lightning's autocast"):
        check_sharding(Sharding(param_dtype="bfloat16"), ModelParallelStrategy(), "bf16-mixed")
    assert check_sharding(Sharding(), ModelParallelStrategy(), "32-true")
    assert not check_sharding(None, DDPStrategy(), "32-true")


class Mesh:
    """A stand-in for Lightning's 2-D device mesh: the sizes of its two named dimensions."""

    def __init__(self, data: int, tensor: int):
        self.sizes = {"data_parallel": data, "tensor_parallel": tensor}
        self.mesh_dim_names, self.shape = tuple(self.sizes), tuple(self.sizes.values())

    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __getitem__(self, name: str) -> "Mesh":
        return Mesh(self.sizes[name], 1)


def test_all_processes_shard_over_one_dimension_and_tensor_parallelism_is_refused():
    from grpo_lightning.train.model_parallel import data_mesh

    # Lightning's "auto" sizes put every process of one node in the tensor-parallel dimension
    assert data_mesh(Mesh(1, 8)).size() == 8 and data_mesh(Mesh(8, 1)).size() == 8
    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        data_mesh(Mesh(2, 4))


def test_lora_with_sharding_is_refused_before_any_model_loads():
    from grpo_lightning.hf.lora import LoRA
    from grpo_lightning.train.module import GRPOModule

    with pytest.raises(ValueError, match="model.lora cannot be combined with model.sharding"):
        GRPOModule("no/such-model", lora=LoRA(), sharding=Sharding())
