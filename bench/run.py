"""One command for the side-by-side benchmark: grpo-lightning and TRL's GRPOTrainer on the same workload.

    python bench/run.py --settings a b c --steps 4              # Qwen2.5-0.5B's geometry at its real 24 layers
    python bench/run.py --settings a --steps 3 --layers 4       # the quick 4-layer cut

For each setting, each framework runs in its own child process (separate peak RSS, no shared
allocator or thread state), then one table is printed: median seconds per GRPO step (one rollout
batch + its μ updates; the first step is warm-up and excluded), median seconds per phase, peak RSS,
and the ratio grpo-lightning / TRL.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import limits, workload
from bench.timing import RESULT_PREFIX

REPO = Path(__file__).resolve().parents[1]
SIDES = {"trl": "bench.trl_side", "grpo-lightning": "bench.ours_side"}
COLUMNS = ("wall", "sampling", "reference", "old_policy", "update", "other", "cpu")


def run_side(side: str, setting: str, steps: int, extra: list[str], log_dir: Path, layers: int = workload.REAL_DEPTH) -> dict:
    """Run one framework in a child process; its stderr goes to a log file, its result comes back on stdout."""
    cmd = [sys.executable, "-m", SIDES[side], "--setting", setting, "--steps", str(steps), "--layers", str(layers), *extra]
    log = log_dir / f"{side}-{setting}-{layers}l.log"
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} setting {setting} failed (exit {proc.returncode}); see {log}")
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["process_seconds"] = time.perf_counter() - start
    return result


def describe(setting: str) -> str:
    s = workload.SETTINGS[setting]
    lora = f", LoRA r {s['lora']['r']}" if "lora" in s else ""
    return f"({setting}) {s['prompts']} prompts x {s['generations']} gen x {s['new_tokens']} tok, mu {s['mu']}, beta {s['beta']}{lora}"


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """results[setting][side] -> the side's record; one block of rows per setting."""
    head = (f"{'framework':<16}{'s/step':>8}{'sample':>8}{'ref':>7}{'old':>7}{'update':>8}{'other':>7}"
            f"{'cpu s':>8}{'RSS MiB':>9}{'steps':>6}")
    lines = []
    for setting, sides in results.items():
        lines += [describe(setting), head]
        for side in ("trl", "grpo-lightning"):
            r = sides.get(side)
            if r is None:
                continue
            m = r["median"]
            cells = "".join(f"{m[k]:>{w}.1f}" if k in m else f"{'-':>{w}}" for k, w in zip(COLUMNS, (8, 8, 7, 7, 8, 7, 8)))
            lines.append(f"{side:<16}{cells}{r['peak_rss_mib']:>9.0f}{len(r['steps']) - 1:>6}")
        if len(sides) == 2:
            ours, trl = sides["grpo-lightning"], sides["trl"]
            ratio = {k: f"{ours['median'][k] / trl['median'][k]:.2f}" if k in ours["median"] and k in trl["median"] else "-"
                     for k in ("wall", "cpu")}
            rss_ratio = ours["peak_rss_mib"] / trl["peak_rss_mib"]
            lines.append(f"{'ours / TRL':<16}{ratio['wall']:>8}{'':>37}{ratio['cpu']:>8}{rss_ratio:>9.2f}")
        lines.append("")
    lines.append("s/step, phases and cpu s (process CPU seconds, all threads): medians over the measured steps,")
    lines.append("warm-up step excluded. steps: measured GRPO steps. RSS: peak resident memory of the framework's")
    lines.append("own process. Wall times move with other load on the machine; cpu s moves less.")
    return "\n".join(lines)


