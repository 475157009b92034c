"""One evaluation step for both loops: the accuracy callback's :func:`evaluate` and the validation hooks score
the same rows; rows files are never overwritten; what changed between before and after."""

import contextlib
import json
import math
from types import SimpleNamespace

import pytest

from grpo_lightning.train.accuracy import changes
from grpo_lightning.train.options import Evaluation
from grpo_lightning.train.evaluation import EvaluationMixin, Scored, accuracy_of, evaluate, free_path, write_rows

BATCHES = [{"prompt": ["a", "b"], "expected": ["1", "2"]}, {"prompt": ["c"], "expected": ["1"]}]


class Scorer(EvaluationMixin):
    """A module whose "completion" of a prompt is its expected answer 1: right on the prompts that expect 1."""

    device = "cpu"
    evaluation = Evaluation()

    def __init__(self, trainer=None):
        self.trainer, self.logged = trainer, []

    def evaluate_batch(self, batch):
        return [{"prompt": p, "expected": e, "extracted": "1", "completion": "1", "correct": e == "1"}
                for p, e in zip(batch["prompt"], batch["expected"])]

    def log(self, name, value, **kwargs):
        self.logged.append((name, float(value)))


class Logger:
    def __init__(self):
        self.points = []

    def log_metrics(self, metrics, step):
        self.points.append((step, metrics))

    def save(self):
        pass


def fake_trainer(log_dir, entered, fn="validate", global_step=0):
    @contextlib.contextmanager
    def val_step_context():
        entered.append(True)
        yield

    datamodule = SimpleNamespace(setup=lambda stage: None, eval_dataloader=lambda: BATCHES)
    return SimpleNamespace(datamodule=datamodule, precision_plugin=SimpleNamespace(val_step_context=val_step_context),
                           strategy=None, is_global_zero=True, log_dir=str(log_dir), global_step=global_step,
                           loggers=[Logger()], state=SimpleNamespace(fn=fn))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _validate(module):
    module.on_validation_epoch_start()
    for i, batch in enumerate(BATCHES):
        module.validation_step(batch, i)
    module.on_validation_epoch_end()


def test_evaluate_and_validate_score_and_write_the_same_rows(tmp_path):
    entered = []
    trainer = fake_trainer(tmp_path, entered)
    scored = evaluate(trainer, Scorer(), tmp_path / "eval_before.jsonl", "before")
    assert scored.accuracy == pytest.approx(2 / 3) and scored.step == 0
    assert entered == [True, True]  # each batch under the trainer's precision
    before = _jsonl(tmp_path / "eval_before.jsonl")
    assert [r["prompt"] for r in before] == ["a", "b", "c"] and [r["correct"] for r in before] == [True, False, True]

    module = Scorer(trainer)  # validate: Lightning's loop calls the hooks
    _validate(module)
    assert module.logged == [("val/accuracy", pytest.approx(2 / 3))]  # once, for checkpoints and early stopping
    assert trainer.loggers[0].points == [(0, {"val/accuracy": pytest.approx(2 / 3)})]
    assert _jsonl(tmp_path / "validate_examples.jsonl") == before


def test_an_evaluation_during_fit_writes_its_rows_under_its_step(tmp_path):
    trainer = fake_trainer(tmp_path, [], fn="fit", global_step=30)
    module = Scorer(trainer)
    _validate(module)
    assert trainer.loggers[0].points == [(30, {"val/accuracy": pytest.approx(2 / 3)})]  # at global_step
    assert [r["prompt"] for r in _jsonl(tmp_path / "evaluations" / "step_0000030.jsonl")] == ["a", "b", "c"]
    assert module.last_evaluation.step == 30 and module.last_evaluation.accuracy == pytest.approx(2 / 3)


