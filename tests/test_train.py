"""End to end on CPU through the CLI: training changes the policy, logs, exports, and resumes exactly."""

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.train.cli import run


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra``'s keys set, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_config(tmp_path: Path, model_dir: Path, data_dir: Path, name: str, **model: object) -> Path:
    """A 6-step config on the tiny model; ``model`` sets model options, groups as dicts merged into the defaults'
    (``optimization={"mu": 1}``)."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 6,
            "default_root_dir": str(tmp_path / name),
            "enable_model_summary": False,
            "enable_progress_bar": False,
        },
        "model": {
            "model_name_or_path": str(model_dir),
            "sampling": {"num_generations": 4, "max_new_tokens": 12},
            "optimization": {"mu": 2},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}},
        },
        "data": {"source": str(data_dir), "batch_size": 2, "eval_size": 4, "eval_batch_size": 4},
        "checkpoint": {"dirpath": str(tmp_path / name / "ckpt"), "every_n_train_steps": 1},
        "samples": {"every_n_steps": 1},
    }
    config["model"] = merged(config["model"], model)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(log_dir: Path) -> dict:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_end_to_end(tmp_path, tiny_model_dir, gsm8k_dir):
    cli = run(["fit", "--config", str(make_config(tmp_path, tiny_model_dir, gsm8k_dir, "e2e"))])
    module, trainer = cli.model, cli.trainer
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()

    assert trainer.global_step == 6  # 3 rollout steps × μ = 2 optimizer steps
    assert module.policy.training and not module.reference.training  # trained in train mode, reference frozen
    policy, reference = module.policy.state_dict(), module.reference.state_dict()
    assert any(not torch.equal(policy[k], initial[k]) for k in initial)  # the policy learned something
    assert all(torch.equal(reference[k], initial[k]) for k in initial)  # the reference stayed frozen

    log_dir = Path(trainer.log_dir)
    logged = scalars(log_dir)
    assert len(logged["reward"]) == 3 and len(logged["kl"]) == 3  # one point per rollout step
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [len(events.Tensors(t)) for t in events.Tags()["tensors"] if t.startswith("samples")] == [3]  # SampleText
    for tag in ("reward/std", "reward/correctness", "reward/format", "clip_fraction", "loss", "lr",
                "completion/length_mean", "completion/truncated_fraction", "eval/accuracy_before",
                "eval/accuracy_after", "eval/improvement"):
        assert tag in logged, tag
    assert len((log_dir / "eval_before.jsonl").read_text().splitlines()) == 4

    exported = log_dir / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(["Natalia sold clips"], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert all(torch.equal(model.state_dict()[k], policy[k]) for k in initial)


def test_resume_is_bit_identical(tmp_path, tiny_model_dir, gsm8k_dir):
    def fit(name: str, max_steps: int, ckpt_path: str | None = None, config_name: str | None = None) -> object:
        config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, config_name or name, optimization={"mu": 1})
        args = ["fit", "--config", str(config), "--trainer.max_steps", str(max_steps), "--export.export_dir", str(tmp_path / name / "out")]
        return run(args + (["--ckpt_path", ckpt_path] if ckpt_path else []))

    full = fit("full", 4)
    fit("part", 2)
    resumed = fit("resumed", 4, ckpt_path="last", config_name="part")  # same checkpoint directory
    assert resumed.trainer.global_step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    largest = max((a[k] - b[k]).abs().max().item() for k in a)
    assert largest == 0.0, f"resumed run differs from the uninterrupted one by up to {largest}"


def test_new_run_refuses_existing_checkpoints(tmp_path, tiny_model_dir, gsm8k_dir):
    config = str(make_config(tmp_path, tiny_model_dir, gsm8k_dir, "twice"))
    run(["fit", "--config", config, "--trainer.max_steps", "2", "--eval.before", "false", "--eval.after", "false"])
    with pytest.raises(FileExistsError, match="already holds checkpoints: resume with --ckpt_path last"):
        run(["fit", "--config", config, "--trainer.max_steps", "2"])


def test_validate_measures_accuracy_of_an_exported_model(tmp_path, tiny_model_dir, gsm8k_dir):
    config = str(make_config(tmp_path, tiny_model_dir, gsm8k_dir, "validate"))
    cli = run(["validate", "--config", config, "--model.model_name_or_path", str(tiny_model_dir)])
    accuracy = cli.trainer.callback_metrics["val/accuracy"].item()
    rows = [yaml.safe_load(line) for line in (Path(cli.trainer.log_dir) / "validate_examples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"prompt", "expected", "extracted", "completion", "correct"}
    assert accuracy == sum(r["correct"] for r in rows) / 4


def moved_fraction(policy: torch.nn.Module, model_dir: Path) -> float:
    """The fraction of the policy's weight tensors that differ from the model directory's; all must be finite."""
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    trained = policy.state_dict()
    assert all(torch.isfinite(trained[k]).all() for k in initial)
    return sum(not torch.equal(trained[k], initial[k]) for k in initial) / len(initial)


def test_beta_zero_has_no_reference_and_trains(tmp_path, tiny_model_dir, gsm8k_dir):
    config = str(make_config(tmp_path, tiny_model_dir, gsm8k_dir, "beta0", loss={"beta": 0.0}, optimization={"mu": 1}))
    cli = run(["fit", "--config", config, "--trainer.max_steps", "2", "--eval.before", "false", "--eval.after", "false"])
    assert cli.model.reference is None and cli.trainer.global_step == 2
    assert not any(k.startswith("reference.") for k in cli.model.state_dict())
    assert moved_fraction(cli.model.policy, tiny_model_dir) > 0.95  # measured: every tensor moves


def test_reference_refresh_every_n_steps(tiny_model_dir):
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import Optimization, Sampling

    module = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2), optimization=Optimization(ref_update_every=2))
    with torch.no_grad():
        next(module.policy.parameters()).add_(1.0)
    policy_first = next(module.policy.parameters())
    module._refresh_reference(step=1)  # not a multiple of 2: the reference keeps the initial weights
    assert not torch.equal(next(module.reference.parameters()), policy_first)
    module._refresh_reference(step=2)
    assert torch.equal(next(module.reference.parameters()), policy_first)
    assert not next(module.reference.parameters()).requires_grad


def test_gradient_checkpointing_trains(tmp_path, tiny_model_dir, gsm8k_dir):
    config = str(make_config(tmp_path, tiny_model_dir, gsm8k_dir, "ckpt", memory={"gradient_checkpointing": True}, optimization={"mu": 1}))
    cli = run(["fit", "--config", config, "--trainer.max_steps", "2", "--eval.before", "false", "--eval.after", "false"])
    from grpo_lightning.hf.models import is_checkpointing

    assert cli.trainer.global_step == 2
    assert is_checkpointing(cli.model.policy) and cli.model.policy.training  # restored after each sampling
    assert moved_fraction(cli.model.policy, tiny_model_dir) > 0.95  # measured: every tensor moves
