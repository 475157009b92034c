"""The answer format the model is asked for, in one place: the tags, the system prompt, writing and reading.

The seed asks for ``<reasoning>…</reasoning>`` then ``<answer>…</answer>``. The rewards read completions
with :func:`extract_model_answer`, the data builds prompts with :func:`build_prompt`, the built-in task and
the warm-up write target completions with :func:`format_completion`, and the tiny models make the tags
single tokens from :data:`TAGS`: changing the format here changes it everywhere.
"""

from __future__ import annotations

from typing import Any

REASONING_START, REASONING_END = "<reasoning>", "</reasoning>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
TAGS = (REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)
PLACEHOLDER = "..."  # what the system prompt shows in place of reasoning and answer

# The seed's system prompt, byte for byte (leading and trailing newline included).
SYSTEM_PROMPT = f"""
Respond in the following format:

{REASONING_START}
{PLACEHOLDER}
{REASONING_END}
{ANSWER_START}
{PLACEHOLDER}
{ANSWER_END}
"""


def build_prompt(question: str, tokenizer: Any = None) -> str:
    """The seed's prompt: system prompt and question, each stripped, joined by one newline.

    With a tokenizer, its chat template wraps the same two parts as system and user turns instead.
    """
    if tokenizer is None:
        return SYSTEM_PROMPT.strip() + "\n" + question.strip()
    messages = [{"role": "system", "content": SYSTEM_PROMPT.strip()}, {"role": "user", "content": question.strip()}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_completion(reasoning: str, answer: str) -> str:
    """A completion in the asked-for format: ``<reasoning>\\nR\\n</reasoning>\\n<answer>\\nA\\n</answer>``."""
    return f"{REASONING_START}\n{reasoning.strip()}\n{REASONING_END}\n{ANSWER_START}\n{answer.strip()}\n{ANSWER_END}"


def extract_model_answer(text: str) -> str | None:
    """The text after the last ``<answer>`` up to the following ``</answer>``, stripped.

    Missing tags give ``None``; so does the literal ``...`` that the system prompt shows as a placeholder.
    """
    parts = text.split(ANSWER_START)
    if len(parts) < 2 or ANSWER_END not in parts[-1]:
        return None
    answer = parts[-1].split(ANSWER_END)[0].strip()
    return None if answer == PLACEHOLDER else answer
