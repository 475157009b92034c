"""The seed config's settings on a GPU: s/step per phase, generated tokens/s, peak GPU memory, weights moved.

Prepared, not yet run on a GPU: the figures it prints have not been measured on one yet.

    python -m bench.gpu_check                           # Qwen2.5-0.5B geometry, 24 layers, 3 steps, TRL beside it
    python -m bench.gpu_check --tiny --device cpu --steps 2 --no-trl   # the CPU run its test makes
    python -m bench.gpu_check --tiny --device cpu --steps 1 --no-trl --count-launches  # kernel launches per phase

The model is the Qwen2.5-0.5B-Instruct geometry with seeded random weights and the real Qwen2 tokenizer,
built offline (:mod:`bench.workload`); the prompts are the packaged GSM8K sample. Everything else is read
from ``configs/qwen2.5-0.5b-gsm8k.yaml`` itself (precision, the model section, the optimizer), so the check
runs what the config says; only the sizes (``--prompts``, ``--generations``, ``--max-new-tokens``) and the
device come from the command line. Sampling is forced to full length (``min_new_tokens``): random weights
rarely emit EOS anyway, and the work per step is then the 4 × 16 × 500 the memory estimate assumes.
``--count-launches`` counts the operators that run a kernel in each phase of the last step (:mod:`bench.launch_count`):
on the CPU under ``bf16-mixed`` the CPU-only kernels step aside, so each is a kernel launch on a GPU.

Phase seconds are the module's own ``timings`` (logged as ``time/*``), with the GPU synchronised around each
phase so queued kernels are charged to the phase that queued them; the peak memory of each phase is taken
the same way. TRL's ``GRPOTrainer`` runs on the same settings afterwards when ``trl`` is importable
(:mod:`bench.trl_side` builds it), in the same process, with the peak counters reset in between.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench import workload
from bench.ours_side import prompt_batches, step_clock
from bench.timing import PhaseTimer, emit, summarise

SEED_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen2.5-0.5b-gsm8k.yaml"
GIB = 1024**3
# the config's data, logging and output settings have no meaning for a module built outside the CLI
NOT_MODULE_ARGS = ("model_name_or_path", "optimizer")


class Memory:
    """Peak allocated / reserved bytes of the whole run and of each phase; all None off CUDA."""

    def __init__(self, torch, device: str):
        self.torch, self.cuda = torch, device == "cuda"
        self.phases: dict[str, tuple[int, int]] = {}
        self.allocated = self.reserved = 0

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def start_phase(self) -> None:
        if self.cuda:
            self.sync()
            self.fold()  # keep the run's peak before the counters restart for the phase
            self.torch.cuda.reset_peak_memory_stats()

    def end_phase(self, name: str) -> None:
        if self.cuda:
            self.sync()
            peak = (self.torch.cuda.max_memory_allocated(), self.torch.cuda.max_memory_reserved())
            old = self.phases.get(name, (0, 0))
            self.phases[name] = (max(old[0], peak[0]), max(old[1], peak[1]))
            self.fold()

    def fold(self) -> None:
        if self.cuda:
            self.allocated = max(self.allocated, self.torch.cuda.max_memory_allocated())
            self.reserved = max(self.reserved, self.torch.cuda.max_memory_reserved())

    def record(self) -> dict:
        self.fold()
        if not self.cuda:
            return {"max_memory_allocated": None, "max_memory_reserved": None, "phases": {}}
        return {"max_memory_allocated": self.allocated, "max_memory_reserved": self.reserved, "phases": self.phases}


def seed_settings(path: Path = SEED_CONFIG) -> dict:
    """The config's trainer precision, GRPOModule arguments (option groups as dicts) and optimizer (class path, init args)."""
    config = yaml.safe_load(path.read_text())
    model = dict(config["model"])
    optimizer = model.pop("optimizer")
    return {"precision": config["trainer"]["precision"], "prompts": config["data"]["batch_size"],
            "module": {k: v for k, v in model.items() if k not in NOT_MODULE_ARGS}, "optimizer": optimizer}


def optimizer_factory(spec: dict, overrides: dict):
    module, _, name = spec["class_path"].rpartition(".")
    cls, kwargs = getattr(importlib.import_module(module), name), {**spec.get("init_args", {}), **overrides}
    return lambda params: cls(params, **kwargs)


