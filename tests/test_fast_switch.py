"""``model.fast``: one switch for the CPU speed pieces of grpo_lightning/fast; on and off give the same update.

The same recorded rollout (a replay engine) is trained on once with the switch on and once with it off: the
loss, the gradient norm and the weights' change agree within float32 rounding. With the switch off, none of
the speed pieces runs; with it on, each one does. The memory-safe LM head runs either way; the same rollout
trained on through the readable head (``PlainHead``: autograd through chunked logits) gives the same update.

Sampled tokens are not the same at the same seed: the inverse-CDF sampler draws one uniform per row and step,
``generate``'s own sampling draws from ``torch.multinomial``, so the two consume the random stream differently
(both draw from softmax(logits / T)). Greedy decoding, which draws nothing, gives the same tokens.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from grpo_lightning.engines import generate
from grpo_lightning.engines.generate import GenerateEngine, generate_rollout
from grpo_lightning.engines.replay import RecordingEngine, ReplayEngine
from grpo_lightning.fast import gated_mlp, head_loss, kernels, sampler
from grpo_lightning.hf.passes import PlainHead
from grpo_lightning.train import reference
from grpo_lightning.train.data import PromptDataModule
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Loss, Optimization, Sampling

TINY = "builtin:tiny-arithmetic"


@pytest.fixture
def pieces_run(monkeypatch) -> dict[str, int]:
    """How often each speed piece ran (the gated MLP's autograd Function, the oneDNN layer, the sampler, the
    decoding and reference passes' buffers kept in the heap), and the memory-safe head's Functions (keys starting with ``Head``)."""
    counts = {"HeadLoss": 0, "HeadLogProb": 0, "GatedMLP": 0, "OneDNNLinear": 0, "InverseCDFSampler": 0, "heap_kept": 0,
              "reference heap_kept": 0}

    def counting(name, run, static):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return run(*args, **kwargs)
        return staticmethod(wrapper) if static else wrapper

    for owner, name in ((head_loss.HeadLoss, "forward"), (head_loss.HeadLogProb, "forward"), (gated_mlp.GatedMLP, "forward")):
        monkeypatch.setattr(owner, name, counting(owner.__name__, owner.forward, static=True))
    monkeypatch.setattr(kernels.OneDNNLinear, "forward", counting("OneDNNLinear", kernels.OneDNNLinear.forward, False))
    monkeypatch.setattr(sampler.InverseCDFSampler, "__call__",
                        counting("InverseCDFSampler", sampler.InverseCDFSampler.__call__, False))
    monkeypatch.setattr(generate, "heap_kept", counting("heap_kept", generate.heap_kept, False))
    monkeypatch.setattr(reference, "heap_kept", counting("reference heap_kept", reference.heap_kept, False))
    return counts


def speed_pieces(counts: dict[str, int]) -> dict[str, int]:
    return {name: n for name, n in counts.items() if not name.startswith("Head")}


def fit(engine, fast: bool, plain_head: bool = False) -> tuple[GRPOModule, dict[str, torch.Tensor], dict[str, float]]:
    """One rollout step (μ = 2 updates, KL on, T = 0.8) from seed 0; the module, the weights' change and the metrics."""
    L.seed_everything(0, verbose=False)
    module = GRPOModule(
        TINY, dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=16, temperature=0.8), loss=Loss(beta=0.04),
        optimization=Optimization(mu=2), fast=fast, rollout=engine,
        # SGD: the change is lr × the clipped gradient, so it differs as the gradients do (Adam's first step,
        # about lr × sign(g), would turn rounding in a near-zero gradient into a difference of 2 lr)
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )
    if plain_head:
        module.head = PlainHead()  # the readable LM head (before the first pass: the root takes the module's)
    start = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    data = PromptDataModule(source="task:arithmetic", batch_size=2, eval_size=4, seed=0, tokenizer_name_or_path=TINY)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    change = {k: v.detach() - start[k] for k, v in module.policy.state_dict().items()}
    return module, change, {k: float(v) for k, v in trainer.callback_metrics.items()}


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return diff / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5


