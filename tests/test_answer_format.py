"""The answer format's one home: the seed's system prompt, and completions that read back what was written."""

from grpo_lightning.builtin import answer_format, gsm8k as rewards, tiny
from grpo_lightning.builtin.answer_format import (
    SYSTEM_PROMPT, TAGS, build_prompt, extract_model_answer, format_completion,
)
from grpo_lightning.builtin.arithmetic import completion_text
from grpo_lightning.train import data


def test_system_prompt_is_the_seeds_byte_for_byte():
    assert SYSTEM_PROMPT == "\nRespond in the following format:\n\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    # prompt = stripped system prompt + "\n" + stripped question
    assert build_prompt(" 2 + 2? ") == SYSTEM_PROMPT.strip() + "\n2 + 2?"


def test_written_completion_reads_back():
    text = format_completion(" 6 * 7 = 42 \n", " 42 ")
    assert text == "<reasoning>\n6 * 7 = 42\n</reasoning>\n<answer>\n42\n</answer>"
    assert extract_model_answer(text) == "42"
    assert rewards.format_reward(text) == 0.2 * 4  # every tag the format reward counts is written
    assert completion_text("6 * 7 = 42\n#### 42") == text  # the task's completions use the same writer


def test_every_user_shares_the_same_objects():
    # one definition, imported: a change to the format cannot leave a stale copy behind
    assert data.SYSTEM_PROMPT is answer_format.SYSTEM_PROMPT and data.build_prompt is build_prompt
    assert rewards.FORMAT_TAGS is TAGS and tiny.TAGS is TAGS
    assert rewards.extract_model_answer is extract_model_answer
