"""LoRA through peft: every pass goes through the adapters, the reference is the base, export merges exactly."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.engines.generate import generate_rollout, sampling_mode
from grpo_lightning.hf.lora import DEFAULT_TARGET_MODULES, LoRA, adapters_off, add_lora, peft_config
from grpo_lightning.hf.models import decoder, is_checkpointing, set_checkpointing
from grpo_lightning.hf.passes import position_ids, sequence_logprobs
from grpo_lightning.train.cli import run
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Loss, Optimization, Sampling
from test_train import make_config

PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting."]


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero, so a fresh adapter changes nothing: give every B random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def lora_model(path: Path, **options) -> tuple[torch.nn.Module, object]:
    model = add_lora(AutoModelForCausalLM.from_pretrained(path), LoRA(r=4, **options))
    perturb_adapters(model)
    model.train()
    return model, AutoTokenizer.from_pretrained(path)


def plain_logprobs(model, input_ids, attention_mask, P):
    """log p of each completion token from the model's own forward (its LM head, full log-softmax): [N, C]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    return torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, input_ids[:, P:, None]).squeeze(-1)


def test_options_map_onto_peft():
    config = peft_config(LoRA(r=8, alpha=4.0, dropout=0.1))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 4.0, 0.1)
    assert set(config.target_modules) == set(DEFAULT_TARGET_MODULES)  # attention and MLP projections
    with pytest.raises(ValueError, match="model.lora.r must be at least 1"):
        LoRA(r=0)


def test_only_adapters_train_on_every_projection(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers × 7 projections × (A, B)
    assert len(trainable) == 2 * 7 * 2
    assert type(decoder(model)).__name__ == "Qwen2Model"  # not peft's LoraModel (the wrapper's base_model)


def test_logprobs_go_through_the_adapters(tiny_model_dir):
    """Our decoder + chunked LM head (full and shared-prompt passes) equal the adapted model's own forward."""
    model, tokenizer = lora_model(tiny_model_dir)
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 3, 10)
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        expected = plain_logprobs(model, *args)
        with model.disable_adapter():
            base = plain_logprobs(model, *args)
        for group in (1, 3):
            ours = sequence_logprobs(model, *args, group=group)
            assert (ours - expected)[mask].abs().max() < 1e-5
    assert (base - expected)[mask].abs().max() > 1e-2  # the adapters do change the log-probs


def test_lora_samples_are_conditioned_and_adapted(tiny_model_dir):
    """The sampler (shared-prompt prefill, CPU head swap) draws from the adapted model given the whole prompt."""
    model, tokenizer = lora_model(tiny_model_dir)
    set_checkpointing(model, True)
    own_config = model.get_base_model().generation_config
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 2, 24, record_logprobs=True)
    assert model.training and is_checkpointing(model)  # restored through the wrapper
    # the plain sampling config was swapped in and out on the base model, not left behind there by peft
    assert model.get_base_model().generation_config is own_config and "generation_config" not in vars(model)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head swap undone
    model.eval()
    with torch.no_grad():
        teacher = plain_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    gap = (teacher - rollout.sample_logprobs)[rollout.completion_mask.bool()].abs().max().item()
    assert gap < 1e-4, f"sampled log-probs differ from the adapted full-context forward by {gap}"


def test_checkpointed_lora_gradients_equal_plain_ones(tiny_model_dir):
    """Gradient checkpointing with a frozen base (input grads on) gives the adapters the same gradients."""
    model, tokenizer = lora_model(tiny_model_dir)
    torch.manual_seed(1)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 2, 10)
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    grads = []
    for checkpointing in (False, True):
        set_checkpointing(model, checkpointing)
        if checkpointing:
            model.enable_input_require_grads()
        with sampling_mode(model):
            assert not is_checkpointing(model)
        assert is_checkpointing(model) == checkpointing
        model.zero_grad()
        (sequence_logprobs(model, *args, group=2) * rollout.completion_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert any(g.abs().sum() > 0 for g in plain.values() if g is not None)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-5, rtol=1e-4)


def test_reference_is_the_base_model_without_a_copy(tiny_model_dir):
    module = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2), lora=LoRA(r=4))
    assert module.reference is None and not any(k.startswith("reference.") for k in module.state_dict())
    perturb_adapters(module.policy)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rollout = generate_rollout(module.policy, module.tokenizer, PROMPTS, 2, 10)
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        reference = module._reference_logprobs(rollout)
        policy = sequence_logprobs(module.policy, *args)
        assert (reference - sequence_logprobs(base, *args))[mask].abs().max() < 1e-5
    assert (reference - policy)[mask].abs().max() > 1e-2
    assert module.policy.training  # adapters_off restores the mode
    with adapters_off(module.policy):
        assert not module.policy.training


def test_ref_update_every_is_refused_with_lora(tiny_model_dir):
    with pytest.raises(ValueError, match="ref_update_every must be 0 with model.lora"):
        GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2), optimization=Optimization(ref_update_every=5), lora=LoRA(r=4))
    GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2), optimization=Optimization(ref_update_every=5), loss=Loss(beta=0.0), lora=LoRA(r=4))  # no reference


def test_lora_fit_exports_a_merged_model(tmp_path, tiny_model_dir, gsm8k_dir):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "lora", optimization={"mu": 1}, lora={"r": 4, "alpha": 8})
    cli = run(["fit", "--config", str(config), "--trainer.max_steps", "2", "--eval.before", "false"])
    policy = cli.model.policy
    assert cli.trainer.global_step == 2 and policy.training
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = policy.get_base_model().state_dict()
    # frozen base weights are untouched, the wrapped projections (peft's base_layer) included; the adapters
    # (B starts at 0) have moved
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert base.keys() == initial.keys()
    assert all(torch.equal(base[k], initial[k]) for k in initial)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    exported = Path(cli.trainer.log_dir) / "hf_model"
    merged = AutoModelForCausalLM.from_pretrained(exported)
    assert not any("lora" in k for k in merged.state_dict())
    ids = AutoTokenizer.from_pretrained(exported)(PROMPTS, return_tensors="pt", padding=True)
    policy.eval()
    with torch.no_grad():
        adapted = policy(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**ids).logits
        assert (merged(**ids).logits - adapted).abs().max() < 1e-5
        assert (base - adapted).abs().max() > 1e-4  # the comparison can fail: training changed the logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), exported / "adapter")
        assert (reloaded(**ids).logits - adapted).abs().max() < 1e-5


def test_lora_resume_is_bit_identical(tmp_path, tiny_model_dir, gsm8k_dir):
    def fit(name: str, max_steps: int, ckpt_path: str | None = None, config_name: str | None = None):
        config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, config_name or name, optimization={"mu": 1}, lora={"r": 4})
        args = ["fit", "--config", str(config), "--trainer.max_steps", str(max_steps),
                "--export.export_dir", str(tmp_path / name / "out"), "--eval.before", "false", "--eval.after", "false"]
        return run(args + (["--ckpt_path", ckpt_path] if ckpt_path else []))

    full = fit("full", 4)
    fit("part", 2)
    resumed = fit("resumed", 4, ckpt_path="last", config_name="part")
    assert resumed.trainer.global_step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)
    largest = max((a[k] - b[k]).abs().max().item() for k in a)
    assert largest == 0.0, f"resumed LoRA run differs from the uninterrupted one by up to {largest}"
