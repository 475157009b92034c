"""The GRPO options through the real training loop: loss types, reward functions, metrics."""

import math

import pytest
from test_train import make_config, scalars
from transformers import AutoModelForCausalLM

from grpo_lightning.core.scoring import RewardFunctionError
from grpo_lightning.train.cli import run

QUIET = ["--eval.before", "false", "--eval.after", "false"]


def short_answers(prompts, completions, **kwargs):
    """A user's reward function in TRL's convention: prefers short completions."""
    return [1.0 / (1 + len(c)) for c in completions]


def broken(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def fit(tmp_path, tiny_model_dir, gsm8k_dir, name, steps, *args):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, name, optimization={"mu": 1})
    return run(["fit", "--config", str(config), "--trainer.max_steps", str(steps), *QUIET, *args])


def test_options_train_and_log_their_metrics(tmp_path, tiny_model_dir, gsm8k_dir):
    cli = fit(
        tmp_path, tiny_model_dir, gsm8k_dir, "options", 2,
        "--model.loss.loss_type", "dr_grpo", "--model.loss.epsilon_high", "0.28", "--model.loss.scale_rewards", "batch",
        "--model.loss.mask_truncated_completions", "true",
        "--model.loss.reward_funcs", '["grpo_lightning.builtin.gsm8k.format", "test_options.short_answers"]',
        "--model.loss.reward_weights", "[1.0, 0.5]",
    )
    assert cli.trainer.global_step == 2
    logged = scalars(cli.trainer.log_dir)
    for tag in ("reward/format", "reward/short_answers", "frac_reward_zero_std", "entropy",
                "clip_fraction/low", "clip_fraction/high"):
        assert len(logged[tag]) == 2, tag
    assert "reward/correctness" not in logged  # only the configured functions are called
    # The entropy is a mean over the tokens the loss sees: with truncated completions masked out, a step whose
    # every completion was cut off has none (0); otherwise, sampled at T = 1 from a model far from certain, it
    # lies between 0 and the uniform distribution's ln V. A step's two prompts make the fraction of groups
    # whose rewards all agree 0, 1/2 or 1.
    V = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    for entropy, truncated in zip(logged["entropy"], logged["completion/truncated_fraction"]):
        assert entropy == 0 if truncated == 1 else 0.05 < entropy <= math.log(V), (entropy, truncated, V)
    assert all(2 * f == int(2 * f) for f in logged["frac_reward_zero_std"]), logged["frac_reward_zero_std"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_rows_per_update_does_not_change_the_step(tmp_path, tiny_model_dir, gsm8k_dir, loss_type):
    # Same seed, same samples: one step over all 8 rows at once, or in chunks of 4, moves the weights alike.
    # short_answers: rewards differ within every group, so advantages are non-zero and the step moves weights.
    # SGD: the weights move by lr · gradient, so equal weights mean equal gradients (Adam's first step,
    # lr · g / (|g| + 1e-8), would magnify float rounding in tiny gradients).
    args = [
        "--model.loss.loss_type", loss_type, "--model.loss.beta", "0.04", "--model.loss.reward_funcs", '["test_options.short_answers"]',
        "--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "1.0",
    ]
    whole_cli = fit(tmp_path, tiny_model_dir, gsm8k_dir, f"whole-{loss_type}", 1, *args)
    chunked_cli = fit(tmp_path, tiny_model_dir, gsm8k_dir, f"chunked-{loss_type}", 1, *args, "--model.memory.rows_per_update", "4")
    whole, chunked = whole_cli.model.policy.state_dict(), chunked_cli.model.policy.state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = max((whole[k] - initial[k]).abs().max().item() for k in initial)
    differ = max((whole[k] - chunked[k]).abs().max().item() for k in whole)
    assert moved > 1e-4 and differ < 1e-4 * moved
    a, b = scalars(whole_cli.trainer.log_dir), scalars(chunked_cli.trainer.log_dir)
    for tag in ("loss", "kl", "entropy", "ratio"):
        assert b[tag] == pytest.approx(a[tag], abs=1e-6), tag
    assert a["entropy"][0] > 1.0  # a random model over ~200 tokens is far from one-hot (uniform: ln 200 ≈ 5.3)


def test_bad_reward_function_stops_before_any_update(tmp_path, tiny_model_dir, gsm8k_dir):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "broken", optimization={"mu": 1})
    args = ["fit", "--config", str(config), *QUIET, "--model.loss.reward_funcs", '["test_options.broken"]']
    with pytest.raises(RewardFunctionError, match="reward function 'broken' returned 7 values for 8 completions"):
        run(args)
    # a checkpoint is written after every step: none exists, so no optimizer step happened
    assert not list((tmp_path / "broken" / "ckpt").glob("*.ckpt"))
