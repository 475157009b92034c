"""Loss types, reward scales, asymmetric clipping and truncation masks, against hand-worked examples.

The loss of a step must not depend on how its rows are cut into chunks: the last test checks that for
every loss type, value and gradient.
"""

import math

import pytest
import torch

from grpo_lightning.core.loss import LOSS_AGGREGATIONS, grpo_loss

from grpo_lightning.core.advantages import drop_truncated, frac_reward_zero_std, group_advantages

LN = math.log

# The fixtures of test_loss.py: two completions of two tokens, row 1's second token past its EOS.
LOGP = torch.full((2, 2), LN(0.5))
OLD = torch.tensor([[LN(0.25), LN(0.5)], [LN(0.5), LN(1.0)]])  # ratios [[2, 1], [1, 0.5]]
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1], [1, 0]])
# With ε = 0.2 the per-token objective min(r·A, clip(r)·A) is [[1.2, 1], [−1, (masked)]].


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", -0.05),  # row means 1.1 and −1, then their mean: −(1.1 − 1) / 2
        ("bnpo", -0.4),  # one mean over the 3 unmasked tokens: −(1.2 + 1 − 1) / 3
        ("dapo", -0.4),  # the same rule: the step's batch is its generation batch
        ("dr_grpo", -0.15),  # token sum over completions × max_new_tokens: −1.2 / (2 · 4)
    ],
)
def test_loss_types_hand_worked(loss_type, expected):
    loss, _ = grpo_loss(LOGP, OLD, None, ADV, MASK, clip_eps=0.2, beta=0.0, loss_type=loss_type, max_new_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_loss_type_errors():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(LOGP, OLD, None, ADV, MASK, clip_eps=0.2, beta=0.0, loss_type="ppo")
    with pytest.raises(ValueError, match="pass max_new_tokens"):
        grpo_loss(LOGP, OLD, None, ADV, MASK, clip_eps=0.2, beta=0.0, loss_type="dr_grpo")


FULL = torch.ones(2, 2)


def test_clip_fractions_low_and_high_hand_worked():
    # Every token counts. A = [+1, −1]; ratios [[2, 1], [1, 0.5]]; ε = 0.2, range [0.8, 1.2].
    # (0,0): r = 2 > 1.2 with A > 0 → the clip binds (high). (1,1): r = 0.5 < 0.8 with A < 0 → binds (low).
    _, stats = grpo_loss(LOGP, OLD, None, ADV, FULL, clip_eps=0.2, beta=0.0)
    assert stats["clip_fraction/high"].item() == pytest.approx(1 / 4)
    assert stats["clip_fraction/low"].item() == pytest.approx(1 / 4)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 2)
    # Flipped advantages: min(2·(−1), 1.2·(−1)) = −2 and min(0.5·1, 0.8·1) = 0.5 take the unclipped term,
    # the gradient flows, and nothing counts as clipped although both ratios are outside the range.
    _, stats = grpo_loss(LOGP, OLD, None, -ADV, FULL, clip_eps=0.2, beta=0.0)
    assert stats["clip_fraction"].item() == 0.0


def test_epsilon_high_hand_worked():
    # ε_low 0.2, ε_high 1.5: the range is [0.8, 2.5], so r = 2 with A = +1 is no longer clipped.
    # Row 0: (2 + 1) / 2 = 1.5; row 1: (−1 + min(−0.5, −0.8)) / 2 = −0.9; loss −(1.5 − 0.9) / 2 = −0.3
    loss, stats = grpo_loss(LOGP, OLD, None, ADV, FULL, clip_eps=0.2, beta=0.0, epsilon_high=1.5)
    assert loss.item() == pytest.approx(-0.3, abs=1e-6)
    assert stats["clip_fraction/high"].item() == 0.0 and stats["clip_fraction/low"].item() == pytest.approx(1 / 4)
    # default: ε_high = ε, row 0 is (1.2 + 1) / 2 = 1.1 → −(1.1 − 0.9) / 2 = −0.1
    loss, _ = grpo_loss(LOGP, OLD, None, ADV, FULL, clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)


REWARDS = torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0, 2.0])  # two groups of 3


