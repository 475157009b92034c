"""Answer extraction and rewards: pure functions of strings (they know nothing of tensors).

The rules are the seed's: the model answers inside the last ``<answer>…</answer>`` pair, the dataset's
answer follows ``####``; correctness pays 2.0 for an exact match and 1.5 for equal single numbers,
format pays 0.2 for each of the four tags present.
"""

from __future__ import annotations

import re
from typing import Any

from grpo_lightning.builtin.answer_format import TAGS, extract_model_answer  # noqa: F401 (re-exported for callers)

# A signed integer or decimal; the seed's pattern, kept as is (it reads "1,000" as two numbers).
_NUMBER = re.compile(r"-?\d*\.?\d+")
# The last number of a text, after "$" and "%" are removed: at the end, after a space, "=" or the start.
_LAST_NUMBER = re.compile(r"(?:^|\s|=)\s*(-?\d*\.?\d+)\s*$")
FORMAT_TAGS = TAGS  # the tags the format reward counts: those the system prompt asks for


def extract_dataset_answer(text: str) -> str | None:
    """The text after ``####``, stripped; ``None`` for a record that has no ``####``."""
    if "####" not in text:
        return None
    return text.split("####")[1].strip()


def single_number(text: str | None) -> float | None:
    """The number of a text that holds exactly one number, else ``None``."""
    numbers = _NUMBER.findall(str(text))
    return float(numbers[0]) if len(numbers) == 1 else None


def last_number(text: str | None) -> float | None:
    """The number a text ends with (``$`` and ``%`` ignored), else ``None``."""
    match = _LAST_NUMBER.search(str(text).replace("$", "").replace("%", ""))
    return float(match.group(1)) if match else None


def correctness_reward(completion: str, expected: str | None) -> float:
    """2.0 for the exact answer, 1.5 when both hold one number and the numbers are equal, else 0.0."""
    predicted = extract_model_answer(completion)
    if predicted is not None and predicted == expected:
        return 2.0
    p, e = single_number(predicted), single_number(expected)
    return 1.5 if p is not None and e is not None and p == e else 0.0


def format_reward(completion: str) -> float:
    """0.2 for each of ``<reasoning>``, ``</reasoning>``, ``<answer>``, ``</answer>`` present anywhere."""
    return 0.2 * sum(tag in completion for tag in FORMAT_TAGS)


def combined_reward(completion: str, expected: str | None) -> float:
    """Correctness plus format, in [0, 2.8]."""
    return correctness_reward(completion, expected) + format_reward(completion)


def is_correct(completion: str, expected: str | None) -> bool:
    """The seed's evaluation match: exact string, else single-number equality, else last-number equality."""
    predicted = extract_model_answer(completion)
    if predicted is not None and predicted == expected:
        return True
    for number in (single_number, last_number):
        p, e = number(predicted), number(expected)
        if p is not None and e is not None and p == e:
            return True
    return False


# The seed's two rewards in TRL's convention. Their names are what the logs show: reward/correctness, reward/format.
def correctness(prompts: list[str], completions: list[str], expected: list[str | None], **columns: Any) -> list[float]:
    """2.0 for the exact answer, 1.5 for the same single number, else 0 (``expected``: the dataset's final answer)."""
    return [correctness_reward(c, e) for c, e in zip(completions, expected)]


def format(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:  # noqa: A001 (its log name)
    """0.2 for each of the four format tags present."""
    return [format_reward(c) for c in completions]
