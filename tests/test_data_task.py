"""Generated tasks as a source: ``task:NAME`` reads :func:`load_task`'s records, checked as any row."""

import pytest

from grpo_lightning.builtin.arithmetic import TEST_SIZE, load_task
from grpo_lightning.train.data import load_records


def test_task_records_are_the_tasks_with_their_final_answers():
    records = load_records("task:arithmetic", "test")
    task = load_task("arithmetic", "test")
    assert len(records) == TEST_SIZE
    assert [r["question"] for r in records] == [t["question"] for t in task]
    assert all(r["expected"] == t["answer"].rsplit("#### ", 1)[1] for r, t in zip(records, task))


def test_task_errors_name_the_task_and_the_row():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_records("task:nope", "train")
    with pytest.raises(ValueError, match=r"task:arithmetic test #0: missing text field 'problem'"):
        load_records("task:arithmetic", "test", question_field="problem")
