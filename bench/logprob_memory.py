"""Peak memory of the per-token log-prob pass: a full log-softmax against ``grpo_lightning.core.logprobs.token_logprobs``.

    python -m bench.logprob_memory            # 16 rows x 512 tokens x hidden 896 x vocab 151,936, fp32

Each variant runs in a fresh child process on identical seeded inputs (hidden [N, C, H], tied weight
[V, H], targets [N, C]). Why a process each: torch's CPU allocations bypass tracemalloc, and a
process's peak RSS (``ru_maxrss``) only ever grows, so one process cannot measure two peaks. A child
builds its inputs, records its RSS, runs the variant once, and reports ``ru_maxrss`` minus that RSS:
the extra memory the pass needed at its peak. Tensors this size are mmap-backed in glibc, so RSS
follows live tensors closely. The children also save their [N, C] results; the parent compares them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import peak_rss_mib

REPO = Path(__file__).resolve().parents[1]


def run_child(module: str, variant: str, *args: str) -> dict:
    """``python -m <module> --child <variant> <args>`` in a fresh process; its last stdout line is its JSON report."""
    proc = subprocess.run([sys.executable, "-m", module, "--child", variant, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_pass_arguments(parser: argparse.ArgumentParser, rows: int, tokens: int, chunk_rows: int, variants: tuple) -> None:
    """The LM-head pass's geometry (Qwen2.5's hidden size and vocabulary by default) and the child's own arguments."""
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-rows", type=int, default=chunk_rows)
    parser.add_argument("--child", choices=variants, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--dims", help=argparse.SUPPRESS)


def dims_of(args: argparse.Namespace) -> dict:
    return {"rows": args.rows, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab}


def current_rss_mib() -> float:
    """Resident set size now (second field of /proc/self/statm, in pages)."""
    import os

    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_inputs(rows: int, tokens: int, hidden: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, tokens, hidden, generator=g)  # [N, C, H], unit scale like normed hidden states
    w = torch.randn(vocab, hidden, generator=g).mul_(0.02)  # [V, H], the tied init scale; in place: no transient peak
    t = torch.randint(0, vocab, (rows, tokens), generator=g)  # [N, C]
    return h, w, t


def full_logprobs(hidden, weight, targets):
    """The plain formula: every logit, a full [N, C, V] log-softmax, then the target's entry."""
    import torch

    logits = hidden @ weight.T  # [N, C, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, C]


def project_logprobs():
    """The project's chunked pass: only [chunk_rows, C, V] logits exist at a time."""
    from grpo_lightning.core.logprobs import token_logprobs

    return token_logprobs


def run_variant(variant: str, dims: dict, chunk_rows: int, out_file: str) -> dict:
    """Child process body: inputs, baseline RSS, one pass, the peak above the baseline."""
    import torch

    torch.set_grad_enabled(False)  # the pass as the reference / old-policy forward runs it
    # Import before the baseline, so module imports are not charged to the pass.
    token_logprobs = project_logprobs()
    h, w, t = make_inputs(**dims)
    before, peak_before = current_rss_mib(), peak_rss_mib()
    start = time.perf_counter()
    if variant == "full":
        result = full_logprobs(h, w, t)
    else:
        result = token_logprobs(h, w, t, chunk_rows)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    torch.save(result, out_file)
    # If input building had left a higher peak than the pass reached, the peak would be hidden:
    # report that case instead of a number that only looks small.
    return {
        "variant": variant,
        "peak_extra_mib": peak - before,
        "hidden_peak": peak <= peak_before,
        "seconds": seconds,
    }


def measure(dims: dict, chunk_rows: int) -> dict:
    """Run both variants in child processes and compare their peaks and results."""
    import torch

    report = {"dims": dims, "chunk_rows": chunk_rows}
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for variant in ("full", "ours"):
            out_file = str(Path(tmp) / f"{variant}.pt")
            report[variant] = run_child("bench.logprob_memory", variant, "--out", out_file, "--dims", json.dumps(dims),
                                        "--chunk-rows", str(chunk_rows))
            results[variant] = torch.load(out_file)
        report["max_abs_diff"] = (results["full"] - results["ours"]).abs().max().item()
    report["peak_ratio"] = report["full"]["peak_extra_mib"] / max(report["ours"]["peak_extra_mib"], 1e-9)
    return report


def print_report(r: dict) -> None:
    d = r["dims"]
    print(f"log-prob pass, {d['rows']} rows x {d['tokens']} tokens x hidden {d['hidden']} x vocab {d['vocab']:,} (fp32)")
    print(f"{'variant':<34}{'peak above inputs (MiB)':>24}{'seconds':>10}")
    names = {"full": "full logits + log_softmax + gather", "ours": f"token_logprobs, chunk_rows={r['chunk_rows']}"}
    for key in ("full", "ours"):
        v = r[key]
        flag = "  (peak hidden by input building)" if v["hidden_peak"] else ""
        print(f"{names[key]:<34}{v['peak_extra_mib']:>24.0f}{v['seconds']:>10.2f}{flag}")
    print(f"peak ratio full / ours: {r['peak_ratio']:.1f}x   max |diff|: {r['max_abs_diff']:.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pass_arguments(parser, rows=16, tokens=512, chunk_rows=1, variants=("full", "ours"))
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, json.loads(args.dims), args.chunk_rows, args.out)))
        return
    report = measure(dims_of(args), args.chunk_rows)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
