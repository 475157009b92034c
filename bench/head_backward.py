"""Time and peak memory of the update's LM-head pass (forward + backward): checkpointed chunks vs the fused head.

    python -m bench.head_backward             # 8 rows x 64 tokens x hidden 896 x vocab 151,936, fp32, 2 rows a chunk

The update's log-prob pass as setting (a) runs it: hidden [N, C, H] and the tied weight [V, H] both take
gradient, entropies are computed along, and the upstream gradient differs per position. Variants:

- ``checkpoint``: what ``token_logprobs`` did before the fused head: each chunk of
  ``_chunk_logprobs`` under ``torch.utils.checkpoint`` (autograd sums one [V, H] gradient per chunk);
- ``fused``: ``grpo_lightning.fast.head_loss.head_logprobs`` (one [V, H] buffer, hand-written backward).

Each runs in its own child process (peak RSS only grows, see ``bench/logprob_memory.py``): it builds its
inputs, then runs forward + backward ``--repeats`` times and reports the fastest wall time, the CPU time
of that repeat, and the peak RSS above the inputs. The parent compares gradients between the variants.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.logprob_memory import add_pass_arguments, current_rss_mib, dims_of, make_inputs, run_child
from bench.timing import peak_rss_mib

VARIANTS = ("checkpoint", "fused")


def checkpointed_logprobs(hidden, weight, targets, chunk_rows, temperature=1.0):
    """The previous implementation: autograd through each checkpointed chunk."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from grpo_lightning.core.logprobs import _chunk_logprobs

    pieces = [
        checkpoint(_chunk_logprobs, hidden[s : s + chunk_rows], weight, None, targets[s : s + chunk_rows],
                   temperature, True, use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_rows)
    ]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def run_variant(variant: str, dims: dict, chunk_rows: int, repeats: int, out_file: str) -> dict:
    import torch

    from grpo_lightning.fast.head_loss import head_logprobs

    h, w, t = make_inputs(**dims)
    h.requires_grad_(True)
    w.requires_grad_(True)
    upstream = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    before = current_rss_mib()
    best, result = (float("inf"), 0.0), None
    for _ in range(repeats):
        result = None  # the previous repeat's gradients must not add to this one's peak
        start, cpu = time.perf_counter(), time.process_time()
        if variant == "fused":
            logp, _ = head_logprobs(h, w, t, chunk_rows, with_entropy=True)
        else:
            logp, _ = checkpointed_logprobs(h, w, t, chunk_rows)
        grads = torch.autograd.grad((logp * upstream).sum(), (h, w))
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
        result = (logp.detach(), *grads)
        del logp, grads
    torch.save(result, out_file)
    return {"variant": variant, "seconds": best[0], "cpu_seconds": best[1], "peak_extra_mib": peak_rss_mib() - before}


def measure(dims: dict, chunk_rows: int, repeats: int) -> dict:
    import torch

    report, results = {"dims": dims, "chunk_rows": chunk_rows, "repeats": repeats}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out_file = str(Path(tmp) / f"{variant}.pt")
            report[variant] = run_child("bench.head_backward", variant, "--out", out_file, "--dims", json.dumps(dims),
                                        "--chunk-rows", str(chunk_rows), "--repeats", str(repeats))
            results[variant] = torch.load(out_file)
    a, b = results["checkpoint"], results["fused"]
    report["max_abs_diff"] = {name: (x - y).abs().max().item() for name, x, y in zip(("logp", "d_hidden", "d_weight"), a, b)}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pass_arguments(parser, rows=8, tokens=64, chunk_rows=2, variants=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, json.loads(args.dims), args.chunk_rows, args.repeats, args.out)))
        return
    r = measure(dims_of(args), args.chunk_rows, args.repeats)
    print(f"LM-head log-prob forward + backward, {args.rows} rows x {args.tokens} tokens x hidden {args.hidden} x "
          f"vocab {args.vocab:,} (fp32), {args.chunk_rows} rows a chunk, best of {args.repeats}")
    print(f"{'variant':<12}{'wall s':>8}{'cpu s':>8}{'peak above inputs (MiB)':>25}")
    for v in VARIANTS:
        print(f"{v:<12}{r[v]['seconds']:>8.2f}{r[v]['cpu_seconds']:>8.2f}{r[v]['peak_extra_mib']:>25.0f}")
    print("max |diff| checkpoint vs fused: " + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff"].items()))


if __name__ == "__main__":
    main()