def measured_prompt_length(setting: str, steps: int, layers: int = workload.REAL_DEPTH) -> float:
    """Mean left-padded prompt length P of the measured steps' batches (both sides pad within a batch)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workload.prepare_model_dir(num_layers=layers))
    B = workload.SETTINGS[setting]["prompts"]
    rows = workload.load_prompts(B * steps)
    lengths = [max(len(tokenizer(r["prompt"]).input_ids) for r in rows[k * B : (k + 1) * B]) for k in range(steps)]
    measured = lengths[1:] or lengths  # the warm-up step is not in the medians
    return sum(measured) / len(measured)


def format_limits(results: dict[str, dict[str, dict]], machine: dict, steps: int, layers: int = workload.REAL_DEPTH) -> str:
    """Each phase's achieved GFLOP/s and GB/s as a share of the machine's limits, per setting and side."""
    cfg = json.loads((workload.prepare_model_dir(num_layers=layers) / "config.json").read_text())
    geometry = limits.Geometry.from_config(cfg, cfg["num_hidden_layers"])
    lines = [limits.describe_limits(machine)]
    for setting, sides in results.items():
        s = workload.SETTINGS[setting]
        P = measured_prompt_length(setting, steps, layers)
        work = limits.phase_work(geometry, s["prompts"], s["generations"], round(P), s["new_tokens"], s["mu"],
                                 frozen_weights="lora" in s)
        cells = ", ".join(f"{k} {f / 1e9:.1f} GFLOP / {b / 1e9:.1f} GB" for k, (f, b) in work.items())
        lines += [f"{describe(setting)}, mean prompt {P:.0f} tokens: {cells}", limits.SHARES_HEAD]
        for side in ("trl", "grpo-lightning"):
            if side in sides:
                lines += limits.format_shares(side, limits.phase_shares(work, sides[side]["median"], machine))
        lines.append("")
    lines.append("%mm: workload FLOPs per second as a share of the matmul rate; %read: weight bytes per second as a")
    lines.append("share of the streaming read rate; floor s: the larger of the two times at those limits")
    lines.append("(bench/limits.py says what is counted).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(workload.SETTINGS), default=["a", "b", "c"])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per run; the first is warm-up")
    parser.add_argument("--frameworks", nargs="+", choices=sorted(SIDES), default=["trl", "grpo-lightning"])
    parser.add_argument("--trl-gradient-checkpointing", choices=("on", "off"), default="on",
                        help="TRL's own default is on")
    parser.add_argument("--ours-gradient-checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--ours-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra GRPOModule argument for the grpo-lightning side, repeatable")
    parser.add_argument("--layers", type=int, default=workload.REAL_DEPTH,
                        help="decoder layers of the Qwen2.5-0.5B geometry: 24 is the real model, 4 the quick cut")
    parser.add_argument("--log-dir", default=str(workload.DEFAULT_CACHE / "logs"))
    parser.add_argument("--json", help="write all results here as JSON")
    args = parser.parse_args(argv)

    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    workload.prepare_model_dir(num_layers=args.layers)  # build once here, so neither side pays for it
    print("measuring the machine's limits ...", file=sys.stderr, flush=True)
    machine = [limits.measure_limits()]
    extra = {
        "trl": ["--gradient-checkpointing", args.trl_gradient_checkpointing],
        "grpo-lightning": ["--gradient-checkpointing", args.ours_gradient_checkpointing]
        + [f"--module-arg={pair}" for pair in args.ours_arg],
    }
    results: dict[str, dict[str, dict]] = {}
    for setting in args.settings:
        results[setting] = {}
        for side in args.frameworks:
            print(f"running {side} on setting {setting} ...", file=sys.stderr, flush=True)
            results[setting][side] = run_side(side, setting, args.steps, extra[side], log_dir, args.layers)
            if args.json:  # keep partial results if a later run fails
                Path(args.json).write_text(json.dumps(results, indent=2))
    machine.append(limits.measure_limits())  # again after the runs: the best of both is the limit
    machine_best = limits.best_limits(*machine)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "limits": machine}, indent=2))
    print(format_table(results))
    print()
    print(f"Qwen2.5-0.5B-Instruct's geometry at {args.layers} layers, seeded random weights, fp32")
    print(format_limits(results, machine_best, args.steps, args.layers))


if __name__ == "__main__":
    main()
