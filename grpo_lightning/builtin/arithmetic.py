"""Built-in tasks: GSM8K-format word problems generated deterministically by the package.

A task is a list of records ``{"question": str, "answer": str}`` whose answer has GSM8K's form — worked
reasoning lines, then ``#### N`` — so everything downstream (prompts, rewards, the warm-up) treats it like
GSM8K. ``PromptDataModule(source="task:<name>")`` calls :func:`load_task`.

Tasks:

- ``arithmetic``: one- and two-step add/subtract problems with small numbers (every value in 0..33) and
  correct worked answers. ``test`` is a held-out split whose questions never occur in ``train``.
- ``arithmetic-distilled``: the same questions with the worked answers of a careless teacher, as distilled
  data often is: on a fraction of the two-step problems it stops after the first step and reports that
  partial result. The supervised warm-up trains on this split; GRPO then trains and is scored on
  ``arithmetic``, whose answers are right.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from grpo_lightning.builtin.answer_format import format_completion

NAMES = ("Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemal", "Lena")
ITEMS = ("apples", "books", "coins", "pens", "shells", "stickers", "marbles", "cards", "eggs", "cups")
# Verb phrases for each operation; each takes the number it moves.
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more", "is given {n} more")
LOSSES = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")

TEST_SIZE = 500  # held-out problems: the issue asks for at least 300 scored greedily
TRAIN_SIZE = 20000
TWO_STEP_FRACTION = 2 / 3
# Share of two-step problems whose distilled answer stops after step one. Chosen so that a model warmed up
# on it answers most two-step problems wrongly when greedy, yet often rightly among several samples.
CARELESS_FRACTION = 0.6
_SEED = 1234  # fixed: the task is part of the package, not a run-time choice


def _step(rng: random.Random, value: int) -> tuple[str, int, str]:
    """One operation on ``value``: (verb phrase, operand, sign), never going below zero."""
    if value > 1 and rng.random() < 0.5:
        n = rng.randint(1, min(9, value - 1))
        return rng.choice(LOSSES).format(n=n), n, "-"
    n = rng.randint(1, 9)
    return rng.choice(GAINS).format(n=n), n, "+"


def make_problem(rng: random.Random, two_step: bool) -> dict:
    """One problem: question, the correct worked lines and every intermediate value.

    Returns ``{"question", "lines": [str], "values": [int]}`` where ``values[-1]`` is the answer.
    """
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, 15)
    phrase1, n1, sign1 = _step(rng, start)
    value1 = start + n1 if sign1 == "+" else start - n1
    lines, values = [f"{start} {sign1} {n1} = {value1}"], [value1]
    events = phrase1
    if two_step:
        phrase2, n2, sign2 = _step(rng, value1)
        value2 = value1 + n2 if sign2 == "+" else value1 - n2
        lines.append(f"{value1} {sign2} {n2} = {value2}")
        values.append(value2)
        events = f"{phrase1}, then {phrase2}"
    question = f"{name} has {start} {item}. {name} {events}. How many {item} does {name} have now?"
    return {"question": question, "lines": lines, "values": values}


def worked_answer(lines: list[str], answer: int) -> str:
    """GSM8K's answer form: reasoning lines, then ``#### N``."""
    return "\n".join(lines) + f"\n#### {answer}"


@lru_cache(maxsize=4)
def _problems(seed: int, train_size: int, test_size: int) -> tuple[list[dict], list[dict]]:
    """Unique problems split into (train, test); the test questions never occur in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[dict] = []
    # Drawing until enough unique questions exist keeps the split disjoint without post-hoc filtering.
    while len(problems) < train_size + test_size:
        problem = make_problem(rng, two_step=rng.random() < TWO_STEP_FRACTION)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
    return problems[test_size:], problems[:test_size]


def careless_answer(problem: dict, rng: random.Random, fraction: float = CARELESS_FRACTION) -> str:
    """The careless teacher's worked answer: on ``fraction`` of two-step problems it stops after step one."""
    lines, values = problem["lines"], problem["values"]
    if len(lines) > 1 and rng.random() < fraction:
        return worked_answer(lines[:1], values[0])
    return worked_answer(lines, values[-1])


# GSM8K's calculator annotations, "<<48/2=24>>", which its worked answers carry before each result.
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def completion_text(answer: str, strip_calculator: bool = True) -> str:
    """A GSM8K-form answer rewritten as the completion the system prompt asks for.

    ``"15 - 1 = 14\\n#### 14"`` → ``"<reasoning>\\n15 - 1 = 14\\n</reasoning>\\n<answer>\\n14\\n</answer>"``:
    the worked lines become the reasoning, the text after ``####`` the answer. GSM8K's calculator
    annotations are dropped by default: they are tool calls, not prose the model should learn to write.
    """
    if "####" not in answer:
        raise ValueError(f"answer has no '####' final answer: {answer!r}")
    reasoning, final = answer.split("####", 1)
    if strip_calculator:
        reasoning = _CALCULATOR.sub("", reasoning)
    return format_completion(reasoning, final)


def load_task(name: str, split: str) -> list[dict]:
    """Records ``{"question", "answer"}`` of a built-in task; ``split`` is ``"train"`` or ``"test"``."""
    if split not in ("train", "test"):
        raise ValueError(f"task {name!r} has splits 'train' and 'test', not {split!r}")
    train, test = _problems(_SEED, TRAIN_SIZE, TEST_SIZE)
    problems = train if split == "train" else test
    if name == "arithmetic":
        return [{"question": p["question"], "answer": worked_answer(p["lines"], p["values"][-1])} for p in problems]
    if name == "arithmetic-distilled":
        # A separate stream per split so that the train answers do not depend on the test size.
        rng = random.Random(f"{_SEED}-{split}-careless")
        return [{"question": p["question"], "answer": careless_answer(p, rng)} for p in problems]
    raise ValueError(f"unknown task {name!r}; built-in tasks are 'arithmetic' and 'arithmetic-distilled'")


TASKS = ("arithmetic", "arithmetic-distilled")