def snapshot(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def weights_after(before: dict, model) -> dict:
    """Share of ``model``'s weights that changed since ``before``, and whether every one is finite."""
    moved = total = 0
    finite = True
    for name, p in model.named_parameters():
        now = p.detach().to("cpu")
        moved += int((now != before[name]).sum())
        total += now.numel()
        finite = finite and bool(now.isfinite().all())
    return {"moved_fraction": moved / total, "finite": finite}


def tokens_per_second(steps: list[dict], tokens: list[float]) -> float:
    """Generated tokens over sampling seconds of the measured steps (the warm-up step left out)."""
    keep = slice(1, None) if len(steps) > 1 else slice(None)
    return sum(tokens[keep]) / sum(s["sampling"] for s in steps[keep])


def run_ours(args, settings: dict, model_dir: Path) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from bench.launch_count import LaunchCounter
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import GROUPS

    memory = Memory(torch, args.device)
    if memory.cuda:
        torch.cuda.reset_peak_memory_stats()
    L.seed_everything(0, verbose=False)
    options = {**settings["module"], "sampling": {
        **settings["module"].get("sampling", {}), "num_generations": args.generations, "max_new_tokens": args.max_new_tokens,
        "generation_kwargs": {"min_new_tokens": args.max_new_tokens},  # full length, as the estimate assumes
    }}
    module = GRPOModule(
        model_name_or_path=str(model_dir), **{k: GROUPS[k](**v) if k in GROUPS else v for k, v in options.items()},
        optimizer=optimizer_factory(settings["optimizer"], args.optimizer_overrides),
    )
    timed = module._timed

    prompt_lengths = []

    launches: dict[str, int] = {}
    rollouts = 0  # steps begun: each begins with its sampling phase

    def timed_and_measured(name, stage, *stage_args):  # the module's own clock, with the GPU synchronised
        nonlocal rollouts
        memory.start_phase()
        rollouts += name == "sampling"
        if args.count_launches and rollouts == args.steps:  # the last step, counted
            with LaunchCounter() as counter:
                out = timed(name, stage, *stage_args)
            launches[name] = counter.total
        else:
            out = timed(name, stage, *stage_args)
        memory.end_phase(name)
        if name == "sampling":
            prompt_lengths.append(out[1].prompt_length)  # P of this step's left-padded prompts (out: batch, rollout)
        return out

    module._timed = timed_and_measured
    before = snapshot(module.policy)
    steps, lengths = [], []
    trainer = L.Trainer(
        accelerator="gpu" if memory.cuda else "cpu", devices=1, precision=args.precision or settings["precision"],
        max_steps=args.steps * module.optimization.mu, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[step_clock(steps, lengths, memory.sync)],
    )
    with warnings.catch_warnings():  # the check times training alone: no evaluation data on purpose
        warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no `val_dataloader`")
        trainer.fit(module, train_dataloaders=DataLoader(prompt_batches(args.prompts, args.steps), batch_size=None))
    rows = args.prompts * args.generations
    record = {"framework": "grpo-lightning", "steps": steps, "median": summarise(steps),
              "tokens_per_s": tokens_per_second(steps, [rows * n for n in lengths]),
              **memory.record(), **weights_after(before, module.policy),
              # 1.0: every group's rewards were equal (random weights score 0): the gradient was the KL term's alone
              "frac_reward_zero_std": float(trainer.callback_metrics["frac_reward_zero_std"]),
              "computed": computed_peaks(model_dir, args, settings, max(prompt_lengths)), "launches": launches}
    del module, trainer
    return record


def run_trl(args, settings: dict, model_dir: Path) -> dict:
    import torch

    from bench import trl_side

    memory = Memory(torch, args.device)
    gc.collect()
    if memory.cuda:  # what grpo-lightning left behind is freed; the peaks start again
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setting = dict(prompts=args.prompts, generations=args.generations, new_tokens=args.max_new_tokens,
                   mu=settings["module"]["optimization"]["mu"], beta=settings["module"]["loss"]["beta"])
    timer, opt_steps, lengths = PhaseTimer(memory.sync), [], []
    bf16 = (args.precision or settings["precision"]).startswith("bf16")
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = trl_side.build_trainer(model_dir, setting, args.steps, out_dir, settings["module"]["memory"]["gradient_checkpointing"],
                                         device=args.device, bf16=bf16)
        before = snapshot(trainer.model)
        trl_side.instrument(trainer, timer, opt_steps, lengths)
        trainer.train()
    steps = trl_side.group_by_mu(opt_steps, setting["mu"])
    rows = args.prompts * args.generations
    tokens = [sum(lengths[i * rows : (i + 1) * rows]) for i in range(len(steps))]
    return {"framework": "trl", "steps": steps, "median": summarise(steps), "tokens_per_s": tokens_per_second(steps, tokens),
            **memory.record(), **weights_after(before, trainer.model)}


def computed_peaks(model_dir: Path, args, settings: dict, prompt_length: int) -> dict[str, int]:
    """bench.memory_estimate's peak of each phase for this run's geometry, sizes and longest padded prompt."""
    import lightning

    from bench import memory_estimate
    from bench.limits import Geometry

    config = json.loads((model_dir / "config.json").read_text())
    m = settings["module"]["memory"]
    run = memory_estimate.Run(
        prompts=args.prompts, generations=args.generations, prompt_length=prompt_length, new_tokens=args.max_new_tokens,
        chunk_rows=m["logprob_chunk_rows"], checkpointing=m["gradient_checkpointing"],
        cast_cache=tuple(int(x) for x in lightning.__version__.split(".")[:2]) < (2, 6),
    )
    estimate = memory_estimate.phases(Geometry.from_config(config, config["num_hidden_layers"]), run)
    return {phase.split(",")[0]: memory_estimate.total(items) for phase, items in estimate.items() if "evaluation" not in phase}


def trl_differences(settings: dict) -> list[str]:
    """The config's values that TRL's side, which takes the benchmark's constants, would not run."""
    m, lr = settings["module"], settings["optimizer"].get("init_args", {}).get("lr")
    pairs = {"lr": (lr, workload.LR), "clip_eps": (m["loss"]["clip_eps"], workload.CLIP_EPS),
             "temperature": (m["sampling"]["temperature"], workload.TEMPERATURE),
             "grad_clip": (m["optimization"]["grad_clip"], workload.GRAD_CLIP)}
    return [f"{k}: config {a}, TRL side {b}" for k, (a, b) in pairs.items() if a != b]


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def format_report(records: list[dict], header: str) -> str:
    lines = [header, f"{'framework':<16}{'s/step':>8}{'sampling':>10}{'reference':>11}{'update':>8}{'other':>7}"
             f"{'tok/s':>8}{'alloc GiB':>11}{'reserved GiB':>14}{'moved':>9}{'finite':>8}"]
    for r in records:
        m = r["median"]
        lines.append(f"{r['framework']:<16}{m['wall']:>8.2f}{m['sampling']:>10.2f}{m['reference']:>11.2f}{m['update']:>8.2f}"
                     f"{m['other']:>7.2f}{r['tokens_per_s']:>8.1f}{gib(r['max_memory_allocated']):>11}"
                     f"{gib(r['max_memory_reserved']):>14}{r['moved_fraction']:>9.2%}{'yes' if r['finite'] else 'NO':>8}")
    for r in records:
        for phase, computed in r.get("computed", {}).items():
            alloc, reserved = r["phases"].get(phase, (None, None))
            lines.append(f"{r['framework']} peak in {phase}: max_memory_allocated {gib(alloc)} GiB, "
                         f"max_memory_reserved {gib(reserved)} GiB; computed {gib(computed)} GiB (bench.memory_estimate)")
    lines.append("s/step and phases: medians over the measured steps (the first is warm-up); tok/s: generated tokens")
    lines.append("per sampling second; alloc / reserved: torch.cuda.max_memory_allocated / max_memory_reserved")
    lines.append("(n/a off CUDA); moved: share of the policy's weights that changed; finite: all of them finite.")
    for r in records:
        if r.get("launches"):
            counts = ", ".join(f"{phase} {n:,}" for phase, n in r["launches"].items())
            lines.append(f"{r['framework']}: operators that run a kernel in the last step (a launch each on a GPU): {counts}")
    for r in records:
        if "frac_reward_zero_std" in r:
            lines.append(f"{r['framework']}: groups whose rewards were all equal in the last step: {r['frac_reward_zero_std']:.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps; the first is warm-up")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers; Qwen2.5-0.5B has 24")
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step; default the config's batch size")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda when present")
    parser.add_argument("--tiny", action="store_true", help="a 64-wide geometry (real vocabulary) for the CPU")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    parser.add_argument("--precision", default=None, help="default the config's (bf16-mixed)")
    parser.add_argument("--optimizer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override an optimizer init argument, e.g. fused=false")
    parser.add_argument("--count-launches", action="store_true",
                        help="count the operators that run a kernel in each phase of the last step (bench/launch_count.py)")
    parser.add_argument("--cache-dir", default=str(workload.DEFAULT_CACHE))
    args = parser.parse_args(argv)
    args.optimizer_overrides = {k: json.loads(v) for k, _, v in (a.partition("=") for a in args.optimizer_arg)}
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    args = parse_args(argv)
    settings = seed_settings()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.prompts = args.prompts or settings["prompts"]
    model_dir = workload.prepare_model_dir(args.cache_dir, args.layers, tiny=args.tiny)
    name = "tiny geometry" if args.tiny else "Qwen2.5-0.5B geometry"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    header = (f"gpu_check: {name}, {args.layers} layers, random weights, real Qwen2 tokenizer; {args.prompts} prompts x "
              f"{args.generations} generations x {args.max_new_tokens} new tokens; {args.precision or settings['precision']}, "
              f"optimizer {settings['optimizer']['class_path']} {args.optimizer_overrides or ''}".rstrip() + f" on {device}")
    records = [run_ours(args, settings, model_dir)]
    trl_missing = importlib.util.find_spec("trl") is None
    if not args.no_trl and not trl_missing:
        for line in trl_differences(settings):
            print("warning: TRL runs the benchmark's constant, not the config's:", line, file=sys.stderr)
        records.append(run_trl(args, settings, model_dir))
    print(format_report(records, header))
    if trl_missing and not args.no_trl:
        print("TRL is not installed (pip install -e '.[bench]'): grpo-lightning alone.")
    for record in records:
        emit(record)
    return records


if __name__ == "__main__":
    main()