def test_scale_rewards_hand_worked():
    # Centred by group means 2 and 2: [−1, 0, 1, 0, 0, 0].
    # group: the first group's unbiased std is 1, the second's 0 → [−1, 0, 1] / 1.0001 and zeros.
    # batch: the std of all six is sqrt((1 + 1) / 5) = sqrt(0.4) → [−1, 0, 1] / (0.632456 + 1e-4).
    # none: the centred rewards themselves.
    group = group_advantages(REWARDS, 3, scale_rewards="group")
    batch = group_advantages(REWARDS, 3, scale_rewards="batch")
    none = group_advantages(REWARDS, 3, scale_rewards="none")
    assert group.tolist() == pytest.approx([-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0], abs=1e-6)
    s = math.sqrt(0.4) + 1e-4
    assert batch.tolist() == pytest.approx([-1 / s, 0, 1 / s, 0, 0, 0], abs=1e-6)
    assert none.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(REWARDS, 3, scale_rewards="rank")


def test_frac_reward_zero_std_hand_worked():
    assert frac_reward_zero_std(REWARDS, 3).item() == 0.5  # the second group is all 2.0
    # eight equal float32 rewards of 0.6: their computed std is 6.4e-8, not 0 (the mean rounds), yet the
    # group is all equal and counts
    equal = torch.cat([torch.full((8,), 0.6), torch.arange(8.0)])
    assert equal[:8].std().item() != 0.0
    assert frac_reward_zero_std(equal, 8).item() == 0.5


def test_drop_truncated_hand_worked():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert drop_truncated(mask, torch.tensor([True, False])).tolist() == [[0, 0, 0], [1, 1, 0]]
    # the grpo loss keeps the dropped row in its count of sequences: row 1 of the fixtures alone
    # gives −(−1) / 2 = 0.5, not −(−1) / 1
    loss, _ = grpo_loss(LOGP, OLD, None, ADV, drop_truncated(MASK, torch.tensor([True, False])), 0.2, 0.0)
    assert loss.item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss_type", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("rows_per_chunk", [1, 2, 4])
def test_chunked_accumulation_equals_the_whole_step(loss_type, rows_per_chunk):
    N, C = 6, 5
    g = torch.Generator().manual_seed(0)
    logp0 = -torch.rand(N, C, generator=g) * 2
    old = logp0 + 0.3 * torch.randn(N, C, generator=g)  # ratios away from 1, some clipped
    ref = logp0 + 0.3 * torch.randn(N, C, generator=g)
    adv = torch.randn(N, generator=g)
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])  # uneven, one empty row: length weighting matters
    mask = (torch.arange(C) < lengths.unsqueeze(1)).int()
    kwargs = dict(clip_eps=0.2, beta=0.04, loss_type=loss_type, epsilon_high=0.28, max_new_tokens=8)

    whole_logp = logp0.clone().requires_grad_(True)
    whole, whole_stats = grpo_loss(whole_logp, old, ref, adv, mask, **kwargs)
    whole.backward()

    chunk_logp = logp0.clone().requires_grad_(True)
    total, stats_sum = torch.zeros(()), {}
    for start in range(0, N, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        loss, stats = grpo_loss(
            chunk_logp[rows], old[rows], ref[rows], adv[rows], mask[rows], **kwargs,
            num_sequences=N, num_tokens=int(mask.sum()),
        )
        loss.backward()  # gradients accumulate, as the module's chunks do
        total = total + loss.detach()
        stats_sum = {k: stats_sum.get(k, 0) + v for k, v in stats.items()}
    assert total.item() == pytest.approx(whole.item(), abs=1e-6)
    assert torch.allclose(chunk_logp.grad, whole_logp.grad, atol=1e-7)
    for key, value in whole_stats.items():
        assert stats_sum[key].item() == pytest.approx(value.item(), abs=1e-6), key


def test_chunk_local_denominators_would_differ():
    # Why the step's counts are passed in: with each chunk's own token count, bnpo changes with chunking.
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp, adv = torch.zeros(2, 3), torch.tensor([1.0, -1.0])
    whole, _ = grpo_loss(logp, None, None, adv, mask, 0.2, 0.0, loss_type="bnpo")  # −(3 − 1) / 4 = −0.5
    local = sum(grpo_loss(logp[i : i + 1], None, None, adv[i : i + 1], mask[i : i + 1], 0.2, 0.0, loss_type="bnpo")[0] for i in range(2))
    assert whole.item() == pytest.approx(-0.5) and local.item() == pytest.approx(0.0)  # −3/3 + 1/1
