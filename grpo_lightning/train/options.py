"""The checks ``GRPOModule`` runs on its options before any model loads: one clear error per bad value."""

from __future__ import annotations

from typing import Any

from grpo_lightning.core.advantages import REWARD_SCALES
from grpo_lightning.core.loss import LOSS_AGGREGATIONS


def check_sizes(G: int, max_new: int, mu: int, rows_gen: int | None, rows_upd: int | None, chunk: int) -> None:
    if G < 2:
        raise ValueError(f"model.num_generations must be at least 2 (advantages compare samples), got {G}")
    for name, value in (("max_new_tokens", max_new), ("mu", mu), ("logprob_chunk_rows", chunk)):
        if value < 1:
            raise ValueError(f"model.{name} must be at least 1, got {value}")
    for name, value in (("rows_per_generate", rows_gen), ("rows_per_update", rows_upd)):
        if value is not None and (value < 1 or value % G):
            raise ValueError(f"model.{name} ({value}) must be a positive multiple of num_generations ({G})")


def check_choices(loss_type: str, scale_rewards: str, clip_eps: float, epsilon_high: float | None, temperature: float) -> None:
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"model.loss_type must be one of {sorted(LOSS_AGGREGATIONS)}, got {loss_type!r}")
    if scale_rewards not in REWARD_SCALES:
        raise ValueError(f"model.scale_rewards must be one of {sorted(REWARD_SCALES)}, got {scale_rewards!r}")
    if clip_eps < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"model.clip_eps ({clip_eps}) and model.epsilon_high ({epsilon_high}) must not be negative")
    if not temperature > 0:
        raise ValueError(f"model.temperature must be positive (log-probs divide the logits by it), got {temperature}")


def check_reference(lora: Any, ref_update_every: int, beta: float) -> None:
    if lora is not None and ref_update_every and beta != 0:
        raise ValueError(
            "model.ref_update_every must be 0 with model.lora: the reference is the base model (adapters "
            "off), which never changes. To continue from a trained policy, export it (merged) and start a "
            "new run from the export."
        )


def check_max_steps(max_steps: int, mu: int) -> None:
    if max_steps > 0 and max_steps % mu:
        raise ValueError(
            f"trainer.max_steps ({max_steps}) counts optimizer steps and must be a multiple of model.mu "
            f"({mu}): {max_steps // mu} rollout steps would not be whole"
        )
