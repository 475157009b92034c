"""Watching a run: accuracy during fit (``trainer.val_check_interval``) on one curve with before and after, every
evaluation's rows on record, the best checkpoint kept, early stopping, resume. On the packaged tiny arithmetic
model, whose greedy accuracy moves within a few steps of a large learning rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import grpo_lightning.train.accuracy as accuracy_file
from grpo_lightning.train.cli import run
from grpo_lightning.train.export import export_checkpoint

pytestmark = pytest.mark.slow  # fit runs of several steps


def watch_config(tmp_path: Path, name: str, mu: int = 1, **data: object) -> Path:
    config = {
        "seed_everything": 0,
        "torch_threads": 1,
        "trainer": {"accelerator": "cpu", "max_steps": 4 * mu, "val_check_interval": 2,
                    "default_root_dir": str(tmp_path / name), "enable_model_summary": False, "enable_progress_bar": False},
        "model": {
            "model_name_or_path": "builtin:tiny-arithmetic", "dtype": "float32",
            "sampling": {"num_generations": 8, "max_new_tokens": 32}, "optimization": {"mu": mu},
            "memory": {"logprob_chunk_rows": 64},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 5.0e-4}},
        },
        "data": {"source": "task:arithmetic", "batch_size": 8, "eval_size": 40, "eval_batch_size": 40, "seed": 0, **data},
        "checkpoint": {"dirpath": str(tmp_path / name / "ckpt"), "monitor": "val/accuracy", "mode": "max", "save_top_k": 1,
                       "every_n_train_steps": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def curve(log_dir: Path, tag: str = "val/accuracy") -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def counting_evaluate(monkeypatch) -> list[str]:
    """Count the accuracy callback's own evaluations (before, after), by the file they write."""
    calls, original = [], accuracy_file.evaluate

    def counted(trainer, module, path, description):
        calls.append(Path(path).name)
        return original(trainer, module, path, description)

    monkeypatch.setattr(accuracy_file, "evaluate", counted)
    return calls


def test_the_curve_lands_at_global_steps_and_after_is_its_last_point(tmp_path, monkeypatch):
    """μ = 2, val_check_interval 2 (training batches = rollout steps): points at optimizer steps 0, 4, 8."""
    calls = counting_evaluate(monkeypatch)
    cli = run(["fit", "--config", str(watch_config(tmp_path, "curve", mu=2)), "--export.weights", "best"])
    log_dir = Path(cli.trainer.log_dir)
    points = curve(log_dir)
    assert [step for step, _ in points] == [0, 4, 8]
    assert calls == ["eval_before.jsonl"]  # "after" is the evaluation at step 8: the same weights, not run again
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, accuracy_file.AccuracyCallback))
    assert callback.accuracy_after == pytest.approx(points[-1][1]) and curve(log_dir, "eval/accuracy_after") == [points[-1]]
    assert points[0][1] == pytest.approx(curve(log_dir, "eval/accuracy_before")[0][1])
    files = sorted(p.name for p in (log_dir / "evaluations").iterdir())
    assert files == ["step_0000004.jsonl", "step_0000008.jsonl"]
    assert rows(log_dir / "eval_after.jsonl") == rows(log_dir / "evaluations" / "step_0000008.jsonl")
    for step, value in points[1:]:
        scored = rows(log_dir / "evaluations" / f"step_{step:07d}.jsonl")
        assert len(scored) == 40 and sum(r["correct"] for r in scored) / 40 == pytest.approx(value)
    # the best checkpoint is the evaluation during fit with the highest accuracy (the first of equals)
    during = points[1:]
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert best["global_step"] == max(during, key=lambda p: p[1])[0]
    assert cli.trainer.checkpoint_callback.best_model_score.item() == pytest.approx(max(v for _, v in during))
    # exported from the best checkpoint (export.weights: best), and the same again by the command after the run
    policy = {k.removeprefix("policy."): v for k, v in best["state_dict"].items() if k.startswith("policy.")}
    again = export_checkpoint(cli.trainer.checkpoint_callback.best_model_path, tmp_path / "again")
    for exported in (log_dir / "hf_model", again):
        weights = load_file(exported / "model.safetensors")
        assert all(torch.equal(weights[k], policy[k]) for k in weights) and len(weights) > 0
    # what changed: the rows whose correctness differs, counted in TensorBoard
    before, after = rows(log_dir / "eval_before.jsonl"), rows(log_dir / "eval_after.jsonl")
    flips = [(b["correct"], a["correct"]) for b, a in zip(before, after) if b["correct"] != a["correct"]]
    changed = rows(log_dir / "eval_changes.jsonl")
    assert [r["change"] for r in changed] == ["wrong_to_right" if a else "right_to_wrong" for _, a in flips]
    assert curve(log_dir, "eval/wrong_to_right")[0][1] == sum(a for _, a in flips)
    assert curve(log_dir, "eval/right_to_wrong")[0][1] == sum(not a for _, a in flips)


