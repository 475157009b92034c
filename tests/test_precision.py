"""Which optimizer steps round away in half precision, and the one warning a user gets about it."""

import warnings

import pytest
import torch

from grpo_lightning.train.cli import run
from grpo_lightning.train.precision import rounding_warning, stalled, stalled_fraction
from test_train import make_config

# Spacing of the numbers around w: eps · 2^floor(log2 |w|); a step of 5e-6 stalls where it is ≤ half that.
#   w       floor(log2 w)   half spacing, bfloat16 (eps 2^-7)   half spacing, float16 (eps 2^-10)
#   1.0         0           2^-8  ≈ 3.9e-3  stalls              2^-11 ≈ 4.9e-4  stalls
#   0.02       -6           2^-14 ≈ 6.1e-5  stalls              2^-17 ≈ 7.6e-6  stalls
#   0.002      -9           2^-17 ≈ 7.6e-6  stalls              2^-20 ≈ 9.5e-7  moves
#   1e-4      -14           2^-22 ≈ 2.4e-7  moves               2^-25 ≈ 3.0e-8  moves
#   0           -           (zero always moves)
WEIGHTS = [1.0, 0.02, 0.002, 1e-4, 0.0]


def test_stalled_hand_worked():
    bf16 = torch.tensor(WEIGHTS, dtype=torch.bfloat16)
    fp16 = torch.tensor(WEIGHTS, dtype=torch.float16)
    assert stalled(bf16, 5e-6).tolist() == [True, True, True, False, False]
    assert stalled(fp16, 5e-6).tolist() == [True, True, False, False, False]
    assert stalled_fraction([bf16], 5e-6) == pytest.approx(3 / 5)
    assert stalled_fraction([fp16, torch.tensor(WEIGHTS)], 5e-6) == pytest.approx(2 / 10)  # fp32 never stalls here


def test_stalled_agrees_with_adding_the_step():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(100_000) * 0.02).to(dtype)
        for step in (5e-6, 1e-4):
            unchanged = (w + step) == w  # computed in float32, rounded back to dtype
            # exact powers of two are the documented edge: below them the spacing halves
            power_of_two = torch.frexp(w.float())[0].abs() == 0.5
            assert torch.equal(unchanged[~power_of_two], stalled(w, step)[~power_of_two])


def test_warning_only_for_half_weights_that_would_not_move():
    w = torch.nn.Parameter((torch.randn(10_000) * 0.02).to(torch.bfloat16))
    message = rounding_warning([{"params": [w], "lr": 5e-6}])
    assert message is not None and "bf16-mixed" in message and "lr=5e-06" in message
    assert rounding_warning([{"params": [w], "lr": 1e-2}]) is None  # steps this large move every weight
    assert rounding_warning([{"params": [torch.nn.Parameter(w.float())], "lr": 5e-6}]) is None  # fp32 weights


def test_fit_warns_once_for_bf16_weights_at_the_seeds_lr(tmp_path, tiny_model_dir, gsm8k_dir):
    for dtype, expected in (("bfloat16", 1), ("float32", 0)):
        config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, f"lr-{dtype}", dtype=dtype, optimization={"mu": 1})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(["fit", "--config", str(config), "--trainer.max_steps", "1", "--model.optimizer.init_args.lr", "5e-6",
                 "--eval.before", "false", "--eval.after", "false"])
        assert sum("will not change" in str(w.message) for w in caught) == expected, dtype
