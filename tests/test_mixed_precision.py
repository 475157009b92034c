"""The CUDA path on the CPU: autocast (bf16 and fp16) with the CPU-only oneDNN kernels off, as on a GPU.

Tolerances. bf16 keeps 8 significant bits, so one product's rounding is up to 2^-8 ≈ 3.9e-3 relative; fp16
keeps 11 (2^-11 ≈ 4.9e-4). Sums are accumulated in fp32, and both paths round the same products, so a
whole gradient compared as one vector differs from the fp32 one by about one rounding step: it is held to
four of them (1.6e-2 for bf16, 2e-3 for fp16). A gradient that underflowed is off by 100%.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from grpo_lightning.fast.gated_mlp import gated_mlps
from grpo_lightning.fast.head_loss import _softmax_in_place, head_loss
from grpo_lightning.fast.kernels import OneDNNLinear, linear

BF16_TOL, FP16_TOL = 4 * 2**-8, 4 * 2**-11


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _head_inputs(N=4, C=8, H=32, V=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, V, (N, C), generator=g)
    return hidden, weight, targets


def _small_loss(logp, lo, hi):
    # A gradient of 1e-6 per token, as a step of 64 × 500 tokens divides by its count: fp16 underflows it
    # (dz = p · g ≈ 3e-4 · 1e-6 is below fp16's smallest subnormal, 6e-8) unless the loss is scaled first.
    return logp.sum() * 1e-6, {}


@pytest.mark.parametrize("dtype, tol, scale", [(torch.bfloat16, BF16_TOL, 1.0), (torch.float16, FP16_TOL, 2.0**16)])
def test_head_loss_under_autocast_equals_autograd(dtype, tol, scale, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    hidden, weight, targets = _head_inputs()
    # fp32 reference: autograd through the plain formula
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    expected = torch.autograd.grad(_small_loss(logp, 0, 4)[0], (hidden, weight))
    with torch.autocast("cpu", dtype=dtype):
        # plain autograd under the same autocast, the loss scaled by S before the backward pass as a GradScaler does
        plain_logp = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        plain = [g / scale for g in torch.autograd.grad(_small_loss(plain_logp, 0, 4)[0] * scale, (hidden, weight))]
        loss, fused_logp, _, _ = head_loss(hidden, weight, targets, _small_loss, chunk_rows=2, loss_scale=scale)
        fused = [g / scale for g in torch.autograd.grad(loss * scale, (hidden, weight))]
    assert relative_error(fused_logp, logp.detach()) < tol
    for got, autograd_got, want in zip(fused, plain, expected):
        assert relative_error(autograd_got, want) < tol  # (the plain path itself is this close)
        assert relative_error(got, want) < tol


def test_head_loss_without_the_loss_scale_underflows_in_fp16(monkeypatch):
    # What the fused pass did before it was told the scale: its fp16 products saw the unscaled gradient.
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    hidden, weight, targets = _head_inputs()
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (expected,) = torch.autograd.grad(_small_loss(logp, 0, 4)[0], (hidden,))
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _, _, _ = head_loss(hidden, weight, targets, _small_loss, chunk_rows=2, loss_scale=1.0)
        (got,) = torch.autograd.grad(loss * 2.0**16, (hidden,))
    assert relative_error(got / 2.0**16, expected) > 50 * FP16_TOL  # measured: 23% off, against 0.1% scaled


def test_entropy_is_computed_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 151_936, generator=g) * 4  # Qwen2.5's vocabulary, logits of a few units
    p = torch.softmax(z.double(), -1)
    expected = -(p * torch.log_softmax(z.double(), -1)).sum(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, entropy = _softmax_in_place(z.clone())
    # measured: 1.5e-6 nat off; a bf16 dot product, or a fp32 row-by-column product, is off by 2e-3 or more
    assert (entropy.double() - expected).abs().max() < 1e-4


def test_onednn_steps_aside_under_autocast():
    assert torch.backends.mkldnn.is_available()
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, layer.weight, layer.bias).dtype == torch.bfloat16  # autocast's product, as on a GPU
        fast = OneDNNLinear(layer)
        out = fast(x.bfloat16())  # bf16 activations against fp32 weights: oneDNN would refuse them
        assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), layer(x).float(), atol=0.05)
    with torch.no_grad():
        assert torch.allclose(OneDNNLinear(layer)(x), layer(x), atol=1e-6)  # in fp32 it is still oneDNN's


def test_gated_mlp_under_bf16_autocast_equals_autograd_even_with_its_backward_outside():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    torch.manual_seed(0)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=64, intermediate_size=128, hidden_act="silu"))
    x = torch.randn(4, 6, 64, requires_grad=True)
    upstream = torch.randn(4, 6, 64)
    expected = torch.autograd.grad((mlp(x) * upstream).sum(), (x, *mlp.parameters()))  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16), gated_mlps(mlp):
        out = mlp(x)
    assert out.dtype == torch.bfloat16
    # the backward pass runs outside autocast (a bf16 dy against fp32 weights): it restores its forward's state
    got = torch.autograd.grad((out.float() * upstream).sum(), (x, *mlp.parameters()))
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype == torch.float32
        assert relative_error(a, b) < BF16_TOL


def test_grad_scaler_plugin_runs_fp16_autocast():
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with plugin.forward_context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


def _update_gradients(model_dir, fused: bool, dtype: torch.dtype | None, scale: float) -> tuple:
    """The module's update loss on a fixed rollout and its parameter gradients (unscaled), under ``dtype`` autocast."""
    from conftest import fixed_update_batch
    from grpo_lightning.hf.passes import PlainHead
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import Memory, Sampling
    from grpo_lightning.train.update import chunk_loss

    module = GRPOModule(str(model_dir), dtype="float32", sampling=Sampling(num_generations=3, max_new_tokens=10, temperature=0.8),
                        memory=Memory(logprob_chunk_rows=2), fast=fused)
    if not fused:
        module.head = PlainHead()  # autograd through the chunked logits
    data, old = fixed_update_batch(module)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        # scale: what a GradScaler of that scale tells the update
        loss, *_ = chunk_loss(module, data, slice(0, data.num_sequences), old, [], loss_scale=scale)
        (loss * scale).backward()
    return loss.detach(), torch.cat([p.grad.flatten() / scale for p in module.policy.parameters()])


@pytest.mark.parametrize("dtype, tol, scale", [(torch.bfloat16, BF16_TOL, 1.0), (torch.float16, FP16_TOL, 2.0**16)])
def test_update_under_autocast_equals_plain_autograd(tiny_model_dir, dtype, tol, scale, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    loss_fp32, grads_fp32 = _update_gradients(tiny_model_dir, fused=False, dtype=None, scale=1.0)
    loss_plain, grads_plain = _update_gradients(tiny_model_dir, fused=False, dtype=dtype, scale=scale)
    loss_fused, grads_fused = _update_gradients(tiny_model_dir, fused=True, dtype=dtype, scale=scale)
    # measured (bf16 / fp16): fused against plain 2.7e-3 / 3.5e-4, against fp32 2.9e-3 / 3.5e-4; plain against
    # fp32 3.8e-3 / 4.6e-4: the fused head is as close to fp32 as autograd under the same autocast
    assert relative_error(grads_fused, grads_plain) < tol
    assert relative_error(grads_fused, grads_fp32) < tol
    assert torch.allclose(loss_fused, loss_plain, rtol=tol) and torch.allclose(loss_fused, loss_fp32, rtol=tol)
