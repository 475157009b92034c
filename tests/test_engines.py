"""The rollout-engine seam: the shared Rollout tail, the generate engine, and replaying recorded rollouts."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch

from grpo_lightning.engines.base import build_rollout
from grpo_lightning.engines.generate import GenerateEngine, generate_rollout
from grpo_lightning.engines.replay import RecordingEngine, ReplayEngine
from grpo_lightning.train.data import PromptDataModule
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Loss, Sampling

TINY = "builtin:tiny-arithmetic"


class DigitTokenizer:
    """Decodes ids as their digits, so that a test can spell out the text it expects."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(str(int(i)) for i in row) for row in rows]


def test_build_rollout_pads_masks_through_the_first_eos_and_flags_truncation():
    # EOS ids 2 and 3, pad 2 (pad is an EOS). Row 0 ends at its 3; row 1 never ends; row 2 is one piece of
    # length 1 (a bare EOS 2) padded to C = 3 with the pad id.
    prompt_ids = torch.tensor([[0, 5], [0, 5], [6, 7]])  # [N=3, P=2]
    prompt_mask = torch.tensor([[0, 1], [0, 1], [1, 1]])
    pieces = [torch.tensor([[7, 3, 9], [7, 8, 9]]), torch.tensor([2])]
    logprobs = [torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -0.2, -0.3]]), torch.tensor([-0.7])]
    r = build_rollout(prompt_ids, prompt_mask, pieces, [2, 3], 2, DigitTokenizer(), logprobs)
    assert r.input_ids.tolist() == [[0, 5, 7, 3, 9], [0, 5, 7, 8, 9], [6, 7, 2, 2, 2]]
    assert r.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert r.attention_mask.tolist() == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert r.truncated.tolist() == [False, True, False]
    assert r.completions == ["73", "789", "2"]  # through the EOS (the tokenizer drops specials itself)
    assert r.prompt_length == 2
    assert torch.equal(r.sample_logprobs, torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -0.2, -0.3], [-0.7, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def policy():
    module = GRPOModule(TINY, dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=8))
    return module


def test_generate_engine_is_generate_rollout(policy):
    prompts = ["1+2=", "30+4="]
    torch.manual_seed(3)
    expected = generate_rollout(policy.policy, policy.tokenizer, prompts, 4, 8, 2.0, 4, record_logprobs=True)
    torch.manual_seed(3)
    got = GenerateEngine().generate(
        policy.policy, policy.tokenizer, prompts, 4, 8, temperature=2.0, rows_per_call=4, record_logprobs=True
    )
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.equal(got.sample_logprobs, expected.sample_logprobs)
    assert isinstance(policy.engine, GenerateEngine)  # the default


def test_evaluation_samples_through_the_engine(policy):
    prompt = policy.tokenizer(["1+2="], return_tensors="pt")
    completion = policy.tokenizer("7<answer>", return_tensors="pt").input_ids
    rollout = build_rollout(prompt.input_ids, prompt.attention_mask, [completion], [0], 1, policy.tokenizer)
    policy.engine = ReplayEngine([rollout])
    try:
        rows = policy.evaluate_batch({"prompt": ["1+2="], "expected": ["3"]})
    finally:
        policy.engine = GenerateEngine()
    assert rows[0]["completion"] == rollout.completions[0]


def test_replay_refuses_a_rollout_of_another_size(policy):
    prompt = policy.tokenizer(["1+2="], return_tensors="pt")
    rollout = build_rollout(prompt.input_ids, prompt.attention_mask, [torch.tensor([5, 0])], [0], 1, policy.tokenizer)
    engine = ReplayEngine([rollout])
    with pytest.raises(ValueError, match="has 1 rows, the call asks for 1 prompts × 4 = 4"):
        engine.generate(policy.policy, policy.tokenizer, ["1+2="], 4, 8)
    with pytest.raises(IndexError, match="served all of its 0 rollouts"):
        ReplayEngine([]).generate(policy.policy, policy.tokenizer, ["1+2="], 1, 8)


def fit(engine, seed: int, steps: int = 2) -> GRPOModule:
    L.seed_everything(seed, verbose=False)
    module = GRPOModule(
        TINY, dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=16, temperature=2.0),
        rollout=engine,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    data = PromptDataModule(source="task:arithmetic", batch_size=2, eval_size=4, seed=0, tokenizer_name_or_path=TINY)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    return module


def weights(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def test_replayed_rollouts_give_the_same_update_under_another_seed():
    recorder = RecordingEngine(GenerateEngine())
    start = weights(GRPOModule(TINY, dtype="float32"))
    first = weights(fit(recorder, seed=0))
    assert any(not torch.equal(first[k], start[k]) for k in first)  # the steps did update
    assert len(recorder.rollouts) == 2
    replay = ReplayEngine(recorder.rollouts)
    replayed = weights(fit(replay, seed=1))
    assert replay.weight_updates == 2  # told after each step's update
    assert all(torch.equal(first[k], replayed[k]) for k in first)
    resampled = weights(fit(GenerateEngine(), seed=1))  # the seed matters: without the replay the update differs
    assert any(not torch.equal(first[k], resampled[k]) for k in first)


def test_the_weights_pushed_to_an_engine_have_lora_merged_under_the_base_names():
    from grpo_lightning.engines.vllm import policy_weights
    from grpo_lightning.hf.lora import LoRA

    plain = GRPOModule(TINY, dtype="float32", loss=Loss(beta=0))
    lora = GRPOModule(TINY, dtype="float32", loss=Loss(beta=0), lora=LoRA(r=2, alpha=4.0, target_modules=["q_proj"]))
    layer = lora.policy.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.5)  # B = 0.5 everywhere: the update (alpha/r)·B·A = 2·0.5·A
        expected = layer.base_layer.weight + 2 * 0.5 * layer.lora_A["default"].weight.sum(0, keepdim=True)
    base = layer.base_layer.weight.detach().clone()
    pushed = dict(policy_weights(lora.policy))
    assert pushed.keys() == dict(policy_weights(plain.policy)).keys()  # the names vLLM loads, no adapter names
    assert torch.allclose(pushed["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    untouched = "model.layers.0.self_attn.k_proj.weight"  # no adapter: the base weight as it is
    assert torch.equal(pushed[untouched], plain.policy.state_dict()[untouched])
    # the merge was on a copy: the policy's layer is unmerged, its base weight as before, its adapters kept
    assert not layer.merged and torch.equal(layer.base_layer.weight, base) and "default" in layer.lora_A


def test_choosing_the_vllm_engine_does_not_import_vllm():
    code = (
        "import sys; import grpo_lightning.engines as e; from grpo_lightning.engines.vllm import VLLMEngine; "
        "VLLMEngine(gpu_memory_utilization=0.5); assert e.VLLMEngine is VLLMEngine; "
        "assert 'vllm' not in sys.modules, 'vllm was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
