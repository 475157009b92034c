"""Two CPU processes on Lightning's DDP strategy (gloo): the step, evaluation and resuming are those of one process.

Each fixture launches ``tests/ddp_probe.py`` once; Lightning's launcher starts the second process, and both run
the same plan of ``grpo-lightning`` commands. :class:`ddp_probe.Probe` saves what each process ends with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import merged

from grpo_lightning.train.cli import run

TESTS = Path(__file__).resolve().parent
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]


def config(tmp_path: Path, name: str, **model: object) -> Path:
    """The packaged warmed-up tiny model on the arithmetic task: its greedy accuracy is far from 0 and 1."""
    cfg = {
        "seed_everything": 0,
        "torch_threads": 1,
        "trainer": {
            "accelerator": "cpu", "max_steps": 8, "default_root_dir": str(tmp_path / name),
            "enable_model_summary": False, "enable_progress_bar": False,
        },
        "model": {
            "model_name_or_path": "builtin:tiny-arithmetic", "dtype": "float32",
            "sampling": {"num_generations": 4, "max_new_tokens": 16}, "evaluation": {"max_new_tokens": 32},
            "optimization": {"mu": 2}, "memory": {"rows_per_update": 4},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 5e-5}},
        },
        "data": {"source": "task:arithmetic", "batch_size": 2, "eval_size": 9, "eval_batch_size": 1, "seed": 0},
        "checkpoint": {"dirpath": str(tmp_path / name / "ckpt"), "every_n_train_steps": 2},
        "export": {"export_dir": str(tmp_path / name / "export")},
    }
    cfg["model"] = merged(cfg["model"], model)  # groups as dicts, merged key by key
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def probe(out: Path) -> list[str]:
    return ["--trainer.callbacks+=ddp_probe.Probe", f"--trainer.callbacks.out={out}"]


def launch(tmp_path: Path, plan: list[list[str]]) -> None:
    """Run the plan in two processes (Lightning's DDP launcher); fail with the processes' output."""
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(TESTS / "ddp_probe.py"), str(plan_file)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- a fit, resumed, evaluated -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two processes: a fit of 4 rollout steps × μ 2; the same stopped after 2 and resumed; validate the result."""
    tmp = tmp_path_factory.mktemp("ddp_fit")
    full, part = config(tmp, "full"), config(tmp, "part")
    launch(tmp, [
        ["fit", "--config", str(full), *DDP, *probe(tmp / "out" / "full")],
        ["fit", "--config", str(part), *DDP, "--trainer.max_steps", "4", *probe(tmp / "out" / "part")],
        ["fit", "--config", str(part), *DDP, "--ckpt_path", "last", "--export.export_dir", str(tmp / "resumed"),
         *probe(tmp / "out" / "resumed")],
        ["validate", "--config", str(full), *DDP, "--model.model_name_or_path", str(tmp / "full" / "export"),
         "--trainer.default_root_dir", str(tmp / "validate")],
    ])
    return tmp


@pytest.mark.slow
def test_ranks_agree_bit_for_bit(trained):
    # μ = 2 and rows_per_update 4 of a process's 8 rows: two accumulation chunks per optimizer step
    zero, one = ranks(trained / "out" / "full")
    assert zero["global_step"] == one["global_step"] == 8 and zero["world_size"] == 2
    assert largest_difference(zero["params"], one["params"]) == 0.0


@pytest.mark.slow
def test_one_gradient_all_reduce_per_optimizer_step(trained):
    zero, one = ranks(trained / "out" / "full")
    # 8 optimizer steps of 2 chunks each: without no-sync chunks DDP would reduce gradients 16 times
    assert zero["syncs"] == one["syncs"] == 8
    # each synchronisation all-reduces DDP's buckets of this 0.85M-parameter model: one or two (its first bucket
    # holds at most 1 MB); without no-sync chunks there would be about twice as many
    assert zero["allreduces"] == one["allreduces"] <= 2 * 8


@pytest.mark.slow
def test_resumed_run_is_bit_identical_on_every_rank(trained):
    full, part, resumed = (ranks(trained / "out" / name) for name in ("full", "part", "resumed"))
    assert [r["global_step"] for r in part] == [4, 4] and [r["global_step"] for r in resumed] == [8, 8]
    for rank in range(2):
        assert largest_difference(full[rank]["params"], part[rank]["params"]) > 0  # the stop was before the end
        assert largest_difference(full[rank]["params"], resumed[rank]["params"]) == 0.0, f"rank {rank}"
    ckpt = torch.load(trained / "part" / "ckpt" / "last.ckpt", weights_only=False)
    states = ckpt["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # each process's own


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_evaluation_is_sharded_exactly(trained, tmp_path):
    """Each example once; the accuracy equals that of one process evaluating the same model on the same examples."""
    log_dir = trained / "full" / "lightning_logs" / "version_0"
    assert sorted(p.name for p in log_dir.glob("*.jsonl")) == ["eval_after.jsonl", "eval_before.jsonl", "eval_changes.jsonl"]
    after = _jsonl(log_dir / "eval_after.jsonl")
    # one process alone, on the model the two-process run exported
    single = run(["validate", "--config", str(config(trained, "full")), "--trainer.default_root_dir", str(tmp_path),
                  "--model.model_name_or_path", str(trained / "full" / "export")])
    alone = _jsonl(Path(single.trainer.log_dir) / "validate_examples.jsonl")
    assert len(alone) == 9 and after == alone  # every example once, in order, with the same completion
    accuracy = single.trainer.callback_metrics["val/accuracy"].item()
    assert 0 < accuracy < 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert events.Scalars("eval/accuracy_after")[-1].value == accuracy
    # the two-process validate: one file, the same rows
    two = _jsonl(trained / "validate" / "lightning_logs" / "version_0" / "validate_examples.jsonl")
    assert two == alone


# --- one update on given rollouts: two processes against one ------------------------------------------------

VARIANTS = {
    "grpo": [],
    "bnpo": ["--model.loss.loss_type", "bnpo"],
    "dr_grpo": ["--model.loss.loss_type", "dr_grpo"],
    "dapo": ["--model.loss.loss_type", "dapo", "--model.loss.mask_truncated_completions", "true"],
    "batch": ["--model.loss.scale_rewards", "batch"],
    "lora": ["--model.lora.r", "8"],  # DDP reduces the adapters' gradients only
}
# every metric the step logs from rewards, completions and the loss (the timings are each process's own)
LOGGED = [
    "reward", "reward/std", "reward/by_length", "reward/odd_lengths", "frac_reward_zero_std", "kl", "entropy",
    "clip_fraction", "clip_fraction/low", "clip_fraction/high", "ratio", "loss", "completion/length_mean",
    "completion/length_max", "completion/truncated_fraction",
]


def fixed_args(tmp: Path, variant: str, rollout: Path) -> list[str]:
    # SGD: the weights move by the gradient itself (Adam's first step, lr · g / (|g| + ε), would
    # magnify float rounding); μ = 2 so the second update takes a ratio against the first's log-probs.
    return [
        "fit", "--config", str(config(tmp, variant)), "--trainer.max_steps", "2", "--eval.before", "false",
        "--eval.after", "false", "--model.sampling.max_new_tokens", "22", "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.05",
        "--model.optimization.grad_clip", "1.0", "--model.loss.clip_eps", "0.01", "--model.loss.reward_funcs", '["ddp_probe.by_length", "ddp_probe.odd_lengths"]',
        "--trainer.callbacks+=ddp_probe.FixedRollouts", f"--trainer.callbacks.path={rollout}", *VARIANTS[variant],
    ]


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> Path:
    """16 sampled rows (4 prompts × 4); two processes update on 8 each, once per variant."""
    from grpo_lightning.train.data import load_records
    from grpo_lightning.hf.models import load_model_and_tokenizer
    from grpo_lightning.engines.generate import generate_rollout

    tmp = tmp_path_factory.mktemp("ddp_fixed")
    model, tokenizer = load_model_and_tokenizer("builtin:tiny-arithmetic", "float32")
    from grpo_lightning.builtin.answer_format import build_prompt

    questions = [r["question"] for r in load_records("task:arithmetic", "train")[:4]]
    torch.manual_seed(0)
    rollout = generate_rollout(model.eval(), tokenizer, [build_prompt(q) for q in questions], 4, 22)
    assert 0 < rollout.truncated.sum() < 16  # some rows end, some are cut off (dapo masks those)
    torch.save(dataclasses.asdict(rollout), tmp / "rollout.pt")
    launch(tmp, [[*fixed_args(tmp, v, tmp / "rollout.pt"), *DDP, *probe(tmp / "out" / v)] for v in VARIANTS])
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_update_as_one_over_all_rows(fixed, tmp_path, variant):
    # one process holding all 16 rows (4 prompts per step)
    run([*fixed_args(tmp_path, variant, fixed / "rollout.pt"), "--data.batch_size", "4", *probe(tmp_path / "one")])
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    zero, other = ranks(fixed / "out" / variant)
    assert largest_difference(zero["params"], other["params"]) == 0.0
    moved = largest_difference(one["params"], one["initial"])
    differ = largest_difference(zero["params"], one["params"])
    assert moved > 1e-4 and differ < 1e-6, (moved, differ)  # moved: 9.8e-4 in the last run
    # the metrics logged are the whole step's, not rank 0's
    two_logged, one_logged = zero["logged"][-1], one["logged"][-1]
    for tag in LOGGED:
        assert two_logged[tag] == pytest.approx(one_logged[tag], abs=1e-6), tag
    # one gradient synchronisation per optimizer step: 2 steps, 2 chunks each
    assert zero["syncs"] == other["syncs"] == 2


# --- the pieces alone, one process simulating two -----------------------------------------------------------


def test_interleave_undoes_the_round_robin_split():
    from grpo_lightning.train.distributed import interleave

    assert interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]  # 5 examples on 2 processes: 3 and 2, no repeat
    assert interleave([["a"]]) == ["a"]


def test_prepare_batch_counts_and_scales_over_the_gathered_step():
    """Process 0 holds group 0, process 1 group 1; with the gather, each sees the whole step's counts and scale."""
    from grpo_lightning.core.types import Rollout
    from grpo_lightning.core.scoring import Scores
    from grpo_lightning.core.step import prepare_batch, step_metrics

    def rollout(lengths: list[int]) -> Rollout:
        mask = torch.tensor([[1] * n + [0] * (3 - n) for n in lengths])  # [2, 3]
        return Rollout(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4), completion_mask=mask,
                       prompt_length=1, completions=["", ""], truncated=torch.tensor([False, False]))

    parts = [(rollout([1, 3]), Scores([0.0, 2.0], {"f": [0.0, None]})), (rollout([2, 2]), Scores([1.0, 1.5], {"f": [1.0, 1.5]}))]
    alone = [prepare_batch(r, s, 2, "batch") for r, s in parts]  # each process's own columns

    def gather(columns):
        return {k: torch.cat([a.step_rows[k] for a in alone]) for k in columns}

    whole = prepare_batch(
        Rollout(input_ids=torch.zeros(4, 4, dtype=torch.long), attention_mask=torch.ones(4, 4),
                completion_mask=torch.cat([r.completion_mask for r, _ in parts]), prompt_length=1,
                completions=[""] * 4, truncated=torch.zeros(4, dtype=torch.bool)),
        Scores([0.0, 2.0, 1.0, 1.5], {"f": [0.0, None, 1.0, 1.5]}), 2, "batch",
    )
    split = [prepare_batch(r, s, 2, "batch", gather=gather) for r, s in parts]
    for data in split:
        assert (data.num_sequences, data.num_tokens) == (4, 8)  # every process's rows and tokens
        assert step_metrics(data) == step_metrics(whole)  # reward/f: mean of 0, 1, 1.5 (None left out)
    # the batch scale: one std over all four rewards, not each process's two
    assert torch.equal(torch.cat([d.advantages for d in split]), whole.advantages)
    assert not torch.equal(torch.cat([a.advantages for a in alone]), whole.advantages)
