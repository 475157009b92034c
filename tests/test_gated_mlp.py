"""The gated MLP with its own backward: the module's output and gradients, two [T, I] tensors fewer kept."""

import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from grpo_lightning.fast.gated_mlp import gated_mlps


def _mlp_and_input(seed=0):
    torch.manual_seed(seed)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=24, intermediate_size=40, hidden_act="silu"))
    return mlp, torch.randn(3, 5, 24, requires_grad=True)


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def test_gated_mlp_equals_the_module_with_gradients():
    mlp, x = _mlp_and_input()
    upstream = torch.randn(3, 5, 24)
    plain = mlp(x)
    expected = torch.autograd.grad((plain * upstream).sum(), (x, *mlp.parameters()))
    with gated_mlps(mlp):
        fused = mlp(x)
    assert "forward" not in vars(mlp)  # the module's own forward is back
    got = torch.autograd.grad((fused * upstream).sum(), (x, *mlp.parameters()))
    assert torch.allclose(fused, plain, atol=1e-6)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_gated_mlp_keeps_two_intermediate_tensors_fewer():
    mlp, x = _mlp_and_input(1)
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()} | {x.untyped_storage().data_ptr()}
    _, plain = _saved_bytes(lambda: mlp(x))
    with gated_mlps(mlp):
        _, fused = _saved_bytes(lambda: mlp(x))
    intermediate = 3 * 5 * 40 * 4  # bytes of one [T, I] float tensor
    plain_kept = sum(n for k, n in plain.items() if k not in params)
    fused_kept = sum(n for k, n in fused.items() if k not in params)
    assert plain_kept == 4 * intermediate and fused_kept == 2 * intermediate  # gate, silu, up, product → gate, up


def test_layers_it_does_not_apply_to_keep_their_forward():
    mlp, _ = _mlp_and_input()
    mlp.down_proj = torch.nn.Linear(40, 24, bias=True)  # a bias: not the Qwen2 / Llama form
    with gated_mlps(mlp):
        assert "forward" not in vars(mlp)
    plain, _ = _mlp_and_input()
    with gated_mlps(plain, enabled=False):  # as the update asks while activation checkpointing is on
        assert "forward" not in vars(plain)
