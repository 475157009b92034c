"""The benchmark's own arithmetic: log-prob agreement, μ grouping of TRL steps, medians and the ratio row."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `bench`

from bench import logprob_memory, ours_side, run, timing, workload  # noqa: E402


def test_project_logprobs_match_the_full_log_softmax():
    from grpo_lightning.core import logprobs  # the project's own module: a broken import must fail, not skip

    h, w, t = logprob_memory.make_inputs(rows=5, tokens=7, hidden=16, vocab=50)
    expected = logprob_memory.full_logprobs(h, w, t)  # [5, 7]
    for chunk_rows in (1, 2, 5, 8):  # uneven last chunk and a chunk larger than N
        got = logprobs.token_logprobs(h, w, t, chunk_rows)
        assert got.shape == (5, 7)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_trl_optimizer_steps_are_summed_per_grpo_step():
    trl_side = pytest.importorskip("bench.trl_side")
    # optimizer steps 1..7, each field a multiple of the step's number: groups {1, 2, 3} and {4, 5, 6}, 7 dropped
    steps = [{"wall": i, "cpu": 10 * i, **{phase: 100 * i for phase in timing.PHASES}} for i in range(1, 8)]
    grouped = trl_side.group_by_mu(steps, mu=3)
    assert grouped == [{"wall": 6, "cpu": 60, **{phase: 600 for phase in timing.PHASES}},
                       {"wall": 15, "cpu": 150, **{phase: 1500 for phase in timing.PHASES}}]


def test_summary_skips_the_warmup_step():
    steps = [{"wall": 100.0}, {"wall": 2.0}, {"wall": 4.0}, {"wall": 3.0}]
    assert timing.summarise(steps)["wall"] == 3.0
    assert timing.summarise(steps[:1])["wall"] == 100.0  # too few steps: nothing is dropped


def test_table_reports_the_ratio():
    def record(wall, rss):
        steps = [{"wall": wall, "cpu": 2 * wall}] * 3
        return {"median": timing.summarise(steps), "peak_rss_mib": rss, "steps": steps}

    table = run.format_table({"a": {"trl": record(10.0, 2000.0), "grpo-lightning": record(4.0, 1000.0)}})
    ratio_line = next(line for line in table.splitlines() if line.startswith("ours / TRL"))
    assert ratio_line.split()[3:] == ["0.40", "0.40", "0.50"]  # wall, cpu, peak RSS


def test_trl_reward_signature():
    from bench.reward import trl_reward

    # exact answer 2.0 + two tags 0.4; no tags at all 0.0
    assert trl_reward(["p", "p"], ["<answer>72</answer>", "72"], ["72", "72"]) == pytest.approx([2.4, 0.0])


def test_a_lora_gives_both_sides_the_same_adapters(tiny_model_dir):
    trl_side = pytest.importorskip("bench.trl_side")
    from grpo_lightning.hf.lora import DEFAULT_TARGET_MODULES

    setting = workload.SETTINGS["a-lora"]
    config = trl_side.trl_peft_config(setting)
    assert (config.r, config.lora_alpha) == (16, 32.0) and set(config.target_modules) == set(DEFAULT_TARGET_MODULES)
    assert trl_side.trl_peft_config(workload.SETTINGS["a"]) is None
    module = ours_side.build(tiny_model_dir, setting, False, 2, {})  # the bench's own builder, on the tiny model
    assert module.policy.peft_config["default"].to_dict() == config.to_dict() | {"base_model_name_or_path": str(tiny_model_dir)}
    assert module.reference is None
    # TRL's LoRA reference pass is the policy with adapters off: the timer must see it as the reference
    with module.policy.disable_adapter():
        assert trl_side.adapters_disabled(module.policy)
    assert not trl_side.adapters_disabled(module.policy)
