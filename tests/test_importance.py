"""The importance-sampling correction on small tensors, each expected value worked out by hand."""

import math

import pytest
import torch

from grpo_lightning.core.importance import ImportanceSampling, importance_weights, ratio_summary, ratio_values
from grpo_lightning.core.loss import grpo_loss

LN2, LN4 = math.log(2), math.log(4)
# one completion of 3 tokens, the third padding: the trainer's log-probs minus the sampler's are
# ln 2, −ln 4, (anything: masked)
OLD = torch.tensor([[0.0, -LN4, -5.0]])
SAMPLE = torch.tensor([[-LN2, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 0]])


def weights(mode, clip_max=3.0, clip_min=None):
    return importance_weights(OLD, SAMPLE, MASK, ImportanceSampling(mode, clip_max, clip_min))


def test_token_truncate_clips_each_token_ratio():
    # ratios exp(ln 2) = 2, exp(−ln 4) = 0.25, exp(0) = 1 at the masked position; clip to [0.5, 1.5]
    w = weights("token_truncate", clip_max=1.5, clip_min=0.5)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 1.0]]))


def test_token_mask_zeroes_tokens_outside_the_bounds():
    # 2 > 1.5 → 0; 0.25 within [0, 1.5] (no lower bound) → 0.25; masked position 1
    w = weights("token_mask", clip_max=1.5)
    assert torch.allclose(w, torch.tensor([[0.0, 0.25, 1.0]]))


def test_sequence_modes_use_the_product_of_the_token_ratios():
    # Σ mask·diff = ln 2 − ln 4 = −ln 2 → one ratio 0.5 for the completion, shape [1, 1]
    assert torch.allclose(weights("sequence_truncate"), torch.tensor([[0.5]]))
    assert torch.allclose(weights("sequence_truncate", clip_min=0.8), torch.tensor([[0.8]]))
    assert torch.allclose(weights("sequence_mask", clip_min=0.6), torch.tensor([[0.0]]))  # 0.5 < 0.6: dropped
    assert torch.allclose(weights("sequence_mask"), torch.tensor([[0.5]]))


def test_ratio_values_are_tokens_or_completions_as_trl_logs_them():
    token = weights("token_truncate", clip_max=None)  # 2, 0.25 and the masked 1
    assert torch.allclose(ratio_values(token, MASK), torch.tensor([2.0, 0.25]))
    summary = ratio_summary(ratio_values(token, MASK))
    assert summary["importance/ratio_min"] == 0.25 and summary["importance/ratio_max"] == 2.0
    assert math.isclose(summary["importance/ratio_mean"].item(), 1.125)
    assert ratio_summary(torch.zeros(0)) == {}


def test_the_weights_multiply_the_surrogate_but_not_the_kl():
    # μ = 1: ratio 1, surrogate = A = 1 per token. Weights 2 and 0.5, KL term 0 (ref = logp): the grpo loss
    # is −(2·1 + 0.5·1) / 2 tokens = −1.25. With β = 1 and ref = logp − ln 2 the k3 KL per token is
    # exp(−ln 2) + ln 2 − 1 = 0.19315, unweighted: loss = −(1.25 − 0.19315) = −1.05685.
    logp = torch.tensor([[-1.0, -2.0]])
    adv, mask, w = torch.tensor([1.0]), torch.ones(1, 2), torch.tensor([[2.0, 0.5]])
    loss, _ = grpo_loss(logp, None, logp, adv, mask, 0.2, 0.0, token_weights=w)
    assert math.isclose(loss.item(), -1.25, rel_tol=1e-6)
    loss, _ = grpo_loss(logp, None, logp - LN2, adv, mask, 0.2, 1.0, token_weights=w)
    assert math.isclose(loss.item(), -(1.25 - (0.5 + LN2 - 1)), rel_tol=1e-6)


def test_bad_options_fail_naming_the_option():
    with pytest.raises(ValueError, match="importance_sampling.mode"):
        ImportanceSampling("token_clip")
    with pytest.raises(ValueError, match="clip_min"):
        ImportanceSampling("token_mask", clip_max=1.0, clip_min=2.0)


@pytest.mark.parametrize("fused", [True, False])
def test_the_step_weights_each_token_by_the_sampler_ratio(fused):
    # The tiny model's rollout scored by the same model: with β = 0 and μ = 1 the ratio is 1, so with every
    # advantage 1 each token's surrogate is 1 and the grpo loss is −1. A sampler whose log-probs are the
    # trainer's + ln 2 on every token gives ρ = exp(−ln 2) = 0.5 everywhere (token_truncate, no bounds): −0.5.
    # A sampler equal to the trainer gives ρ = 1: −1 again.
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import Loss, Sampling
    from grpo_lightning.hf.passes import PlainHead, sequence_logprobs
    from grpo_lightning.core.types import GRPOBatch
    from grpo_lightning.train.update import chunk_loss

    module = GRPOModule("builtin:tiny-arithmetic", dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=8),
                        loss=Loss(beta=0), fast=fused)
    if not fused:
        module.head = PlainHead()  # the readable head: autograd through chunked logits
    torch.manual_seed(0)
    rollout = module.engine.generate(module.policy, module.tokenizer, ["1+2=", "30+4="], 4, 8)
    with torch.no_grad():
        trainer = sequence_logprobs(module.policy, rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    mask = rollout.completion_mask
    options = ImportanceSampling("token_truncate", clip_max=None)

    def loss(sample_logp, importance):
        rollout.sample_logprobs, rollout.importance_sampling = sample_logp, importance
        data = GRPOBatch(rollout, None, torch.zeros(8), torch.ones(8), mask, 8, int(mask.sum()), torch.tensor(0.0))
        ratios = []
        loss, *_ = chunk_loss(module, data, slice(0, 8), None, ratios)
        return loss.item(), ratios

    plain, _ = loss(trainer, None)
    same, ratios = loss(trainer, options)
    halved, _ = loss(trainer + LN2, options)
    assert math.isclose(plain, -1.0, rel_tol=1e-6)
    assert math.isclose(same, -1.0, rel_tol=1e-4) and torch.allclose(torch.cat(ratios), torch.ones(1), atol=1e-4)
    assert math.isclose(halved, -0.5, rel_tol=1e-4)
