"""Sampling (engines/generate.py, fast/sampler.py): oneDNN layers swapped in and back, the same tokens as plain
``generate``, and the inverse-CDF sampler's draws."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, TemperatureLogitsWarper

from grpo_lightning.engines.generate import generate_rollout, sampling_mode
from grpo_lightning.fast.kernels import OneDNNLinear, onednn_available

PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting."]


@pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN (mkldnn) CPU kernels")
def test_sampling_mode_swaps_every_linear_and_puts_each_back(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {name: module for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    frozen = "model.layers.0.mlp.up_proj"
    before[frozen].weight.requires_grad_(False)  # as a LoRA's base layers: no gradient whose memory a copy takes
    with sampling_mode(model, rows=4):
        during = dict(model.named_modules())
        assert all(isinstance(during[name], OneDNNLinear) for name in before)
        # the head and every trainable weight reordered for 4 rows; the frozen one multiplied as it is
        assert all(during[name].kernel_weight.is_mkldnn for name in before if name != frozen)
        assert during[frozen].kernel_weight.data_ptr() == before[frozen].weight.data_ptr()
        assert all(during[name].weight is layer.weight for name, layer in before.items())  # the model's own
    after = dict(model.named_modules())
    assert all(after[name] is module for name, module in before.items())


def test_greedy_samples_equal_plain_generate_token_for_token(tiny_model_dir):
    """The sampler's kernels change float rounding only: greedy decoding gives HF ``generate``'s tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = generate_rollout(model, tokenizer, PROMPTS, 3, 24, generation_kwargs={"do_sample": False})
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=24,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = plain.repeat_interleave(3, dim=0)  # [N, P + C]
    C = plain.shape[1] - enc.input_ids.shape[1]
    mask = ours.completion_mask[:, :C].bool()  # ours stops each row at its first EOS; generate pads after it
    assert mask.sum() > 20
    assert torch.equal(ours.input_ids[:, : ours.prompt_length + C][:, ours.prompt_length:][mask], plain[:, -C:][mask])


def test_inverse_cdf_sampler_draws_softmax_over_temperature():
    """logits [0, ln 2, ln 4, 0, −inf, ln 3] at T = 1/2: weights [1, 4, 16, 1, 0, 9] / 31, by hand."""
    from grpo_lightning.fast.sampler import InverseCDFSampler

    n = 62_000
    logits = torch.tensor([0.0, math.log(2), math.log(4), 0.0, float("-inf"), math.log(3)]).expand(n, 6)
    torch.manual_seed(0)
    sampler = InverseCDFSampler(temperature=0.5, record=True)
    scores = sampler(None, logits)
    tokens = scores.argmax(-1)
    assert torch.equal(scores.isfinite().sum(-1), torch.ones(n, dtype=torch.long))  # one token kept per row
    freq = torch.bincount(tokens, minlength=6) / n
    expected = torch.tensor([1, 4, 16, 1, 0, 9]) / 31
    assert freq[4] == 0  # probability 0 is never drawn
    assert (freq - expected).abs().max() < 0.01  # 5 standard deviations at most (0.002 each)
    recorded = sampler.take_logprobs()  # [n, 1]
    assert torch.allclose(recorded.squeeze(1), expected.log()[tokens], atol=1e-6)


def test_rollouts_draw_with_the_inverse_cdf_unless_generate_must_sample(tiny_model_dir, monkeypatch):
    """Plain softmax(logits / T) sampling never reaches torch.multinomial; the seed's config or a top-k does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    neutral = {"min_new_tokens": 8, "top_k": 0, "top_p": 1.0}  # as the benchmark passes them
    generate_rollout(model, tokenizer, PROMPTS, 2, 8, temperature=0.7, generation_kwargs=neutral)
    own_processor = LogitsProcessorList([TemperatureLogitsWarper(0.9)])
    for options in ({"generation_kwargs": {"top_k": 5}}, {"generation_kwargs": {"top_p": 0.9, "top_k": 0}},
                    {"generation_kwargs": {"logits_processor": own_processor}}, {"use_model_generation_config": True}):
        with pytest.raises(AssertionError, match="multinomial"):
            generate_rollout(model, tokenizer, PROMPTS, 2, 8, **options)
