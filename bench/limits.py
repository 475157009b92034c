"""The machine's own limits, and how close each phase of a GRPO step comes to them.

    python -m bench.limits        # measure fp32 matmul GFLOP/s and weight-read GB/s on this machine

Two parts. ``measure_limits`` times three microbenchmarks, best of several repeats (the minimum time is
the one least disturbed by other load): an fp32 matmul at the MLP's shape, a plain streaming read of the
[V, H] LM-head weight (``W.sum()``: memory bandwidth), and the decoding LM-head product for 8 rows, W·xᵀ
(what a sampling step does with that weight). ``phase_work`` counts, from the geometry and the setting
alone, the FLOPs and the weight bytes that each phase must at least move; ``phase_shares`` divides them
by measured phase times. Both frameworks run the same workload, so the same counts apply to both: a
share is "workload FLOPs per second / the machine's matmul rate", not a count of what a framework
happens to compute (recomputes and repeated prompts are its own overhead).

What is counted: the matmuls of the decoder layers (q, k, v, o; gate, up, down) and of the LM head, fp32
(4 bytes). Attention scores, norms, biases and element-wise work are left out (about 3% of the FLOPs at
these lengths), so the FLOP counts are lower bounds. Each generated token needs one decoding step that
reads every weight once; the reference is one forward; an update is forward + backward (3× the forward
FLOPs) and moves 10 model-sized tensors (forward and backward read W, backward writes dW, Adam reads
W, dW, m, v and writes W, m, v).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

BYTES_PER_WEIGHT = 4  # fp32: the workload's precision
UPDATE_MODEL_TRANSFERS = 10  # see the module docstring
HEAD_ROWS = 8  # rows of one decoding step in settings (a) and (b): 2 prompts x 4 samples


@dataclass(frozen=True)
class Geometry:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict, layers: int) -> Geometry:
        return cls(cfg["hidden_size"], layers, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                   cfg["intermediate_size"], cfg["vocab_size"])


def layer_weights(g: Geometry) -> int:
    """Matrix elements of one decoder layer: q and o are [H, H]; k and v [kv·d, H]; gate, up, down H × I."""
    kv_width = g.kv_heads * (g.hidden // g.heads)
    return 2 * g.hidden * g.hidden + 2 * g.hidden * kv_width + 3 * g.hidden * g.intermediate


def model_weights(g: Geometry) -> int:
    """Every layer's matrices plus the [V, H] head, counted once: it is tied to the embedding."""
    return g.layers * layer_weights(g) + g.vocab * g.hidden


def forward_flops(g: Geometry, prompts: int, generations: int, prompt_len: int, new_tokens: int) -> int:
    """One forward over a rollout, each prompt read once for its G samples (the least work there is).

    The layers see each prompt's P positions once and each row's first C − 1 completion tokens (the last
    token predicts nothing); the head sees the C positions per row that predict completion tokens.
    """
    rows = prompts * generations
    layer_tokens = prompts * prompt_len + rows * (new_tokens - 1)
    return 2 * layer_weights(g) * g.layers * layer_tokens + 2 * g.hidden * g.vocab * rows * new_tokens


def phase_work(g: Geometry, prompts: int, generations: int, prompt_len: int, new_tokens: int,
               mu: int, frozen_weights: bool = False) -> dict[str, tuple[int, int]]:
    """{phase: (FLOPs, bytes)} of one GRPO step; sampling costs the forward FLOPs but reads the weights
    once per generated token, the reference once, and the μ updates 3× the FLOPs each.

    ``frozen_weights`` (LoRA, adapters not counted): the backward pass computes input gradients only, so an
    update is 2× the forward FLOPs and reads the weights twice.
    """
    flops = forward_flops(g, prompts, generations, prompt_len, new_tokens)
    weight_bytes = model_weights(g) * BYTES_PER_WEIGHT
    update_flops, update_transfers = (2, 2) if frozen_weights else (3, UPDATE_MODEL_TRANSFERS)
    return {
        "sampling": (flops, new_tokens * weight_bytes),
        "reference": (flops, weight_bytes),
        "update": (update_flops * flops * mu, update_transfers * weight_bytes * mu),
    }


