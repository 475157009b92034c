"""One whole update against an independent port of the seed's, written from the algorithm in plain PyTorch.

The port below imports nothing from the project but the model's files: it loads the packaged tiny model with
transformers, scores the completions with the reward function of this file, and updates as the seed's
``GRPO.py`` does (``compute_log_probs`` over the full logits, the completion mask through the first EOS, the
ratio against the log-probs taken before the first update, the clipped surrogate, the k3 KL, the per-sequence
mean, a fresh Adam with the gradient norm clipped to 0.1). The project trains on the same recorded rollout
(a replay engine) and its weights after μ = 1 and μ = 2 updates must be the port's within 1e-6.

Both update in float64 (``trainer.precision: 64-true``; the rollout is sampled in float32). In float32 the two
differ by up to 3e-5 after one step of lr 1e-3, in a few dozen of the 1.4M weights: after clipping the gradient
norm to 0.1 some gradients are near Adam's eps (1e-8), where its step lr·g/(|g| + eps) turns the float32
rounding of a different summation order (a log-softmax over all positions against the project's logsumexp
over completion positions, a prompt's prefill shared by its G samples) into a visible change. In float64 the
gradients agree to 5e-8 (relative, measured with SGD; transformers' RMSNorm computes in float32 whatever the
weights' dtype, and the two passes' inputs differ in their last float64 digits), the rewards and advantages
exactly, and the weights within 8e-7 after one and two updates.

What it catches, measured by changing the port alone: a clip norm of 1 instead of 0.1 moves the weights by 4e-4
after one update; β = 0 or ε = 0.2 by 2e-3 and 5e-6 after two (after one they cannot show: the ratio is 1,
nothing is clipped, and the KL's gradient is 0 while the policy is the reference).

One deliberate difference from the seed is ported too (docs/algorithm.md, "Where this differs from the seed"):
the teacher-forced pass counts positions from each row's first real token, so that left-padded prompts get
the positions ``generate`` gave them; the seed passes no position ids.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

import grpo_lightning
from grpo_lightning.engines.generate import GenerateEngine
from grpo_lightning.engines.replay import RecordingEngine, ReplayEngine
from grpo_lightning.train.data import PromptDataModule
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Loss, Optimization, Sampling

TINY = "builtin:tiny-arithmetic"
TINY_DIR = Path(grpo_lightning.__file__).parent / "assets" / "tiny-arithmetic"  # the model's files, read as files
G, BETA, EPS, LR, CLIP = 4, 0.04, 0.1, 1e-3, 0.1


def digits_reward(prompts, completions, **columns) -> list[float]:
    """A reward that differs within a group: 0.3 per digit in the completion, at most 2.1."""
    return [min(sum(ch.isdigit() for ch in c), 7) * 0.3 for c in completions]


# ---- the port: the seed's update, from the algorithm ----

def seed_completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it; all 1 without an EOS.  [N, C] → [N, C]"""
    is_eos = completion_ids == eos_id
    first = torch.full((completion_ids.shape[0],), completion_ids.shape[1], dtype=torch.long)
    has = is_eos.any(dim=1)
    first[has] = is_eos.int().argmax(dim=1)[has]
    return (torch.arange(completion_ids.shape[1]).expand_as(completion_ids) <= first.unsqueeze(1)).int()


def seed_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, C: int) -> torch.Tensor:
    """Full logits → log_softmax → the completion tokens' log-probs.  [N, P + C] → [N, C]"""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # the documented difference (module docstring)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits  # [N, P+C, V]
    logits = logits[:, -C - 1 : -1, :]  # position t predicts token t + 1
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, -C:].unsqueeze(-1)).squeeze(-1)


