"""Hugging Face plumbing: loading the policy and its tokenizer, preparing it for training, and what differs
between ``transformers`` releases and peft wrappers (the decoder, checkpointing flags, the cache argument).

The reference is :mod:`grpo_lightning.train.reference`; the passes over the model are :mod:`grpo_lightning.hf.passes`."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any

import torch

from grpo_lightning.builtin import is_path
from grpo_lightning.hf.load_errors import check_directory, explain
from grpo_lightning.hf.lora import LoRA, add_lora

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_attn_implementation(value: str | None) -> None:
    """Refuse, before anything loads, an attention implementation transformers does not know or cannot run here."""
    if value is None:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if "|" not in k)]
    if value not in known:
        raise ValueError(f"model.attn_implementation must be one of {known} or null (transformers' choice), got {value!r}")
    if value.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(f"model.attn_implementation {value!r} needs the flash-attn package, which is not installed: "
                         "install it, or use 'sdpa'")


def load_model_and_tokenizer(
    name_or_path: str, dtype: str = "auto", meta: bool = False, attn_implementation: str | None = None,
    revision: str | None = None, trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a local directory, a hub id or ``builtin:NAME``; one clear error if none.

    ``meta`` builds the model's structure only, on the meta device (no memory, no weights read), with the
    checkpoint's generation config: a sharded run loads the weights on one process later.
    ``attn_implementation``, ``revision`` and ``trust_remote_code`` are passed on as transformers names them
    (TRL's ``model_init_kwargs``); the tokenizer is read at the same revision.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from grpo_lightning.builtin.tiny import resolve_model_path

    name_or_path = resolve_model_path(name_or_path)  # builtin:NAME → the packaged model's directory
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_attn_implementation(attn_implementation)
    source = {"revision": revision, "trust_remote_code": trust_remote_code}
    options = {**source, **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    if is_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model path {name_or_path} does not exist")
    if Path(name_or_path).expanduser().is_dir():
        check_directory(Path(name_or_path).expanduser(), trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **source)
        if not meta:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], **options)
        else:
            config = AutoConfig.from_pretrained(name_or_path, **source)
            extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **extra)
            saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            model.to(saved if dtype == "auto" else DTYPES[dtype])
            with contextlib.suppress(OSError):  # (a model without generation_config.json keeps the derived one)
                model.generation_config = GenerationConfig.from_pretrained(name_or_path, revision=revision)
    except Exception as e:
        known = explain(name_or_path, e)
        if known is not None:
            raise known from e
        if isinstance(e, OSError):
            raise FileNotFoundError(f"could not load model '{name_or_path}': {e}") from e
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # the seed's choice; completion masks never rely on padding
    return model, tokenizer


def build_policy(
    name_or_path: str, dtype: str, lora: LoRA | None, gradient_checkpointing: bool, input_require_grads: bool,
    meta: bool = False, **load: Any,
) -> tuple[Any, Any]:
    """The trainable policy (wrapped with LoRA adapters when asked) in train mode, and its tokenizer; ``load``:
    :func:`load_model_and_tokenizer`'s options."""
    policy, tokenizer = load_model_and_tokenizer(name_or_path, dtype, meta, **load)
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


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every EOS id the generation config declares (Qwen declares two), plus the tokenizer's."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(declared if isinstance(declared, (list, tuple)) else [declared] if declared is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model declares no EOS token: completions could never end")
    return sorted(ids)


def cache_argument(module: Any) -> str:
    """The name under which ``module.forward`` (and its ``generate``) takes a KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40 / 6.0);
    earlier releases know only ``past_key_values``.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def decoder(model: Any) -> Any:
    """The decoder stack without the LM head, through any wrapper.

    ``base_model`` of the ``transformers`` model, not of ``model``: on a peft model that is the LoRA wrapper,
    whose forward adds the LM head. The adapters live inside the decoder's layers, so calling the decoder
    applies them. (Not ``get_decoder()``: transformers 4.56 returns None for Qwen2 there.)
    """
    return causal_lm(model).base_model


def causal_lm(model: Any) -> Any:
    """The ``transformers`` model itself: under a peft wrapper, its base model (the adapters stay in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_checkpointing(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5 renamed the flag."""
    model = causal_lm(model)
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Turn activation checkpointing on (non-reentrant) or off, under either transformers API."""
    model = causal_lm(model)
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
