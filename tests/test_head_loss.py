"""The fused LM-head loss: the same loss, log-probs, statistics and gradients as autograd through the plain formula."""

import pytest
import torch

from grpo_lightning.core.loss import LOSS_AGGREGATIONS, grpo_loss
from grpo_lightning.fast.head_loss import TiedWeightGrad, head_loss, tied_embedding


def _inputs(seed=0, N=5, C=6, H=16, V=40):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V, H, generator=g) * 0.25).requires_grad_()  # logits of order 1, log-probs near −ln V
    bias = torch.randn(V, generator=g).requires_grad_()
    scale = torch.tensor(1.5, requires_grad=True)  # stands for the layers between the embedding and the head
    ids = torch.randint(0, V, (N, C + 1), generator=g)
    fixed = {
        # old and ref = the log-probs plus noise of ±0.15: some ratios clip at ε = 0.2, most do not
        "old_noise": torch.randn(N, C, generator=g) * 0.15,
        "ref_noise": torch.randn(N, C, generator=g) * 0.15,
        "adv": torch.randn(N, generator=g),
        "mask": (torch.rand(N, C, generator=g) > 0.2).int(),
    }
    return weight, bias, scale, ids, fixed


@pytest.mark.parametrize("loss_type", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("with_old", [False, True])
def test_head_loss_equals_autograd_through_the_plain_formula(loss_type, with_old):
    weight, bias, scale, ids, f = _inputs()
    N, T = ids.shape[0], 0.7
    num_tokens = int(f["mask"].sum())

    def hidden():  # the tied weight used as an embedding first, so its gradient has two parts
        return torch.tanh(weight[ids[:, :-1]] * scale)  # [N, C, H]

    logits = (hidden() @ weight.T + bias) / T
    logp_plain = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    f["old"], f["ref"] = logp_plain.detach() + f["old_noise"], logp_plain.detach() + f["ref_noise"]

    def loss_of(logp, lo, hi):
        rows = slice(lo, hi)
        return grpo_loss(logp, f["old"][rows] if with_old else None, f["ref"][rows], f["adv"][rows], f["mask"][rows],
                         0.2, 0.04, loss_type=loss_type, max_new_tokens=6, num_sequences=N, num_tokens=num_tokens)

    entropy_plain = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    loss_plain, stats_plain = loss_of(logp_plain, 0, N)
    grads_plain = torch.autograd.grad(loss_plain, (weight, bias, scale))

    loss, logp, entropy, stats = head_loss(hidden(), weight, ids[:, 1:], loss_of, chunk_rows=2, bias=bias, temperature=T)
    grads = torch.autograd.grad(loss, (weight, bias, scale))  # chunks of 2 + 2 + 1 rows

    if with_old:
        assert 0 < stats_plain["clip_fraction"] < 0.5  # the clipped branch is exercised
    assert torch.allclose(loss, loss_plain, atol=1e-6)
    assert torch.allclose(logp, logp_plain, atol=1e-5) and not logp.requires_grad
    assert torch.allclose(entropy, entropy_plain, atol=5e-5)
    for key, value in stats_plain.items():
        assert torch.allclose(stats[key], value, atol=1e-6), key
    for a, b in zip(grads, grads_plain):
        assert torch.allclose(a, b, atol=1e-5)


def test_head_loss_scales_by_the_incoming_gradient():
    weight, bias, scale, ids, f = _inputs(seed=1)

    def loss_of(logp, lo, hi):
        return (logp * f["mask"][lo:hi]).sum(), {}

    def grad(factor):
        hidden = torch.tanh(weight[ids[:, :-1]] * scale)
        loss, *_ = head_loss(hidden, weight, ids[:, 1:], loss_of, chunk_rows=3)
        return torch.autograd.grad(factor * loss, (scale, weight))

    for a, b in zip(grad(3.0), grad(1.0)):
        assert torch.allclose(a, 3.0 * b, atol=1e-4)


def test_tied_embedding_matches_nn_embedding_and_skips_the_padding_row():
    """Alone (no head before it), the lookup's weight gradient is nn.Embedding's: padding row left at zero."""
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([[0, 3, 3, 1], [2, 0, 4, 3]])  # pad id 0 twice, id 3 three times
    upstream = torch.randn(2, 4, 6, generator=g)
    emb = torch.nn.Embedding(5, 6, padding_idx=0)
    (emb(ids) * upstream).sum().backward()
    weight = emb.weight.detach().clone().requires_grad_()
    out = tied_embedding(ids, weight, 0, TiedWeightGrad())
    (out * upstream).sum().backward()
    assert torch.equal(out, emb(ids))
    assert torch.allclose(weight.grad, emb.weight.grad, atol=1e-6)
    assert torch.equal(weight.grad[0], torch.zeros(6)) and weight.grad[3].abs().sum() > 0


def test_tied_weight_gradient_gathered_in_the_head_buffer_equals_autograd():
    """Head and embedding share the weight; through the sink its one gradient equals autograd's sum of two."""
    weight, bias, scale, ids, f = _inputs(seed=3)
    inputs = ids[:, :-1].clone()
    inputs[0, :2] = 0  # two padding positions, as left padding puts them

    def loss_of(logp, lo, hi):
        return -(logp * f["adv"][lo:hi, None] * f["mask"][lo:hi]).sum() / 7.0, {}

    hidden = torch.tanh(torch.nn.functional.embedding(inputs, weight, padding_idx=0) * scale)
    plain, *_ = head_loss(hidden, weight, ids[:, 1:], loss_of, chunk_rows=2, bias=bias)
    expected = torch.autograd.grad(2.0 * plain, (weight, bias, scale))

    class Recording(TiedWeightGrad):  # remembers the buffer the head left for the embedding
        def __setattr__(self, name, value):
            if name == "grad" and value is not None:
                object.__setattr__(self, "received", value)
            object.__setattr__(self, name, value)

    sink = Recording()
    hidden = torch.tanh(tied_embedding(inputs, weight, 0, sink) * scale)
    folded, *_ = head_loss(hidden, weight, ids[:, 1:], loss_of, chunk_rows=2, bias=bias, sink=sink)
    got = torch.autograd.grad(2.0 * folded, (weight, bias, scale))  # the incoming gradient 2 scales both parts
    assert torch.equal(folded, plain) and sink.grad is None  # the buffer went on to autograd
    assert got[0].data_ptr() == sink.received.data_ptr()  # one [V, H] buffer holds both parts
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_update_gradients_equal_with_the_memory_safe_head_and_the_plain_one(tiny_model_dir):
    """The module's update loss through the memory-safe head and through autograd (:class:`PlainHead`): same loss
    and parameter gradients (shared-prompt pass, ratio away from 1, KL on)."""
    from conftest import fixed_update_batch
    from grpo_lightning.hf.passes import PlainHead
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import Memory, Sampling
    from grpo_lightning.train.update import chunk_loss

    results = []
    for memory_safe in (False, True):
        module = GRPOModule(str(tiny_model_dir), dtype="float32", sampling=Sampling(num_generations=3, max_new_tokens=10,
                            temperature=0.8), memory=Memory(logprob_chunk_rows=2), fast=False)
        if not memory_safe:
            module.head = PlainHead()  # (before the first pass: the root takes the module's head)
        data, old = fixed_update_batch(module)
        loss, logp, entropy, stats = chunk_loss(module, data, slice(0, data.num_sequences), old, [])
        loss.backward()
        results.append((loss.detach(), logp.detach(), [p.grad.clone() for p in module.policy.parameters()]))
    (loss_a, logp_a, grads_a), (loss_b, logp_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.allclose(logp_a, logp_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-5)


def test_softmax_blocks_are_sized_by_memory():
    from grpo_lightning.fast.head_loss import softmax_block_rows

    # The GPU config's chunk: 8 rows × 500 positions of V = 151,936; 128 MiB / (4 bytes × V) = 220.8 positions
    assert softmax_block_rows(4000, 151_936) == 220
    assert softmax_block_rows(10, 200) == 3  # a quarter of the chunk, rounded up, below the byte budget
    assert softmax_block_rows(1, 10**9) == 1  # at least one position


def test_softmax_in_place_is_the_same_in_any_blocks():
    from grpo_lightning.fast.head_loss import _softmax_in_place

    z = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    for block in (None, 1, 4, 15):
        p = z.clone()
        lse, entropy = _softmax_in_place(p, block)
        torch.testing.assert_close(p, torch.softmax(z, -1))
        torch.testing.assert_close(lse, torch.logsumexp(z, -1))
        torch.testing.assert_close(entropy, -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))