def seed_update(model, input_ids, prompt_mask, completions, prompts, eos_id: int, mu: int) -> list[float]:
    """μ updates of the seed on one rollout; the losses."""
    C = input_ids.shape[1] - prompt_mask.shape[1]
    mask = seed_completion_mask(input_ids[:, -C:], eos_id)  # [N, C]
    attention_mask = torch.cat([prompt_mask, mask], dim=1)  # [N, P + C]
    rewards = torch.tensor(digits_reward(prompts, completions))  # [N]
    by_group = rewards.view(-1, G)  # [B, G]
    advantages = ((by_group - by_group.mean(1, keepdim=True)) / (by_group.std(1, keepdim=True) + 1e-4)).view(-1)
    reference = copy.deepcopy(model).eval()  # a frozen copy at the start of the iteration
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)  # the seed's fresh optimizer each iteration
    with torch.no_grad():
        old = seed_log_probs(model, input_ids, attention_mask, C)  # the policy that sampled
        ref = seed_log_probs(reference, input_ids, attention_mask, C)
    losses = []
    for _ in range(mu):
        logp = seed_log_probs(model, input_ids, attention_mask, C)
        ratio = torch.exp(logp - old)
        adv = advantages.unsqueeze(1)
        surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - EPS, 1 + EPS) * adv)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        objective = surrogate - BETA * kl
        loss = -((objective * mask).sum(1) / mask.sum(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=CLIP)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# ---- the project, on the same rollout ----

def project_fit(engine, mu: int, precision: str = "32-true") -> GRPOModule:
    L.seed_everything(0, verbose=False)
    module = GRPOModule(
        TINY, dtype="float32", sampling=Sampling(num_generations=G, max_new_tokens=24),
        loss=Loss(beta=BETA, clip_eps=EPS, reward_funcs=[f"{__name__}.digits_reward"]),
        optimization=Optimization(mu=mu, grad_clip=CLIP), fast=False, rollout=engine,
        optimizer=lambda params: torch.optim.Adam(params, lr=LR, fused=True),
    )
    data = PromptDataModule(source="task:arithmetic", batch_size=2, eval_size=4, seed=0, tokenizer_name_or_path=TINY)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=mu, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, precision=precision,
    )
    trainer.fit(module, data)
    return module


@pytest.fixture(scope="module")
def recorded():
    """The rollout the project samples at its first step (float32)."""
    recorder = RecordingEngine(GenerateEngine())
    project_fit(recorder, mu=1)
    assert len(recorder.rollouts) == 1
    return recorder.rollouts[0]


@pytest.mark.parametrize("mu", [1, 2])
def test_the_project_updates_as_the_seed_port_on_the_same_rollout(recorded, mu):
    rollout = recorded
    replay = ReplayEngine([rollout])
    module = project_fit(replay, mu=mu, precision="64-true")
    assert replay.served == 1 and module.trainer.global_step == mu  # one rollout, μ optimizer steps
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float64)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eos_id = model.generation_config.eos_token_id
    P = rollout.prompt_length
    completion_ids = rollout.input_ids[:, P:]
    # the rollout is one that exercises the mask: some rows stop at an EOS before the end, some run to it
    stops = (completion_ids == eos_id).any(1)
    assert stops.any() and not stops.all(), stops
    assert torch.equal(seed_completion_mask(completion_ids, eos_id), rollout.completion_mask.int())
    prompts = [None] * rollout.input_ids.shape[0]
    losses = seed_update(model, rollout.input_ids, rollout.attention_mask[:, :P], rollout.completions, prompts, eos_id, mu)
    assert losses[0] == pytest.approx(0, abs=1e-6)  # ratio 1, a group's advantages sum to 0, KL 0 at the start

    ours = module.policy.state_dict()
    theirs = model.state_dict()
    assert set(ours) == set(theirs) and all(v.dtype == torch.float64 for v in ours.values())
    moved = max(float((theirs[k] - start[k]).abs().max()) for k in theirs)
    assert moved > 0.5 * LR  # Adam moved the weights by about lr: 1e-6 is 1e-3 of a step
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert worst < 1e-6, worst
