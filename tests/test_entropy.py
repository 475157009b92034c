"""The policy's token entropy, taken from the chunked log-prob pass."""

import math

import pytest
import torch

from grpo_lightning.core.logprobs import token_logprobs
from grpo_lightning.fast.head_loss import head_logprobs


# the recomputing pass (its own backward) and the plain one (autograd) compute the same values
LOGPROBS = {True: head_logprobs, False: token_logprobs}


def test_entropy_hand_worked():
    # logits [0, ln 2, 0] → p = [1/4, 1/2, 1/4]; H = −(2 · ¼ ln ¼ + ½ ln ½) = ½ ln 4 + ½ ln 2 = 1.5 ln 2
    # logits [0, 0, 0] (hidden 0) → uniform over 3 tokens, H = ln 3
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # [1, 2, 2]
    weight = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0], [0.0, 0.0]])  # [3, 2]
    logp, entropy = token_logprobs(hidden, weight, torch.tensor([[1, 0]]), with_entropy=True)
    assert entropy.tolist()[0] == pytest.approx([1.5 * math.log(2.0), math.log(3.0)])
    assert logp.tolist()[0] == pytest.approx([math.log(0.5), math.log(1 / 3)])


def test_entropy_matches_plain_formula_with_gradients_untouched():
    torch.manual_seed(0)
    hidden = torch.randn(5, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (5, 7))
    log_probs = torch.log_softmax(hidden @ weight.T, dim=-1)
    plain = -(log_probs.exp() * log_probs).sum(-1)
    g_plain = torch.autograd.grad(log_probs.gather(-1, targets.unsqueeze(-1)).sum(), (hidden, weight))
    for recompute in (True, False):
        logp, entropy = LOGPROBS[recompute](hidden, weight, targets, chunk_rows=2, with_entropy=True)
        assert torch.allclose(entropy, plain, atol=1e-5) and not entropy.requires_grad
        g = torch.autograd.grad(logp.sum(), (hidden, weight))  # the entropy adds nothing to the gradient
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_plain))
