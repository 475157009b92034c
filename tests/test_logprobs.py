"""Per-token log-probs and entropies of the chunked LM-head pass (core/logprobs.py), plain and recomputing,
against hand-worked values and the plain formula; the completion mask."""

import math

import pytest
import torch

from grpo_lightning.core.logprobs import completion_mask, token_logprobs
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


def test_completion_mask_through_first_eos():
    ids = torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8], [1, 5, 2, 0]])
    # EOS ids {0, 2}: row 0 ends at index 1, row 1 has none (all kept), row 2 ends at its first EOS (2 at index 2)
    assert completion_mask(ids, [0, 2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]


def test_token_logprobs_hand_worked():
    # logits = h · Wᵀ = [0, ln 2, 0] → softmax [1/4, 1/2, 1/4] → log p(token 1) = ln 0.5, log p(token 0) = ln 0.25
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # [1, 2, 2]
    weight = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0], [0.0, 0.0]])  # [3, 2]
    logp = token_logprobs(hidden, weight, torch.tensor([[1, 0]]))
    assert logp.tolist()[0] == pytest.approx([math.log(0.5), math.log(0.25)])


def test_token_logprobs_divide_logits_by_temperature():
    # logits [0, ln 2, 0] at T = 0.5 → [0, 2 ln 2, 0] → softmax [1/6, 4/6, 1/6] → log p(token 1) = ln (2/3)
    hidden = torch.tensor([[[1.0, 0.0]]])  # [1, 1, 2]
    weight = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0], [0.0, 0.0]])  # [3, 2]
    logp = token_logprobs(hidden, weight, torch.tensor([[1]]), temperature=0.5)
    assert logp.item() == pytest.approx(math.log(2 / 3))


def test_token_logprobs_match_plain_formula_and_gradients():
    """Log-probs, entropies (without a gradient of their own) and the log-probs' gradients of both passes
    against the textbook formulas on full logits."""
    torch.manual_seed(0)
    hidden = torch.randn(5, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (5, 7))
    log_probs = torch.log_softmax(hidden @ weight.T, dim=-1)  # [5, 7, 50]
    plain = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    plain_entropy = -(log_probs.exp() * log_probs).sum(-1)
    g_plain = torch.autograd.grad(plain.sum(), (hidden, weight), retain_graph=True)
    for recompute in (True, False):
        ours, entropy = LOGPROBS[recompute](hidden, weight, targets, chunk_rows=2, with_entropy=True)  # rows 2 + 2 + 1
        assert torch.allclose(ours, plain, atol=1e-5)
        assert torch.allclose(entropy, plain_entropy, atol=1e-5) and not entropy.requires_grad
        g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
        for a, b in zip(g_ours, g_plain):
            assert torch.allclose(a, b, atol=1e-5)


def _plain_logits_logprobs(hidden, weight, bias, targets, temperature):
    logits = (hidden @ weight.T + bias) / temperature  # [N, C, V]
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)  # the textbook −Σ p log p
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


@pytest.mark.parametrize("recompute", [True, False])
def test_token_logprobs_with_temperature_bias_entropy_and_tied_weight(recompute):
    """Values, entropies and the gradients of hidden, weight and bias against the plain formula at T = 0.7,
    with the weight also used as an embedding (tied): its gradient is the sum of both uses."""
    torch.manual_seed(3)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    ids = torch.randint(0, 50, (5, 8))
    targets = ids[:, 1:]
    upstream = torch.randn(5, 7)  # a different gradient for each position, as the loss gives

    def run(fn):
        hidden = torch.tanh(weight[ids[:, :-1]] * 1.5)  # [5, 7, 16]: the embedding use of the weight
        logp, entropy = fn(hidden)
        grads = torch.autograd.grad((logp * upstream).sum(), (weight, bias))
        return logp.detach(), entropy, grads

    plain = run(lambda h: _plain_logits_logprobs(h, weight, bias, targets, 0.7))
    ours = run(lambda h: LOGPROBS[recompute](h, weight, targets, chunk_rows=2, bias=bias,
                                        temperature=0.7, with_entropy=True))
    assert torch.allclose(ours[0], plain[0], atol=1e-5)
    # entropy as lse − Σ p·z rounds differently from −Σ p log p: 1.7e-5 apart here, before and after the fused head
    assert torch.allclose(ours[1], plain[1].detach(), atol=5e-5) and not ours[1].requires_grad
    for a, b in zip(ours[2], plain[2]):
        assert torch.allclose(a, b, atol=1e-5)


def test_token_logprobs_frozen_weight_gives_hidden_gradient_only():
    """The reference-style case: a frozen head still passes gradient to the hidden states."""
    torch.manual_seed(4)
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (3, 4))
    plain = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (g_plain,) = torch.autograd.grad(plain.sum(), hidden)
    (g_ours,) = torch.autograd.grad(token_logprobs(hidden, weight, targets, chunk_rows=2).sum(), hidden)
    assert torch.allclose(g_ours, g_plain, atol=1e-5)
