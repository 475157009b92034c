"""GRPO (Group Relative Policy Optimization) fine-tuning of small language models on GSM8K.

GRPO is the policy-gradient method of Shao et al., "DeepSeekMath" (arXiv:2402.03300); the training
process follows Andriy Burkov's "GRPO from Scratch" (theLMbook, GRPO.py).

The layers, bottom up: :mod:`~grpo_lightning.core` (the algorithm in plain PyTorch),
:mod:`~grpo_lightning.hf` (Hugging Face plumbing and the root module of every pass),
:mod:`~grpo_lightning.fast` (CPU speedups) and :mod:`~grpo_lightning.engines` (rollout engines),
:mod:`~grpo_lightning.train` (Lightning); :mod:`~grpo_lightning.builtin` holds the built-ins.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → its module; imported on first use, so that ``import grpo_lightning`` stays light and an
# optional engine's dependencies (vLLM) load only when that engine is asked for
_EXPORTS = {
    "GRPOModule": "grpo_lightning.train.module",
    "PromptDataModule": "grpo_lightning.train.data",
    "Rollout": "grpo_lightning.core.types",
    "GRPOBatch": "grpo_lightning.core.types",
    "grpo_loss": "grpo_lightning.core.loss",
    "generate_rollout": "grpo_lightning.engines.generate",
    "PolicyPasses": "grpo_lightning.hf.passes",
    "RolloutEngine": "grpo_lightning.engines.base",
    "GenerateEngine": "grpo_lightning.engines.generate",
    "ReplayEngine": "grpo_lightning.engines.replay",
    "RecordingEngine": "grpo_lightning.engines.replay",
    "VLLMEngine": "grpo_lightning.engines.vllm",  # needs the vllm extra
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'grpo_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
