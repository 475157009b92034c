"""The GRPO algorithm in plain PyTorch: typed values, advantages, the loss, log-probs and reward scoring.

Nothing here imports Lightning, transformers or the layers above it; a step reads
:mod:`~grpo_lightning.core.step` (rollout → scores → advantages) and :mod:`~grpo_lightning.core.loss`.
"""
