"""The benchmark's own arithmetic: log-prob agreement, μ grouping of TRL steps, medians and the ratio row."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `bench`

from bench import logprob_memory, run, timing  # noqa: E402


def test_project_logprobs_match_the_full_log_softmax():
    rollout = pytest.importorskip("grpo_lightning.rollout")
    h, w, t = logprob_memory.make_inputs(rows=5, tokens=7, hidden=16, vocab=50)
    expected = logprob_memory.full_logprobs(h, w, t)  # [5, 7]
    for chunk_rows in (1, 2, 5, 8):  # uneven last chunk and a chunk larger than N
        got = rollout.token_logprobs(h, w, t, chunk_rows)
        assert got.shape == (5, 7)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_trl_optimizer_steps_are_summed_per_grpo_step():
    trl_side = pytest.importorskip("bench.trl_side")
    one = {k: 1.0 for k in ("wall",) + timing.PHASES}
    grouped = trl_side.group_by_mu([one] * 7, mu=3)  # a trailing partial group is dropped
    assert len(grouped) == 2 and grouped[0]["wall"] == 3.0


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


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<reasoning>x</reasoning>\n<answer>\n72\n</answer>", "72"),  # exact: 2.0 + format 0.8
        ("<answer>72.0</answer>", "72"),  # one number each, equal: 1.5
        ("<answer>a</answer> then <answer> 5 apples </answer>", "5"),  # the last <answer> counts
        ("<answer>...</answer>", "..."),  # the literal ... is no answer
        ("no tags at all 72", "72"),
        ("<answer>72</answer>", None),  # a record without #### has no answer
    ],
)
def test_bench_reward_agrees_with_the_project_reward(completion, expected):
    rewards = pytest.importorskip("grpo_lightning.rewards")
    from bench.reward import combined_reward

    assert combined_reward(completion, expected) == pytest.approx(rewards.combined_reward(completion, expected))
