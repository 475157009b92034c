"""A tiny offline model: a Qwen2-architecture causal LM and a byte-level BPE tokenizer made by this package.

Nothing is downloaded. The tokenizer is trained on the built-in ``arithmetic`` task's own prompts and
worked answers, so the numbers 0..33 are single tokens, and the four format tags are whole tokens
(ordinary, non-special tokens: decoding keeps them, so the rewards see them). Both the tokenizer and the
initial weights are deterministic functions of the seed. :class:`Recipe` holds what else can vary: the
tests build their smaller model here too, from other text.

    python -m grpo_lightning.builtin.tiny --out DIR [--seed 0]

writes a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(DIR)`` load. The
package ships a warmed-up copy (see ``grpo_lightning.train.warmup``); configs name it ``builtin:tiny-arithmetic``,
which :func:`resolve_model_path` turns into a path.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from grpo_lightning.builtin import BUILTIN_PREFIX
from grpo_lightning.builtin.answer_format import TAGS, build_prompt
from grpo_lightning.builtin.arithmetic import completion_text, load_task

EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 512
# Qwen2's pre-tokenizer pattern: contractions, words, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BUILTIN_MODELS = ("tiny-arithmetic",)


@dataclass(frozen=True)
class Recipe:
    """What :func:`build` makes besides its training text and seed.

    The defaults are the packaged model's (``builtin:tiny-init``, warmed up into ``builtin:tiny-arithmetic``).
    The tests build a smaller one from GSM8K text with the byte level's own split and pad == eos
    (``tests/conftest.py``); every field below is where the two differ.
    """

    vocab_size: int = VOCAB_SIZE  # the BPE's tokens, specials included; the four tags come on top
    # NFC and Qwen's split before the byte level; False: the byte level's own split and no normalizer
    qwen_split: bool = True
    own_pad: bool = True  # a PAD token of its own; False: pad == eos, as Qwen's tokenizers declare
    # left padding and no token_type_ids by default, as a decoder wants; False: the tokenizer's plain defaults
    decoder_defaults: bool = True
    vocab_multiple: int = 64  # embedding rows rounded up to a multiple of this, as real vocabularies are
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    bos_is_eos: bool = True  # the config's BOS id; False: none


ARITHMETIC = Recipe()


def corpus() -> list[str]:
    """The tokenizer's training text: every train prompt and its worked completion."""
    texts = []
    for record in load_task("arithmetic", "train"):
        texts.append(build_prompt(record["question"]))
        texts.append(completion_text(record["answer"]))
    return texts


def build_tokenizer(recipe: Recipe = ARITHMETIC, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``recipe.vocab_size`` tokens trained on ``texts`` (default :func:`corpus`).

    Byte-level means any text still encodes (unseen characters fall back to bytes); the tags are added as
    whole tokens so that emitting the format costs the model four tokens (and even an untrained model
    emits them now and then, so rewards vary).
    """
    tok = Tokenizer(models.BPE())
    if recipe.qwen_split:
        # transformers loads every qwen2-type checkpoint with Qwen2Tokenizer, which imposes Qwen's split (single
        # digits, words with one leading non-letter); training on the same split keeps the merges meaningful.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=[EOS, PAD] if recipe.own_pad else [EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() if texts is None else texts, trainer=trainer)
    # Tags match the text before NFC (normalized=False); with no normalizer the flag changes nothing, and the
    # tests' model keeps the True it was first built with.
    tok.add_tokens([AddedToken(tag, normalized=not recipe.qwen_split, special=False) for tag in TAGS])
    # a decoder takes no token_type_ids (transformers 4 sent them)
    defaults = {"padding_side": "left", "model_input_names": ["input_ids", "attention_mask"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD if recipe.own_pad else EOS,
        **(defaults if recipe.decoder_defaults else {}),
    )


def build_config(recipe: Recipe, vocab_size: int, eos_id: int, pad_id: int) -> Qwen2Config:
    """The packaged model's is about 1.0M parameters: 4 layers of width 128, grouped-query attention, tied
    embeddings.

    Small enough that sampling 64 completions of 25 tokens takes well under a second on one CPU core.
    """
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,  # GSM8K prompts in this small vocabulary run past 256 tokens
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id if recipe.bos_is_eos else None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def build(out: str | Path, seed: int = 0, recipe: Recipe = ARITHMETIC, texts: Iterable[str] | None = None) -> Path:
    """Write an untrained tiny model and its tokenizer to ``out``; same arguments, same bytes.

    ``texts`` train the tokenizer (default :func:`corpus`, the arithmetic task's prompts and answers).
    """
    out = Path(out)
    tokenizer = build_tokenizer(recipe, texts)
    # Spare embedding rows past the tokenizer's last id stay unused.
    vocab = (len(tokenizer) + recipe.vocab_multiple - 1) // recipe.vocab_multiple * recipe.vocab_multiple
    config = build_config(recipe, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    bos = {"bos_token_id": tokenizer.eos_token_id} if recipe.bos_is_eos else {}
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **bos
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def resolve_model_path(name: str) -> str:
    """``builtin:<model>`` → a directory that ``from_pretrained`` loads; any other name is returned unchanged.

    ``builtin:tiny-arithmetic`` is the packaged, warmed-up model. ``builtin:tiny-init`` is the untrained
    model, built afresh (a few seconds) into a new temporary directory: it is deterministic, so it is
    rebuilt rather than shipped.
    """
    if not name.startswith(BUILTIN_PREFIX):
        return name
    model = name[len(BUILTIN_PREFIX) :]
    if model == "tiny-init":
        return str(build(tempfile.mkdtemp(prefix="grpo-lightning-tiny-init-")))
    if model not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {model!r}; built-in models are {('tiny-init',) + BUILTIN_MODELS}")
    return str(resources.files("grpo_lightning") / "assets" / model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the untrained tiny Qwen2 model and its tokenizer.")
    parser.add_argument("--out", required=True, help="directory to write (config, weights, tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    args = parser.parse_args(argv)
    path = build(args.out, args.seed)
    n = sum(p.numel() for p in Qwen2ForCausalLM.from_pretrained(path).parameters())
    print(f"wrote {path} ({n / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
