"""Rollout engines: prompts × G → a :class:`~grpo_lightning.core.types.Rollout`."""
