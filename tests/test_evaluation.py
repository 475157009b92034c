"""One evaluation step for both loops: the accuracy callback's :func:`evaluate` and validate's hooks score,
count and write the same rows."""

import contextlib
import json
from types import SimpleNamespace

import pytest

from grpo_lightning.train.evaluation import EvaluationMixin, evaluate

BATCHES = [{"prompt": ["a", "b"], "expected": ["1", "2"]}, {"prompt": ["c"], "expected": ["1"]}]


class Scorer(EvaluationMixin):
    """A module whose "completion" of a prompt is its expected answer 1: right on the prompts that expect 1."""

    device = "cpu"

    def __init__(self, trainer=None):
        self.trainer, self.logged = trainer, []

    def evaluate_batch(self, batch):
        return [{"prompt": p, "expected": e, "completion": "1", "correct": e == "1"}
                for p, e in zip(batch["prompt"], batch["expected"])]

    def log(self, name, value, **kwargs):
        self.logged.append((name, value, kwargs["batch_size"]))


def fake_trainer(log_dir, entered):
    @contextlib.contextmanager
    def val_step_context():
        entered.append(True)
        yield

    datamodule = SimpleNamespace(setup=lambda stage: None, val_dataloader=lambda: BATCHES)
    return SimpleNamespace(datamodule=datamodule, precision_plugin=SimpleNamespace(val_step_context=val_step_context),
                           strategy=None, is_global_zero=True, log_dir=str(log_dir))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_and_validate_score_and_write_the_same_rows(tmp_path):
    entered = []
    trainer = fake_trainer(tmp_path, entered)
    assert evaluate(trainer, Scorer(), tmp_path / "eval_before.jsonl", "before") == pytest.approx(2 / 3)
    assert entered == [True, True]  # each batch under the trainer's precision
    before = _jsonl(tmp_path / "eval_before.jsonl")
    assert [r["prompt"] for r in before] == ["a", "b", "c"] and [r["correct"] for r in before] == [True, False, True]

    module = Scorer(trainer)  # validate: Lightning's loop calls the hooks
    module.on_validation_epoch_start()
    for i, batch in enumerate(BATCHES):
        module.validation_step(batch, i)
    module.on_validation_epoch_end()
    assert [(name, size) for name, _, size in module.logged] == [("val/accuracy", 2), ("val/accuracy", 1)]
    assert module.logged[0][1] is module.val_accuracy and module.val_accuracy.compute().item() == pytest.approx(2 / 3)
    assert _jsonl(tmp_path / "validate_examples.jsonl") == before


def test_an_examples_file_is_never_overwritten(tmp_path):
    trainer = fake_trainer(tmp_path, [])
    evaluate(trainer, Scorer(), tmp_path / "eval_after.jsonl", "after")
    with pytest.raises(FileExistsError):
        evaluate(trainer, Scorer(), tmp_path / "eval_after.jsonl", "after")


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
