"""Rewards and answer extraction, each expected value worked out by hand from the seed's rules."""

import pytest

from grpo_lightning.builtin.gsm8k import (
    combined_reward, correctness_reward, extract_dataset_answer, format_reward, is_correct, last_number, single_number,
)

from grpo_lightning.builtin.answer_format import extract_model_answer

FULL = "<reasoning>\n6 * 7 = 42\n</reasoning>\n<answer>\n42\n</answer>"


@pytest.mark.parametrize(
    "text, expected",
    [
        (FULL, "42"),
        ("<answer>1</answer> then <answer> 2 </answer>", "2"),  # the last <answer> wins
        ("<answer>...</answer>", None),  # the system prompt's placeholder is no answer
        ("<answer>42", None),  # unclosed
        ("42", None),  # no tags
        ("<answer>a</answer><answer>b", None),  # the last <answer> is unclosed
    ],
)
def test_extract_model_answer(text, expected):
    assert extract_model_answer(text) == expected


def test_extract_dataset_answer():
    assert extract_dataset_answer("She has 3 + 4 = 7.\n#### 7 ") == "7"
    assert extract_dataset_answer("no final answer") is None


def test_numbers():
    assert single_number("about 3.5 apples") == 3.5
    assert single_number("-12") == -12.0
    assert single_number("3 and 4") is None  # two numbers: no single number
    assert single_number(None) is None  # str(None) holds no digit
    assert last_number("total = $1,200") is None  # "200" follows a comma, not a space, "=" or the start
    assert last_number("total = $1200") == 1200.0
    assert last_number("it is 45%") == 45.0
    assert last_number("x=7") == 7.0
    assert last_number("7 apples") is None  # does not end in a number


def test_correctness_reward():
    assert correctness_reward(FULL, "42") == 2.0  # exact
    assert correctness_reward("<answer>42.0</answer>", "42") == 1.5  # same single number, not the same string
    assert correctness_reward("<answer>$42</answer>", "42") == 1.5  # "$42" holds the one number 42
    assert correctness_reward("<answer>41</answer>", "42") == 0.0
    assert correctness_reward("<answer>42 or 43</answer>", "42") == 0.0  # two numbers
    assert correctness_reward("<answer>...</answer>", "42") == 0.0
    assert correctness_reward("the answer is 42", "42") == 0.0  # no tags, no answer


def test_format_reward():
    assert format_reward(FULL) == pytest.approx(0.8)
    assert format_reward("<answer>1</answer>") == pytest.approx(0.4)
    assert format_reward("<reasoning>") == pytest.approx(0.2)
    assert format_reward("plain text") == 0.0


def test_combined_reward_range():
    assert combined_reward(FULL, "42") == pytest.approx(2.8)  # the maximum: 2.0 + 0.8
    assert combined_reward("<answer>42.0</answer>", "42") == pytest.approx(1.9)  # 1.5 + 0.4
    assert combined_reward("nothing", "42") == 0.0


def test_is_correct_three_way():
    assert is_correct(FULL, "42")  # exact
    assert is_correct("<answer>42.00</answer>", "42")  # single number
    assert is_correct("<answer>3 + 4 = 7</answer>", "7")  # last number (three numbers, ends in 7)
    assert not is_correct("<answer>7 apples, 8 pears</answer>", "7")
    assert not is_correct("7", "7")  # no <answer> tag: nothing extracted
