"""The benchmark's FLOP and byte accounting, on a geometry small enough to count by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `bench`

from bench import limits  # noqa: E402

# hidden 4, 2 heads of width 2, 1 KV head, intermediate 8, vocab 10, one layer
TINY = limits.Geometry(hidden=4, layers=1, heads=2, kv_heads=1, intermediate=8, vocab=10)


def test_weight_counts_by_hand():
    # q, o: 4·4 = 16 each; k, v: (1 head · width 2) × 4 = 8 each; gate, up, down: 4·8 = 32 each
    # → 16 + 16 + 8 + 8 + 32 + 32 + 32 = 144; the tied head adds 10·4 = 40 once
    assert limits.layer_weights(TINY) == 144
    assert limits.model_weights(TINY) == 184


def test_phase_work_by_hand():
    # 1 prompt × 2 samples, prompt 3 tokens, 2 new tokens, μ 2.
    # Layers: the prompt once (3) + each row's first completion token (2 rows × 1) = 5 tokens
    #   → 2 · 144 · 5 = 1440 FLOPs; head: 2 rows × 2 positions = 4 → 2 · 4 · 10 · 4 = 320. Forward 1760.
    # Bytes: 184 weights · 4 = 736 per read; sampling reads them once per new token (2 → 1472),
    # the reference once (736), each update 10 times (7360), twice for μ 2 (14720).
    work = limits.phase_work(TINY, prompts=1, generations=2, prompt_len=3, new_tokens=2, mu=2)
    assert work == {"sampling": (1760, 1472), "reference": (1760, 736), "update": (2 * 3 * 1760, 14720)}
    # frozen weights (LoRA): input gradients only, 2 forwards' FLOPs and 2 weight reads per update
    frozen = limits.phase_work(TINY, prompts=1, generations=2, prompt_len=3, new_tokens=2, mu=2, frozen_weights=True)
    assert frozen["update"] == (2 * 2 * 1760, 2 * 2 * 736)


def test_shares_and_floor():
    work = {"update": (200e9, 10e9), "sampling": (10e9, 40e9)}
    machine = {"matmul_gflops": 100.0, "read_gbs": 20.0}
    shares = limits.phase_shares(work, {"update": 4.0, "sampling": 4.0}, machine)
    # update: 200 GFLOP in 4 s = 50 GFLOP/s, half the matmul rate; floor max(2 s compute, 0.5 s read) = 2 s
    assert shares["update"]["gflops"] == pytest.approx(50.0) and shares["update"]["gflops_share"] == pytest.approx(0.5)
    assert shares["update"]["floor_s"] == pytest.approx(2.0)
    # sampling: 40 GB in 4 s = 10 GB/s, half the read rate; floor max(0.1 s, 2 s) = 2 s
    assert shares["sampling"]["gbs_share"] == pytest.approx(0.5) and shares["sampling"]["floor_s"] == pytest.approx(2.0)


def test_best_limits_keep_the_fastest_measurement():
    a = {"matmul_gflops": 80.0, "read_gbs": 30.0, "head_read_gbs": 5.0, "head_read_ms": 100.0, "threads": 2}
    b = {"matmul_gflops": 100.0, "read_gbs": 20.0, "head_read_gbs": 6.0, "head_read_ms": 90.0, "threads": 2}
    best = limits.best_limits(a, b)
    assert (best["matmul_gflops"], best["read_gbs"], best["head_read_ms"]) == (100.0, 30.0, 90.0)