def same_update(a: tuple, b: tuple) -> None:
    """The loss, gradient norm, KL, entropy and the weights' change of two fits agree within float32 rounding."""
    (_, a_change, a_metrics), (_, b_change, b_metrics) = a, b
    # The paths differ only in the order of float32 sums (oneDNN against torch's GEMM, the memory-safe head's
    # gradient against autograd's, the gated MLP's recomputed activations): about 1e-7 relative per product.
    # The loss and the gradient are sums of advantage-weighted terms of both signs (a group's advantages sum
    # to 0), which cancel and so magnify that rounding: measured, the weights' change differs by 5e-6
    # (relative) after one update and 1.2e-5 after the second (which starts from the first's weights), the
    # loss by 6e-6. 1e-4 leaves room for other machines' kernels; a real difference between the paths (a
    # temperature applied twice, a dropped term or position) moves these by 1e-2 and more.
    for key in ("loss", "grad_norm", "kl", "entropy"):
        assert a_metrics[key] == pytest.approx(b_metrics[key], rel=1e-4, abs=1e-7), key
    assert relative(a_change, b_change) < 1e-4
    assert max(float(c.abs().max()) for c in b_change.values()) > 1e-4  # the step did move the weights


def test_the_switch_on_and_off_and_the_plain_head_give_the_same_update_on_the_same_rollout(pieces_run):
    recorder = RecordingEngine(GenerateEngine())
    fast = fit(recorder, fast=True)
    assert all(n > 0 for n in pieces_run.values()), pieces_run  # on: every piece ran, and the memory-safe head
    for name in pieces_run:
        pieces_run[name] = 0
    replay = ReplayEngine(recorder.rollouts)
    plain_layers = fit(replay, fast=False)
    assert replay.served == 1
    assert not any(speed_pieces(pieces_run).values()), pieces_run  # off: none ran (nn.Linear, no sampler, no GatedMLP)
    assert pieces_run["HeadLoss"] > 0 and pieces_run["HeadLogProb"] > 0  # the memory-safe head all the same
    same_update(fast, plain_layers)
    for name in pieces_run:
        pieces_run[name] = 0
    replay = ReplayEngine(recorder.rollouts)
    plain_head = fit(replay, fast=False, plain_head=True)
    assert replay.served == 1 and not any(pieces_run.values()), pieces_run  # autograd through the chunked logits
    same_update(fast, plain_head)


def test_greedy_tokens_are_the_same_either_way_and_the_off_switch_samples_with_generate(pieces_run):
    module = GRPOModule(TINY, dtype="float32", sampling=Sampling(num_generations=2))
    prompts, greedy = ["12+7=", "30+45="], {"do_sample": False}
    on = generate_rollout(module.passes, module.tokenizer, prompts, 1, 12, generation_kwargs=greedy, fast=True)
    off = generate_rollout(module.passes, module.tokenizer, prompts, 1, 12, generation_kwargs=greedy, fast=False)
    assert torch.equal(on.input_ids, off.input_ids)
    assert pieces_run["OneDNNLinear"] > 0 and pieces_run["InverseCDFSampler"] == 0  # greedy: no sampler
    before = dict(pieces_run)
    torch.manual_seed(0)
    sampled = generate_rollout(module.passes, module.tokenizer, prompts, 2, 12, record_logprobs=True, fast=False)
    assert pieces_run == before  # off: generate's own sampling, through nn.Linear
    # what it drew is scored as the trainer scores it: both draw from softmax(logits / T)
    scored = module._logprobs(module.passes, sampled)
    mask = sampled.completion_mask.bool()
    assert torch.allclose(sampled.sample_logprobs[mask], scored[mask], atol=1e-4)
