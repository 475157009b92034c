"""The stages between rollout and update, each alone on a hand-made rollout of one prompt × 2 samples."""

import math

import pytest
import torch

from grpo_lightning.core.scoring import load_reward_funcs
from grpo_lightning.core.step import prepare_batch, score_rollout, step_metrics
from grpo_lightning.core.types import Rollout


def seen(prompts, completions, completion_ids, expected, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


# prompt token 9; row 0 says "<answer>4</answer>" and ends at EOS (id 0), row 1 runs out of tokens
ROLLOUT = Rollout(
    input_ids=torch.tensor([[9, 5, 0, 0], [9, 6, 7, 8]]),
    attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
    completion_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
    prompt_length=1,
    completions=["<answer>4</answer>", "x"],
    truncated=torch.tensor([False, True]),
)
BATCH = {"prompt": ["p"], "expected": ["4"]}


def test_score_rollout_passes_columns_per_completion():
    scores = score_rollout(load_reward_funcs(["test_step.seen"]), BATCH, ROLLOUT, num_generations=2)
    assert scores.total == [2.0, 3.0]  # completion ids through the first EOS: [5, 0] and [6, 7, 8]


def test_prepare_batch_and_metrics_hand_worked():
    scores = score_rollout(load_reward_funcs(["grpo_lightning.builtin.gsm8k.correctness", "grpo_lightning.builtin.gsm8k.format"]),
                           BATCH, ROLLOUT, num_generations=2)
    # row 0: correct 2.0 + two tags 0.4 = 2.4; row 1: 0. Group mean 1.2, unbiased std sqrt(2 · 1.2²) = 1.2·√2
    # → advantages ±1.2 / (1.2·√2 + 1e-4) = ±0.70707
    data = prepare_batch(ROLLOUT, scores, num_generations=2, mask_truncated_completions=True)
    a = 1.2 / (1.2 * math.sqrt(2) + 1e-4)
    assert data.rewards.tolist() == pytest.approx([2.4, 0.0])
    assert data.advantages.tolist() == pytest.approx([a, -a], abs=1e-6)
    assert data.loss_mask.tolist() == [[1, 1, 0], [0, 0, 0]]  # the truncated row is out of the loss
    assert (data.num_sequences, data.num_tokens) == (2, 2)  # counted once for the whole step
    assert data.frac_reward_zero_std.item() == 0.0
    metrics = step_metrics(data)
    # lengths 2 and 3; one of two truncated; correctness mean (2 + 0) / 2, format mean (0.4 + 0) / 2
    assert metrics["completion/length_mean"].item() == 2.5 and metrics["completion/length_max"].item() == 3
    assert metrics["completion/truncated_fraction"].item() == 0.5
    assert metrics["reward/correctness"].item() == 1.0 and metrics["reward/format"].item() == pytest.approx(0.2)
    assert prepare_batch(ROLLOUT, scores, num_generations=2).num_tokens == 5  # without the option: 2 + 3
