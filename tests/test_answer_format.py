"""The answer format's one home: the seed's system prompt, and completions that read back what was written."""

import ast
from pathlib import Path

from grpo_lightning.builtin import answer_format, gsm8k as rewards, tiny
from grpo_lightning.builtin.answer_format import (
    SYSTEM_PROMPT, TAGS, build_prompt, extract_model_answer, format_completion,
)
from grpo_lightning.builtin.arithmetic import completion_text


def test_system_prompt_is_the_seeds_byte_for_byte():
    assert SYSTEM_PROMPT == "\nRespond in the following format:\n\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    # prompt = stripped system prompt + "\n" + stripped question, written out
    assert build_prompt("  How many legs do 2 cats have? \n") == (
        "Respond in the following format:\n\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
        "How many legs do 2 cats have?"
    )


def test_written_completion_reads_back():
    text = format_completion(" 6 * 7 = 42 \n", " 42 ")
    assert text == "<reasoning>\n6 * 7 = 42\n</reasoning>\n<answer>\n42\n</answer>"
    assert extract_model_answer(text) == "42"
    assert rewards.format_reward(text) == 0.2 * 4  # every tag the format reward counts is written
    assert completion_text("6 * 7 = 42\n#### 42") == text  # the task's completions use the same writer


def test_no_other_module_writes_the_format_itself():
    """The tags and the system prompt are spelled out once: every other module imports them (or a copy drifts)."""
    package = Path(answer_format.__file__).parents[1]
    spelled = {}
    for path in package.rglob("*.py"):
        if path.name == "answer_format.py":
            continue
        tree = ast.parse(path.read_text())
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings may name the tags
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                if any(tag in node.value for tag in TAGS) or "Respond in the following format" in node.value:
                    spelled.setdefault(str(path.relative_to(package)), []).append(node.lineno)
    assert spelled == {}
    assert rewards.FORMAT_TAGS is TAGS and tiny.TAGS is TAGS  # the users read the one definition
