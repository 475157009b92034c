"""Reward functions from import paths, TRL's calling convention, weighted totals and clear errors."""

import pytest

from grpo_lightning.core.scoring import (
    DEFAULT_REWARD_FUNCS, RewardFunctionError, load_reward_funcs, score,
)

FULL = "<reasoning>\n6 * 7 = 42\n</reasoning>\n<answer>\n42\n</answer>"
COMPLETIONS = [FULL, "<answer>41</answer>", "42"]
COLUMNS = {"expected": ["42", "42", "42"], "question": ["q", "q", "q"]}


# User reward functions in TRL's convention (this module is importable as "test_scoring" under pytest).
def length_penalty(prompts, completions, **kwargs):
    return [-0.01 * len(c) for c in completions]


def only_tagged(prompts, completions, **kwargs):
    return [1.0 if "<answer>" in c else None for c in completions]  # None: does not apply


def raises(prompts, completions, **kwargs):
    raise KeyError("solution")


def too_few(prompts, completions, **kwargs):
    return [1.0]


def gives_nan(prompts, completions, **kwargs):
    return [0.0, float("nan"), 0.0]


def sees_columns(prompts, completions, completion_ids, question, **kwargs):
    return [float(len(ids)) for ids in completion_ids]


def test_defaults_are_the_seeds_rewards_weighted_one_each():
    funcs = load_reward_funcs(DEFAULT_REWARD_FUNCS)
    assert list(funcs) == ["correctness", "format"] and [w for _, w in funcs.values()] == [1.0, 1.0]
    scores = score(funcs, ["p"] * 3, COMPLETIONS, **COLUMNS)
    # FULL: exact answer 2.0 + four tags 0.8; "<answer>41</answer>": wrong 0 + two tags 0.4; "42": no tags 0
    assert scores.per_function["correctness"] == [2.0, 0.0, 0.0]
    assert scores.per_function["format"] == pytest.approx([0.8, 0.4, 0.0])
    assert scores.total == pytest.approx([2.8, 0.4, 0.0])
    assert scores.means() == pytest.approx({"correctness": 2.0 / 3, "format": 0.4})


def test_weighted_sum_and_none_means_not_applicable():
    funcs = load_reward_funcs(
        ["grpo_lightning.builtin.gsm8k.correctness", "test_scoring.only_tagged", "test_scoring:length_penalty"], [2.0, 0.5, 1.0]
    )
    scores = score(funcs, ["p"] * 3, COMPLETIONS, **COLUMNS)
    # lengths 11+1+10+1+12+1+8+1+2+1+9 = 57, 8+2+9 = 19 and 2 → penalties −0.57, −0.19, −0.02; only_tagged: 1, 1, None (adds 0)
    # totals: 2·2 + 0.5·1 − 0.57 = 3.93; 0 + 0.5 − 0.19 = 0.31; 0 + 0 − 0.02 = −0.02
    assert len(FULL) == 57
    assert scores.total == pytest.approx([3.93, 0.31, -0.02])
    assert scores.per_function["only_tagged"] == [1.0, 1.0, None]
    assert scores.means()["only_tagged"] == 1.0  # the mean of the completions it applied to


def test_columns_and_completion_ids_arrive_as_keywords():
    funcs = load_reward_funcs(["test_scoring.sees_columns"])
    scores = score(funcs, ["p"] * 3, COMPLETIONS, completion_ids=[[1, 2], [3], []], **COLUMNS)
    assert scores.total == [2.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "path, message",
    [
        ("test_scoring.raises", r"reward function 'raises' raised KeyError: 'solution'"),
        ("test_scoring.too_few", r"reward function 'too_few' returned 1 values for 3 completions"),
        ("test_scoring.gives_nan", r"reward function 'gives_nan' returned nan for completion 1"),
    ],
)
def test_bad_reward_functions_get_one_clear_error(path, message):
    funcs = load_reward_funcs(["grpo_lightning.builtin.gsm8k.format", path])
    with pytest.raises(RewardFunctionError, match=message):
        score(funcs, ["p"] * 3, COMPLETIONS, **COLUMNS)


def test_loading_errors():
    with pytest.raises(ValueError, match="2 values for 1 reward functions"):
        load_reward_funcs(["grpo_lightning.builtin.gsm8k.format"], [1.0, 2.0])
    with pytest.raises(ValueError, match="two reward functions are named 'format'"):
        load_reward_funcs(["grpo_lightning.builtin.gsm8k.format", "grpo_lightning.builtin.gsm8k:format"])
    with pytest.raises(ImportError, match="cannot import 'no_such_package.f'"):
        load_reward_funcs(["no_such_package.f"])