def test_a_subset_during_fit_and_the_whole_set_before_and_after(tmp_path, monkeypatch):
    calls = counting_evaluate(monkeypatch)
    cli = run(["fit", "--config", str(watch_config(tmp_path, "subset", fit_eval_size=10))])
    log_dir = Path(cli.trainer.log_dir)
    assert [len(rows(p)) for p in sorted((log_dir / "evaluations").iterdir())] == [10, 10]
    assert calls == ["eval_before.jsonl", "eval_after.jsonl"]  # the subset is not the whole set: "after" runs
    before = rows(log_dir / "eval_before.jsonl")
    assert len(before) == 40
    points = curve(log_dir)
    assert [s for s, _ in points] == [0, 2, 4]  # one point per step: after does not repeat step 4's
    assert points[0][1] == pytest.approx(sum(r["correct"] for r in before[:10]) / 10)  # the same 10 problems


def test_early_stopping_on_val_accuracy_stops(tmp_path):
    # min_delta 1.0: no accuracy can improve on the first by that much, so patience 1 stops at the second evaluation
    args = ["--trainer.max_steps", "20",
            "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping", "--trainer.callbacks.monitor=val/accuracy",
            "--trainer.callbacks.mode=max", "--trainer.callbacks.patience=1", "--trainer.callbacks.min_delta=1.0"]
    cli = run(["fit", "--config", str(watch_config(tmp_path, "early")), *args])
    assert cli.trainer.global_step == 4  # evaluations at rollout steps 2 and 4, of 20
    assert [s for s, _ in curve(Path(cli.trainer.log_dir))] == [0, 2, 4]


# the resumed run writes into the stopped run's checkpoint directory, as a resumed run should
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_gives_the_same_series_and_keeps_the_best(tmp_path):
    full = run(["fit", "--config", str(watch_config(tmp_path, "full")), "--trainer.max_steps", "6"])
    config = str(watch_config(tmp_path, "part"))
    part = run(["fit", "--config", config])  # stops at step 4, after its evaluation there
    resumed = run(["fit", "--config", config, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    series = curve(Path(part.trainer.log_dir)) + curve(Path(resumed.trainer.log_dir))
    assert series == curve(Path(full.trainer.log_dir))  # greedy on the CPU: exactly
    assert [s for s, _ in series] == [0, 2, 4, 6]
    a, b = full.trainer.checkpoint_callback, resumed.trainer.checkpoint_callback
    assert b.best_model_score == a.best_model_score
    assert Path(b.best_model_path).name == Path(a.best_model_path).name


def test_evaluating_during_fit_leaves_the_training_as_it_was(tmp_path):
    """The evaluations draw no random number that training would have: the same weights with and without them."""
    watched = run(["fit", "--config", str(watch_config(tmp_path, "watched")), "--eval.before", "false"])
    plain = run(["fit", "--config", str(watch_config(tmp_path, "plain")), "--trainer.val_check_interval", "null",
                 "--eval.before", "false", "--checkpoint.monitor", "null", "--checkpoint.save_top_k", "0"])
    assert len(curve(Path(watched.trainer.log_dir))) == 2 and len(curve(Path(plain.trainer.log_dir))) == 1
    a, b = watched.model.policy.state_dict(), plain.model.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
