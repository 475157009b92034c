"""The built-in tasks: deterministic, GSM8K-form, a disjoint held-out split, correct arithmetic."""

import random
import re

import pytest

from grpo_lightning.builtin.arithmetic import (
    CARELESS_FRACTION, TEST_SIZE, TRAIN_SIZE, careless_answer, completion_text, load_task, make_problem, worked_answer,
)
from grpo_lightning.builtin.gsm8k import extract_dataset_answer

LINE = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)$")


def test_worked_answer_is_gsm8k_form():
    assert worked_answer(["7 + 5 = 12", "12 - 3 = 9"], 9) == "7 + 5 = 12\n12 - 3 = 9\n#### 9"


def test_completion_text_hand_worked():
    assert completion_text("7 + 5 = 12\n#### 12") == "<reasoning>\n7 + 5 = 12\n</reasoning>\n<answer>\n12\n</answer>"
    # GSM8K's calculator annotations go; the surrounding prose stays.
    gsm8k = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 24"
    assert completion_text(gsm8k) == "<reasoning>\nShe sold 48/2 = 24 clips.\n</reasoning>\n<answer>\n24\n</answer>"
    assert "<<48/2=24>>" in completion_text(gsm8k, strip_calculator=False)
    with pytest.raises(ValueError, match="####"):
        completion_text("no final answer")


def test_make_problem_arithmetic_is_right():
    rng = random.Random(0)
    for two_step in (False, True) * 50:
        p = make_problem(rng, two_step)
        assert len(p["lines"]) == len(p["values"]) == (2 if two_step else 1)
        previous = None
        for line, value in zip(p["lines"], p["values"]):
            a, sign, b, c = LINE.match(line).groups()
            assert int(c) == (int(a) + int(b) if sign == "+" else int(a) - int(b)) == value >= 0
            assert previous is None or int(a) == previous  # step two starts from step one's result
            previous = value
        assert f"has {p['lines'][0].split()[0]} " in p["question"]  # step one starts from the stated amount


def test_careless_answer_stops_after_step_one():
    problem = {"lines": ["7 + 5 = 12", "12 - 3 = 9"], "values": [12, 9]}

    class Always(random.Random):
        def random(self):
            return 0.0  # below any fraction: the careless branch

    assert careless_answer(problem, Always()) == "7 + 5 = 12\n#### 12"
    assert careless_answer(problem, Always(), fraction=0.0) == "7 + 5 = 12\n12 - 3 = 9\n#### 9"
    one_step = {"lines": ["7 + 5 = 12"], "values": [12]}
    assert careless_answer(one_step, Always()) == "7 + 5 = 12\n#### 12"


def test_splits_sizes_disjoint_and_deterministic():
    train, test = load_task("arithmetic", "train"), load_task("arithmetic", "test")
    assert len(train) == TRAIN_SIZE and len(test) == TEST_SIZE >= 300
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert load_task("arithmetic", "test") == test
    for r in test[:50]:
        assert extract_dataset_answer(r["answer"]).isdigit()


def test_distilled_shares_questions_and_is_careless_on_some_two_step_problems():
    clean, distilled = load_task("arithmetic", "train"), load_task("arithmetic-distilled", "train")
    assert [r["question"] for r in clean] == [r["question"] for r in distilled]
    two_step = [(c, d) for c, d in zip(clean, distilled) if c["answer"].count("\n") == 2]
    careless = sum(c["answer"] != d["answer"] for c, d in two_step) / len(two_step)
    assert abs(careless - CARELESS_FRACTION) < 0.03
    # One-step answers are never changed.
    assert all(c == d for c, d in zip(clean, distilled) if c["answer"].count("\n") == 1)


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="nope"):
        load_task("nope", "train")
    with pytest.raises(ValueError, match="validation"):
        load_task("arithmetic", "validation")
