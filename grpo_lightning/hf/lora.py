"""LoRA adapters through ``peft`` (Hu et al., https://arxiv.org/abs/2106.09685): options, wrapping, reference, export.

With LoRA the trainable parameters are small low-rank updates W + (alpha / r)·B·A of chosen linear layers;
the base weights stay frozen. That frozen base is exactly the model GRPO's KL penalty wants as its
reference when the reference never changes, so the reference costs no memory at all: it is the policy
with its adapters switched off (``peft``'s ``disable_adapter``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every attention and MLP projection of Llama/Qwen-style decoders; embeddings and the LM head stay frozen.
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRA:
    """LoRA options (``model.lora``).

    Args:
        r: Rank of each adapter's update B·A.
        alpha: Scale numerator: the update is multiplied by alpha / r.
        dropout: Dropout on each adapter's input in train mode. 0 by default: GRPO's ratio compares the
            update's log-probs with the sampler's (eval mode), and dropout would make them differ.
        target_modules: Names of the linear layers that get adapters (matched as ``peft`` matches them,
            by the end of the module name).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: no layer would be trained")


def peft_config(options: LoRA) -> Any:
    """The ``peft.LoraConfig`` for these options (the bench hands the same one to TRL)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
        target_modules=list(options.target_modules), bias="none",
    )


def add_lora(model: Any, options: LoRA) -> Any:
    """Wrap ``model`` in a ``PeftModelForCausalLM`` whose only trainable parameters are the adapters."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft reads transformers' deprecated checkpointing flag
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated")
        return get_peft_model(model, peft_config(options))


def is_lora(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The base model, frozen, in eval mode: LoRA's reference, with no second copy of the weights.

    Eval mode as for a separate reference copy, which also keeps checkpointing and dropout out of the way.
    """
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield
    finally:
        model.train(was_training)


def merged_copy(model: Any) -> Any:
    """A plain ``transformers`` model whose weights are W + (alpha / r)·B·A; ``model`` is left as it is.

    Copies the whole model once (``merge_and_unload`` replaces layers in place, and the policy is still
    evaluated after export).
    """
    return copy.deepcopy(model).merge_and_unload()


def save_lora(model: Any, tokenizer: Any, path: Path) -> None:
    """The merged model and tokenizer in Hugging Face format in ``path``, the adapters alone in ``path/adapter``."""
    merged = merged_copy(model)
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path / "adapter")
    del merged