def phase_shares(work: dict[str, tuple[int, int]], seconds: dict[str, float], limits: dict[str, float]) -> dict:
    """Achieved GFLOP/s and GB/s of each phase, their shares of the limits, and the phase's floor time
    (the larger of compute time and read time at the limits)."""
    out = {}
    for phase, (flops, nbytes) in work.items():
        t = seconds.get(phase, 0.0)
        floor = max(flops / (limits["matmul_gflops"] * 1e9), nbytes / (limits["read_gbs"] * 1e9))
        gflops, gbs = (flops / t / 1e9, nbytes / t / 1e9) if t > 0 else (0.0, 0.0)
        out[phase] = {"seconds": t, "gflops": gflops, "gflops_share": gflops / limits["matmul_gflops"],
                      "gbs": gbs, "gbs_share": gbs / limits["read_gbs"], "floor_s": floor}
    return out


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_limits(hidden: int = 896, vocab: int = 151936, intermediate: int = 4864, repeats: int = 7) -> dict:
    """Best-of-``repeats`` fp32 matmul GFLOP/s and weight-read GB/s on this machine, with the CPU time used."""
    import torch

    cpu0, wall0 = time.process_time(), time.perf_counter()
    torch.manual_seed(0)
    # 2048 positions through an MLP matrix: the update's shape, and faster than 512 rows (83 vs 76 GFLOP/s)
    x, w = torch.randn(2048, hidden), torch.randn(intermediate, hidden)
    matmul_s = _best_seconds(lambda: x @ w.T, repeats)
    head = torch.randn(vocab, hidden)
    rows = torch.randn(HEAD_ROWS, hidden)
    read_s = _best_seconds(lambda: head.sum(), repeats)
    head_s = _best_seconds(lambda: torch.mm(head, rows.t()), repeats)
    nbytes = head.numel() * BYTES_PER_WEIGHT
    return {
        "matmul_gflops": 2 * 2048 * hidden * intermediate / matmul_s / 1e9,
        "read_gbs": nbytes / read_s / 1e9,
        "head_read_gbs": nbytes / head_s / 1e9,
        "head_read_ms": head_s * 1e3,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
    }


def best_limits(*measured: dict) -> dict:
    """The best of several measurements of the limits: other load only ever slows a microbenchmark down."""
    best = dict(measured[0])
    for m in measured[1:]:
        for key in ("matmul_gflops", "read_gbs", "head_read_gbs"):
            best[key] = max(best[key], m[key])
        best["head_read_ms"] = min(best["head_read_ms"], m["head_read_ms"])
    return best


def describe_limits(limits: dict) -> str:
    return (f"machine limits ({limits['threads']} threads, best of repeats): fp32 matmul {limits['matmul_gflops']:.0f} "
            f"GFLOP/s; weight read {limits['read_gbs']:.1f} GB/s streaming; LM-head product for {HEAD_ROWS} rows "
            f"(W·xT) {limits['head_read_ms']:.0f} ms = {limits['head_read_gbs']:.1f} GB/s")


def format_shares(framework: str, shares: dict) -> list[str]:
    lines = []
    for phase, s in shares.items():
        lines.append(f"{framework:<16}{phase:<11}{s['seconds']:>7.1f}{s['gflops']:>9.1f}{s['gflops_share']:>7.0%}"
                     f"{s['gbs']:>8.1f}{s['gbs_share']:>7.0%}{s['floor_s']:>8.1f}")
    return lines


SHARES_HEAD = f"{'framework':<16}{'phase':<11}{'s':>7}{'GFLOP/s':>9}{'%mm':>7}{'GB/s':>8}{'%read':>7}{'floor s':>8}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    limits = measure_limits(repeats=args.repeats)
    print(describe_limits(limits))
    print(f"(measured in {limits['wall_s']:.1f} s wall, {limits['cpu_s']:.1f} s CPU)")


if __name__ == "__main__":
    main()
