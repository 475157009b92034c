"""Loading the policy and its tokenizer, and preparing it for training (the reference: :mod:`grpo_lightning.reference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from grpo_lightning.lora import LoRA, add_lora
from grpo_lightning.rollout import causal_lm, set_checkpointing

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_tokenizer(name_or_path: str, dtype: str = "auto") -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local directory, a hub id or ``builtin:NAME``; one clear error if none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_lightning.tiny import resolve_model_path

    name_or_path = resolve_model_path(name_or_path)  # builtin:NAME → the packaged model's directory
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model path {name_or_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except OSError as e:
        raise FileNotFoundError(f"could not load model '{name_or_path}' (no such directory, and not on the hub): {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # the seed's choice; completion masks never rely on padding
    return model, tokenizer


def build_policy(
    name_or_path: str, dtype: str, lora: LoRA | None, gradient_checkpointing: bool, input_require_grads: bool
) -> tuple[Any, Any]:
    """The trainable policy (wrapped with LoRA adapters when asked) in train mode, and its tokenizer."""
    policy, tokenizer = load_model_and_tokenizer(name_or_path, dtype)
    if lora is not None:
        policy = add_lora(policy, lora)
    # from_pretrained returns eval mode and Lightning keeps the modes it finds; in eval mode gradient
    # checkpointing would silently do nothing
    policy.train()
    if gradient_checkpointing:
        set_checkpointing(policy, True)
    if input_require_grads:
        causal_lm(policy).enable_input_require_grads()
    return policy, tokenizer
