"""Rollout engines: what samples prompts × G completions into a :class:`~grpo_lightning.rollout.Rollout`.

Every engine implements :class:`RolloutEngine` (generate, take the policy's weights, free memory) and ends with
the one shared tail :func:`~grpo_lightning.rollout.build_rollout`. The engine is chosen in the config as
``model.rollout`` (a class path with ``init_args``); the default is :class:`GenerateEngine`.
:class:`~grpo_lightning.engines.vllm.VLLMEngine` is imported only when asked for, so that importing the package
never loads vLLM.
"""

from __future__ import annotations

from typing import Any

from grpo_lightning.engines.base import RolloutEngine
from grpo_lightning.engines.generate import GenerateEngine
from grpo_lightning.engines.replay import RecordingEngine, ReplayEngine

__all__ = ["GenerateEngine", "RecordingEngine", "ReplayEngine", "RolloutEngine", "VLLMEngine"]


def __getattr__(name: str) -> Any:
    if name == "VLLMEngine":
        from grpo_lightning.engines.vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
