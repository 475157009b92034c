"""Evaluation during fit on two CPU processes, under DDP and under FSDP2: each example scored once, the counts
of both processes in one accuracy, process 0 writing each evaluation's rows once, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import DDP, config, launch
from test_sharding import FSDP

pytestmark = pytest.mark.slow  # two processes, two fits

# μ 2, 4 rollout steps, an evaluation every 2 of them: at optimizer steps 4 and 8. 9 problems in batches of 2:
# process 0 scores 5 (3 batches), process 1 scores 4 (2 batches, and a third pass under FSDP2 to match).
WATCH = ["--trainer.val_check_interval", "2", "--data.eval_batch_size", "2"]


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("watch2")
    launch(tmp, [
        ["fit", "--config", str(config(tmp, "ddp")), *DDP, *WATCH],
        ["fit", "--config", str(config(tmp, "fsdp")), *FSDP, *WATCH],
    ])
    return tmp


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_each_evaluation_counts_every_example_once(watched, name):
    log_dir = watched / name / "lightning_logs" / "version_0"
    events = EventAccumulator(str(log_dir))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("val/accuracy")]
    assert [step for step, _ in points] == [0, 4, 8]
    order = [r["prompt"] for r in _jsonl(log_dir / "eval_before.jsonl")]
    assert len(order) == 9
    assert sorted(p.name for p in (log_dir / "evaluations").iterdir()) == ["step_0000004.jsonl", "step_0000008.jsonl"]
    for step, value in points[1:]:
        rows = _jsonl(log_dir / "evaluations" / f"step_{step:07d}.jsonl")
        assert [r["prompt"] for r in rows] == order  # both processes' rows, once, in the evaluation set's order
        assert value == pytest.approx(sum(r["correct"] for r in rows) / 9)  # the counts of both processes
    assert _jsonl(log_dir / "eval_after.jsonl") == _jsonl(log_dir / "evaluations" / "step_0000008.jsonl")
