"""Where one GRPO step's time goes, phase by phase: ``torch.profiler`` over sampling, the reference pass and the
update of one step of the benchmark workload (after a warm-up step), on our side alone.

    python -m bench.profile_phases --setting a --layers 24           # the real depth
    python -m bench.profile_phases --setting a --layers 24 --rows 25 --module-arg fast=false

For each phase it prints the wall seconds, the operator calls (each one a dispatch: on a GPU, a launch or
more; ``bench.gpu_check --count-launches`` counts those), the top operators by self CPU time, and the time in
the model's products (``addmm``/``mm``/``bmm`` and oneDNN's ``_linear_pointwise``) against the rest: attention,
normalisation, elementwise work, copies and the Python between them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_lightning.fast.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # as the command line does, before torch is imported (THP_MEM_ALLOC_ENABLE=0: without)

from bench import workload
from bench.ours_side import build, parse_module_args, prompt_batches

PRODUCTS = ("aten::addmm", "aten::mm", "aten::bmm", "mkldnn::_linear_pointwise")
PHASES = ("sampling", "reference", "update")


def operator_calls(prof) -> int:
    """Operators called from Python or a framework, not from inside another operator: the dispatches a step pays."""
    return sum(1 for e in prof.events() if e.name.startswith(("aten::", "mkldnn::"))
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith(("aten::", "mkldnn::"))))


def summarize(name: str, seconds: float, prof, rows: int) -> str:
    by_op: dict[str, list[float]] = {}
    for e in prof.events():  # self time excludes the operators inside: the sum counts each second once
        if e.name.startswith(("aten::", "mkldnn::")):
            by_op.setdefault(e.name, []).append(e.self_cpu_time_total / 1e6)
    products = sum(sum(v) for k, v in by_op.items() if k in PRODUCTS)
    ops = sum(sum(v) for v in by_op.values())
    lines = [f"== {name}: {seconds:.2f} s wall, {operator_calls(prof)} operator calls; products {products:.2f} s, "
             f"other operators {ops - products:.2f} s, outside operators (Python, framework) {seconds - ops:.2f} s"]
    lines.append(f"{'operator':<40}{'calls':>8}{'self s':>9}{'share':>7}")
    for op, times in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"{op:<40}{len(times):>8}{sum(times):>9.3f}{sum(times) / seconds:>7.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(workload.SETTINGS), default="a")
    parser.add_argument("--layers", type=int, default=workload.REAL_DEPTH)
    parser.add_argument("--rows", type=int, default=15, help="operators listed per phase")
    parser.add_argument("--module-arg", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import lightning as L
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.data import DataLoader

    from grpo_lightning.fast.allocator import set_mmap_threshold

    setting = workload.SETTINGS[args.setting]
    L.seed_everything(0, verbose=False)
    module = build(workload.prepare_model_dir(num_layers=args.layers), setting, False, 2, parse_module_args(args.module_arg),
                   adam="fused")  # the bench's default
    reports: list[str] = []
    timed = module._timed

    def profiled(name, stage, *stage_args):
        if module.rollout_steps == 0 or name not in PHASES:  # the warm-up step runs as it is
            return timed(name, stage, *stage_args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            out = timed(name, stage, *stage_args)
            seconds = time.perf_counter() - start
        reports.append(summarize(name, seconds, prof, args.rows))
        return out

    module._timed = profiled
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=2 * setting["mu"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    set_mmap_threshold(1 << 20)  # as the command line does for a CPU run
    trainer.fit(module, train_dataloaders=DataLoader(prompt_batches(setting["prompts"], 2), batch_size=None))
    print(f"setting ({args.setting}) at {args.layers} layers, the step after a warm-up step, under the profiler "
          "(its own overhead included)")
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
