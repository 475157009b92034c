"""TRL side of the benchmark: TRL's GRPOTrainer on the shared workload, one setting, a few GRPO steps.

Run in its own process (``bench/run.py`` does that) so its peak RSS is its own:

    python -m bench.trl_side --setting a --steps 4

How the phases are measured (TRL exposes no per-phase timings, so bound methods of the trainer
instance are wrapped with timers; nothing in TRL is modified):
- sampling: ``_generate`` (prompt tokenisation, ``model.generate``, decoding);
- reference / old_policy: ``_get_per_token_logps_and_entropies`` called on the reference model /
  on the policy without grad (TRL skips the old-policy pass by itself when μ = 1);
- update: the rest of the optimizer step, i.e. wall − ``_prepare_inputs`` (policy forward with
  grad, backward, clipping, Adam);
- other: ``_prepare_inputs`` minus the three phases above (rewards, advantages, bookkeeping).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/trl_side.py` as well as `python -m bench.trl_side`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import workload
from bench.reward import trl_reward
from bench.timing import PHASES, PhaseTimer, diff, emit_result, peak_rss_mib


def build_trainer(model_dir: Path, setting: dict, steps: int, out_dir: str, gradient_checkpointing: bool,
                  device: str = "cpu", bf16: bool = False, use_vllm: bool = False):
    """TRL's trainer on the workload; ``device`` "cuda" with ``bf16`` is the seed config's GPU run (fp32 weights,
    bf16 autocast, fused AdamW at weight decay 0); ``use_vllm`` samples with TRL's colocated vLLM engine."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    P, G, N, mu = setting["prompts"], setting["generations"], setting["new_tokens"], setting["mu"]
    # One spare batch of prompts so the sampler never runs dry on the last step.
    rows = workload.load_prompts(P * (steps + 1))
    dataset = Dataset.from_list(rows)
    config = GRPOConfig(
        output_dir=out_dir,
        use_cpu=device == "cpu",
        bf16=bf16,  # TRL defaults to bf16; the CPU workload is fp32 on both sides
        fp16=False,
        model_init_kwargs={"dtype": torch.float32},
        # One optimizer step consumes one whole rollout batch of P prompts x G completions.
        per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=G,
        num_iterations=mu,
        max_completion_length=N,
        # Forced full length: EOS is masked until N tokens exist, so both sides sample N tokens per row.
        generation_kwargs={"min_tokens": N} if use_vllm else {"min_new_tokens": N},  # vLLM's SamplingParams name
        temperature=workload.TEMPERATURE,
        beta=setting["beta"],
        epsilon=workload.CLIP_EPS,
        loss_type="grpo",  # the seed's per-sequence mean, then mean over sequences
        learning_rate=workload.LR,
        lr_scheduler_type="constant",
        optim="adamw_torch" if device == "cpu" else "adamw_torch_fused",  # at weight_decay 0, the seed's Adam
        weight_decay=0.0,
        max_grad_norm=workload.GRAD_CLIP,
        gradient_checkpointing=gradient_checkpointing,
        max_steps=steps * mu,
        shuffle_dataset=False,  # the same prompts, in the same order, as the grpo-lightning side
        disable_dropout=True,
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        seed=0,
        # TRL's colocated vLLM (its defaults otherwise), beside grpo-lightning's --rollout vllm
        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3} if use_vllm else {}),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return GRPOTrainer(
        model=str(model_dir),
        reward_funcs=trl_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=trl_peft_config(setting),
    )


def trl_peft_config(setting: dict):
    """The LoraConfig grpo-lightning builds for the same setting, or None for full fine-tuning."""
    if "lora" not in setting:
        return None
    from grpo_lightning.hf.lora import LoRA, peft_config

    return peft_config(LoRA(**setting["lora"]))


def adapters_disabled(model) -> bool:
    """Whether the model's LoRA layers are switched off right now (how TRL runs a LoRA policy as its reference)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


def instrument(trainer, timer: PhaseTimer, steps_out: list[dict], lengths: list[int]) -> None:
    """Wrap the trainer's phases with timers; record per-optimizer-step totals and completion lengths."""
    import torch
    from transformers import TrainerCallback

    def logps_phase(model, *args, **kwargs):
        if model is trainer.ref_model or (trainer.ref_model is None and adapters_disabled(model)):
            return "reference"
        # With grad on this is the update's own forward, charged to "update" through the wall clock.
        return None if torch.is_grad_enabled() else "old_policy"

    generate = trainer._generate

    def generate_and_record(prompts):
        result = generate(prompts)  # (prompt_ids, completion_ids, ...)
        lengths.extend(len(ids) for ids in result[1])
        return result

    trainer._generate = timer.wrap(generate_and_record, lambda *a, **k: "sampling")
    trainer._get_per_token_logps_and_entropies = timer.wrap(trainer._get_per_token_logps_and_entropies, logps_phase)
    trainer._prepare_inputs = timer.wrap(trainer._prepare_inputs, lambda *a, **k: "rollout")

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.sync()
            self.start, self.cpu, self.before = time.perf_counter(), time.process_time(), timer.snapshot()

        def on_step_end(self, args, state, control, **kwargs):
            timer.sync()
            wall = time.perf_counter() - self.start
            d = diff(timer.snapshot(), self.before)
            rollout = d.get("rollout", 0.0)
            steps_out.append(
                {
                    "wall": wall,
                    "cpu": time.process_time() - self.cpu,
                    "sampling": d.get("sampling", 0.0),
                    "reference": d.get("reference", 0.0),
                    "old_policy": d.get("old_policy", 0.0),
                    "update": wall - rollout,
                    "other": rollout - d.get("sampling", 0.0) - d.get("reference", 0.0) - d.get("old_policy", 0.0),
                }
            )

    trainer.add_callback(StepClock())


def group_by_mu(opt_steps: list[dict], mu: int) -> list[dict]:
    """Sum μ consecutive TRL optimizer steps into one GRPO step (one rollout batch + μ updates)."""
    grouped = []
    for i in range(0, len(opt_steps) - mu + 1, mu):
        chunk = opt_steps[i : i + mu]
        grouped.append({k: sum(s.get(k, 0.0) for s in chunk) for k in ("wall", "cpu") + PHASES})
    return grouped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(workload.SETTINGS), default="a")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps; the first is warm-up")
    parser.add_argument(
        "--gradient-checkpointing",
        choices=("on", "off"),
        default="on",
        help="TRL's GRPOConfig turns it on by default; 'off' measures TRL without it",
    )
    parser.add_argument("--use-vllm", action="store_true", help="sample with TRL's colocated vLLM (vllm_mode colocate)")
    parser.add_argument("--layers", type=int, default=workload.REAL_DEPTH, help="decoder layers (24: the real depth)")
    parser.add_argument("--cache-dir", default=str(workload.DEFAULT_CACHE))
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setting = workload.SETTINGS[args.setting]
    model_dir = workload.prepare_model_dir(args.cache_dir, args.layers)
    timer, opt_steps, lengths = PhaseTimer(), [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(model_dir, setting, args.steps, out_dir, args.gradient_checkpointing == "on",
                                use_vllm=args.use_vllm)
        load_s, rss_loaded = time.perf_counter() - t0, peak_rss_mib()
        instrument(trainer, timer, opt_steps, lengths)
        trainer.train()
    steps = group_by_mu(opt_steps, setting["mu"])
    emit_result(
        "trl", args.setting, setting, steps, lengths, load_s, rss_loaded,
        gradient_checkpointing=args.gradient_checkpointing == "on", use_vllm=args.use_vllm,
    )

if __name__ == "__main__":
    main()