def test_a_rows_file_is_never_overwritten(tmp_path):
    trainer = fake_trainer(tmp_path, [])
    evaluate(trainer, Scorer(), tmp_path / "eval_after.jsonl", "after")
    first = (tmp_path / "eval_after.jsonl").read_text()
    evaluate(trainer, Scorer(), tmp_path / "eval_after.jsonl", "after")  # a resumed run in the same log directory
    assert (tmp_path / "eval_after.jsonl").read_text() == first
    assert _jsonl(tmp_path / "eval_after-2.jsonl") == _jsonl(tmp_path / "eval_after.jsonl")
    assert free_path(tmp_path / "eval_after.jsonl").name == "eval_after-3.jsonl"
    assert write_rows([{"x": 1}], tmp_path / "eval_after.jsonl").name == "eval_after-3.jsonl"


def test_accuracy_of_rows_and_of_the_first_problems():
    scored = Scored(4, [{"correct": True}, {"correct": False}, {"correct": True}, {"correct": True}])
    assert scored.accuracy == 0.75 and scored.first(2).accuracy == 0.5 and scored.first(None).accuracy == 0.75
    assert math.isnan(accuracy_of([]))


def test_changes_are_the_problems_whose_correctness_flipped():
    before = [{"correct": False, "extracted": "3"}, {"correct": True, "extracted": "4"}, {"correct": True, "extracted": "5"}]
    after = [{"correct": True, "extracted": "7"}, {"correct": False, "extracted": "9"}, {"correct": True, "extracted": "5"}]
    changed = changes(before, after)
    assert [(r["change"], r["before_extracted"], r["extracted"]) for r in changed] == [
        ("wrong_to_right", "3", "7"), ("right_to_wrong", "4", "9")]


def test_sampled_rows_give_mean_accuracy_pass_at_k_and_majority_vote():
    from grpo_lightning.train.evaluation import sampled_metrics, sampled_rows

    a = lambda x: f"<answer>{x}</answer>"  # noqa: E731
    # problem 1 (expects 7): answers 7, 3, 3 → 1 of 3 right, pass@3 true, majority 3 wrong
    # problem 2 (expects 5): answers 5, 5, 2 → 2 of 3 right, pass@3 true, majority 5 right
    # problem 3 (expects 9): answers 1, 2, 4 → none right, all equal once: the majority is the first seen, 1
    rows = sampled_rows(["p", "q", "r"], ["7", "5", "9"],
                        [a(7), a(3), a(3), a(5), a(5), a(2), a(1), a(2), a(4)], 3)
    assert [r["correct"] for r in rows] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 0.0]
    assert [r["majority"] for r in rows] == ["3", "5", "1"]
    assert [r["majority_correct"] for r in rows] == [False, True, False]
    assert accuracy_of(rows) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)  # pass@1 estimated over 3 samples: 1/3
    assert sampled_metrics(rows, 3, "val/") == {"val/pass@3": pytest.approx(2 / 3), "val/maj@3": pytest.approx(1 / 3)}
    assert sampled_metrics([{"correct": True}], 3, "val/") == {}  # greedy rows: nothing beside the accuracy


def exactly(completion: str, expected: str | None) -> bool:
    return completion == expected


def test_the_match_is_the_data_modules():
    """The evaluation scores with ``data.answer_match``: GSM8K's by default, the one a task names otherwise."""
    from types import SimpleNamespace

    from grpo_lightning.builtin.gsm8k import is_correct
    from grpo_lightning.train.data import PromptDataModule
    from grpo_lightning.train.evaluation import task_match

    assert PromptDataModule(source="task:arithmetic").answer_match is is_correct
    data = PromptDataModule(source="task:arithmetic", answer_match="test_evaluation.exactly")
    module = SimpleNamespace(_trainer=SimpleNamespace(datamodule=data))
    assert task_match(module) is exactly
    assert task_match(SimpleNamespace(_trainer=None)) is is_correct  # a module run without a trainer
    with pytest.raises(ImportError, match="cannot import 'nowhere.match'"):
        PromptDataModule(answer_match="nowhere.match")
