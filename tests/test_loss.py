"""GRPO maths against hand-worked examples (derivations in the comments)."""

import math

import pytest
import torch

from grpo_lightning.core.loss import approx_kl, grpo_loss, masked_mean

from grpo_lightning.core.advantages import group_advantages

LN = math.log


def test_group_advantages_hand_worked():
    # group [1, 2, 3]: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 → (r − 2) / 1.0001
    # group [2, 2, 2]: std 0 → every advantage 0 (no sample is better than another)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 2.0, 2.0, 2.0]), num_generations=3)
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-7)


def test_group_advantages_bad_sizes():
    with pytest.raises(ValueError, match="do not divide into groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(6), 1)


def test_approx_kl_hand_worked():
    # δ = ref − logp. δ = ln 0.5: 0.5 − ln 0.5 − 1 = 0.193147; δ = 0: 0; δ = ln 2: 2 − ln 2 − 1 = 0.306853
    kl = approx_kl(torch.tensor([LN(0.5), 0.0, 0.0]), torch.tensor([LN(0.25), 0.0, LN(2.0)]))
    assert kl.tolist() == pytest.approx([0.193147, 0.0, 0.306853], abs=1e-6)


def test_masked_mean_hand_worked():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).tolist() == [1.5, 4.0]  # (1 + 2) / 2 and 4 / 1


# Two completions of two tokens; the second token of row 1 is past its EOS (mask 0).
LOGP = torch.full((2, 2), LN(0.5))
OLD = torch.tensor([[LN(0.25), LN(0.5)], [LN(0.5), LN(1.0)]])  # ratios [[2, 1], [1, 0.5]]
REF = torch.tensor([[LN(0.25), LN(0.5)], [LN(0.5), LN(0.5)]])
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1, 1], [1, 0]])


def test_grpo_loss_clipped_surrogate_hand_worked():
    # ε = 0.2: clipped ratios [[1.2, 1], [1, 0.8]].
    # row 0 (A = +1): min(2, 1.2) = 1.2, min(1, 1) = 1 → mean 1.1
    # row 1 (A = −1): min(−1, −1) = −1; second token masked → mean −1
    # loss = −(1.1 − 1) / 2 = −0.05; clipped unmasked tokens: 1 of 3
    loss, stats = grpo_loss(LOGP, OLD, None, ADV, MASK, clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-0.05, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    assert stats["kl"].item() == 0.0


def test_grpo_loss_with_kl_hand_worked():
    # KL only at row 0, token 0: δ = ln 0.25 − ln 0.5 = ln 0.5 → 0.193147; β = 0.1
    # row 0: (1.2 − 0.0193147 + 1) / 2 = 1.09034265; row 1: −1 → loss = −0.09034265 / 2
    loss, stats = grpo_loss(LOGP, OLD, REF, ADV, MASK, clip_eps=0.2, beta=0.1)
    assert loss.item() == pytest.approx(-0.045171325, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.193147 / 3, abs=1e-6)


def test_grpo_loss_mu1_gradient_is_policy_gradient():
    # old_logp=None: ratio ≡ 1, loss = −mean_i(A_i) = 0 here, and ∂loss/∂logp_it = −A_i / (n_i · N)
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, None, None, ADV, MASK, clip_eps=0.2, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.5, 0.0])  # −1/(2·2), +1/(1·2), masked 0
    assert stats["ratio"].item() == 1.0
    assert not any(v.requires_grad for v in stats.values())


def test_grpo_loss_needs_reference_for_kl():
    with pytest.raises(ValueError, match="ref_logp is required"):
        grpo_loss(LOGP, None, None, ADV, MASK, clip_eps=0.2, beta=0.1)
