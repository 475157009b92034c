"""The tiny offline model: deterministic build, loads with the Auto classes, tags cheap, EOS/PAD set."""

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.builtin.answer_format import TAGS

from grpo_lightning.builtin.tiny import build, resolve_model_path

COMPLETION = "<reasoning>\n15 - 1 = 14\n</reasoning>\n<answer>\n14\n</answer>"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tiny"), seed=0)


def _digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_build_is_deterministic(built, tmp_path):
    assert _digest(build(tmp_path / "again", seed=0)) == _digest(built)


def test_loads_with_auto_classes(built):
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert model.config.model_type == "qwen2"
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) <= model.config.vocab_size


def test_tags_are_single_tokens_and_survive_decoding(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    for tag in TAGS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer(COMPLETION, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # The rewards read decoded text: the tags must stay, the EOS must go.
    assert tokenizer.decode(ids, skip_special_tokens=True) == COMPLETION
    # Hand count: 4 tags, 5 "\n" tokens, "1","5"," -"," ","1"," ="," ","1","4" and "1","4" → 20 tokens.
    assert len(ids) == 21


def test_any_text_round_trips(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    text = "Weng earns $12 an hour; 50 minutes → 0.2 × 50 = 10. Ünïcode"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_generates_and_stops_at_eos():
    """The packaged (warmed-up) tiny model ends each answer with EOS; ``generate`` stops there and pads after it."""
    from grpo_lightning.builtin.answer_format import build_prompt
    from grpo_lightning.train.data import load_records

    path = resolve_model_path("builtin:tiny-arithmetic")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == eos != pad
    prompts = [build_prompt(r["question"]) for r in load_records("task:arithmetic", "test")[:3]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=80, do_sample=False, pad_token_id=pad)
    completions = out[:, batch["input_ids"].shape[1]:]  # [3, C]
    ends = [row.tolist().index(eos) for row in completions]  # each row's first EOS (ValueError: none)
    assert max(ends) + 1 == completions.shape[1] < 80  # stopped when the last row ended, far before the limit
    for row, end in zip(completions, ends):
        assert (row[end + 1 :] == pad).all()  # nothing but padding after a row's EOS
        assert tokenizer.decode(row[:end]).endswith("</answer>")


def test_resolve_model_path():
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_path("builtin:tiny-arithmetic").endswith(str(Path("assets") / "tiny-arithmetic"))
    with pytest.raises(ValueError, match="tiny-nope"):
        resolve_model_path("builtin:tiny-nope")


def test_a_recipe_and_texts_shape_the_model(tmp_path):
    from grpo_lightning.builtin.tiny import Recipe

    recipe = Recipe(vocab_size=300, own_pad=False, vocab_multiple=1, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, bos_is_eos=False)
    path = build(tmp_path, seed=0, recipe=recipe, texts=["zebra quokka zebra quokka"] * 20)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.bos_token_id) == (32, 2, None)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # pad == eos without a PAD of its own
    assert model.config.vocab_size == len(tokenizer) <= 300 + len(TAGS)  # no rounding up with vocab_multiple 1
    # merges learnt from these texts only: the words are one token each, arithmetic's numbers are not
    assert len(tokenizer(" quokka", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("Ana has 3 cups.", add_special_tokens=False)["input_ids"]) > 5
