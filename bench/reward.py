"""The seed's combined reward (correctness + format), kept local so the TRL side needs no project install.

Both frameworks score with these exact rules, so reward time is the same small cost on each side.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d*\.?\d+")
_FORMAT_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def extract_answer(text: str) -> str | None:
    """Text after the last ``<answer>`` up to the next ``</answer>``, stripped; ``...`` counts as missing."""
    if "<answer>" not in text or "</answer>" not in text:
        return None
    tail = text.split("<answer>")[-1]
    if "</answer>" not in tail:
        return None
    answer = tail.split("</answer>")[0].strip()
    return None if answer == "..." else answer


def _single_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return float(found[0]) if len(found) == 1 else None


def correctness(completion: str, expected: str | None) -> float:
    """2.0 for an exact match, 1.5 when both hold exactly one number and the numbers agree, else 0.0."""
    answer = extract_answer(completion)
    if answer is None or expected is None:
        return 0.0
    if answer == expected:
        return 2.0
    a, e = _single_number(answer), _single_number(expected)
    return 1.5 if a is not None and e is not None and a == e else 0.0


def format_score(completion: str) -> float:
    """+0.2 for each of the four tags present anywhere."""
    return 0.2 * sum(tag in completion for tag in _FORMAT_TAGS)


def combined_reward(completion: str, expected: str | None) -> float:
    """Correctness plus format, in [0, 2.8]."""
    return correctness(completion, expected) + format_score(completion)


def trl_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL reward-function signature: the dataset's ``answer`` column arrives as a keyword list."""
    return [combined_reward(c, a) for c, a in zip(completions, answer)]
