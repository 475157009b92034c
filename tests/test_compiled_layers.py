"""``model.torch_compile``: the update's decoder layers through ``torch.compile`` give the update of the layers' own forward."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters
from transformers.cache_utils import Cache

from grpo_lightning.fast import compiled_layers as cl
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Sampling
from grpo_lightning.train.update import chunk_loss

TINY = "builtin:tiny-arithmetic"


def test_inside_every_decoder_layer_runs_the_one_compiled_forward_and_after_its_own():
    module = GRPOModule(TINY, dtype="float32")
    layers = cl.decoder_layers(module.policy)
    assert len(layers) == module.policy.config.num_hidden_layers
    own_update = Cache.update
    with cl.compiled_layers(module.policy):
        compiled = cl._compiled_forward(type(layers[0]))
        assert all(vars(layer)["forward"].__func__ is compiled for layer in layers)
        assert Cache.update is not own_update  # the KV cache's Python runs outside the compiled graphs
    assert Cache.update is own_update
    assert not any("forward" in vars(layer) for layer in layers)
    with cl.compiled_layers(module.policy, enabled=False):  # as the update asks under activation checkpointing
        assert not any("forward" in vars(layer) for layer in layers) and Cache.update is own_update


def _loss_and_grads(module, data, old):
    module.policy.zero_grad(set_to_none=True)
    loss, *_ = chunk_loss(module, data, slice(0, data.num_sequences), old, [])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}


@pytest.mark.slow
def test_the_compiled_layers_give_the_update_of_their_own_forward():
    graphs = counters["stats"]["unique_graphs"]
    from conftest import fixed_update_batch

    sampling = Sampling(num_generations=3, max_new_tokens=10, temperature=0.8)
    module = GRPOModule(TINY, dtype="float32", sampling=sampling)
    data, old = fixed_update_batch(module)  # the update's prompt pass shares its keys and values: the KV cache runs
    expected_loss, expected = _loss_and_grads(module, data, old)
    module = GRPOModule(TINY, dtype="float32", sampling=sampling, torch_compile=True)  # the same weights
    assert module.head.compiled
    for _ in range(2):  # the second update reuses what the first compiled
        loss, grads = _loss_and_grads(module, data, old)
        assert loss == pytest.approx(float(expected_loss), rel=1e-5)
        for name, g in grads.items():
            # float32 sums in another order (inductor's fused loops): measured 1.4e-6 to 5e-6 relative per
            # gradient; 1e-4 leaves room for other machines, a dropped term or position moves it by 1e-2 and more
            assert float((g - expected[name]).norm()) < 1e-4 * float(expected[name].norm()), name
    assert counters["stats"]["unique_graphs"] > graphs  # it did run compiled
    # other prompt and completion lengths reuse it: what a run's later updates meet
    graphs = counters["stats"]["unique_graphs"]
    other, other_old = fixed_update_batch(module, prompts=("Tom has 3 apples and buys 12 more apples today.", "Hi"), seed=2)
    assert other.rollout.input_ids.shape != data.rollout.input_ids.shape
    _loss_and_grads(module, other, other_old)
    assert counters["stats"]["unique_graphs"] == graphs
