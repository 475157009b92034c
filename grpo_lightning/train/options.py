"""The options of :class:`~grpo_lightning.train.module.GRPOModule`, in five groups that check themselves.

Each group is a frozen dataclass under its own config key (``model.sampling``, ``model.loss``,
``model.optimization``, ``model.memory``, ``model.evaluation``); a bad value raises one ``ValueError`` naming
its full key before any model loads. Names follow TRL's ``GRPOConfig`` where TRL has the option. Checks
that span groups (``rows_per_update`` against ``num_generations``, LoRA against ``ref_update_every``) are the
module's; :func:`check_max_steps` is the trainer's step count against ``mu``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grpo_lightning.core.advantages import REWARD_SCALES
from grpo_lightning.core.loss import LOSS_AGGREGATIONS
from grpo_lightning.core.scoring import DEFAULT_REWARD_FUNCS


def _at_least(group: str, name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"model.{group}.{name} must be at least {low}, got {value}")


@dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled (``model.sampling``).

    Args:
        num_generations: Samples per prompt (G); advantages compare samples of the same prompt.
        max_new_tokens: Longest completion sampled during training.
        temperature: Sampling temperature T of the rollouts; every log-prob pass scores softmax(logits / T).
        use_model_generation_config: Sample with the model's own generation config (Qwen2.5-Instruct's top-k
            20, top-p 0.8, repetition penalty), as the seed does. Off by default: tokens are drawn from
            softmax(logits / T) exactly, the distribution the ratio, the KL and the gradient assume.
        generation_kwargs: Extra ``generate`` arguments for rollouts (e.g. ``min_new_tokens: 8``); arguments that
            change the sampling distribution (top-k, top-p, ...) make the loss score a different one.
        rows_per_generate: Rows per ``generate`` call while sampling; ``None`` for all B*G at once.
        share_prompt: Read each prompt once for its G samples (sampling and log-prob passes) via a repeated
            KV cache; the training pass falls back to full sequences while gradient checkpointing is on.
    """

    num_generations: int = 16
    max_new_tokens: int = 500
    temperature: float = 1.0
    use_model_generation_config: bool = False
    generation_kwargs: dict[str, Any] | None = None
    rows_per_generate: int | None = None
    share_prompt: bool = True

    def __post_init__(self) -> None:
        G = self.num_generations
        if G < 2:
            raise ValueError(f"model.sampling.num_generations must be at least 2 (advantages compare samples), got {G}")
        _at_least("sampling", "max_new_tokens", self.max_new_tokens, 1)
        if not self.temperature > 0:
            raise ValueError(f"model.sampling.temperature must be positive (log-probs divide the logits by it), got {self.temperature}")
        if self.rows_per_generate is not None and (self.rows_per_generate < 1 or self.rows_per_generate % G):
            raise ValueError(
                f"model.sampling.rows_per_generate ({self.rows_per_generate}) must be a positive multiple of "
                f"model.sampling.num_generations ({G})"
            )


@dataclass(frozen=True)
class Loss:
    """What the step optimises: rewards, their advantages, the clipped KL-penalised objective (``model.loss``).

    Args:
        beta: Weight of the KL penalty against the reference; 0 drops the reference model entirely.
        clip_eps: Clipping range ε of the probability ratio (TRL's ``epsilon``): [1 − ε, 1 + ε_high].
        epsilon_high: Upper clipping bound ε_high (DAPO's clip-higher); ``None`` for ``clip_eps``.
        loss_type: How token objectives are averaged: ``grpo`` (each completion's token mean, then the mean
            over completions: the seed), ``bnpo`` and ``dapo`` (one token mean over the step),
            ``dr_grpo`` (token sum / (completions × max_new_tokens)).
        scale_rewards: Divide centred rewards by the std of their ``group`` (the seed), of the whole
            ``batch``, or ``none`` (Dr. GRPO).
        mask_truncated_completions: Completions that never reached EOS add nothing to the loss.
        reward_funcs: Import paths of reward functions, called as TRL calls them (``f(prompts,
            completions, **columns) -> list[float]``); default the seed's correctness and format rewards.
        reward_weights: One weight per reward function; ``None`` for 1 each. The reward is the weighted sum.
    """

    beta: float = 0.04
    clip_eps: float = 0.1
    epsilon_high: float | None = None
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    reward_funcs: Sequence[str] = DEFAULT_REWARD_FUNCS
    reward_weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_AGGREGATIONS:
            raise ValueError(f"model.loss.loss_type must be one of {sorted(LOSS_AGGREGATIONS)}, got {self.loss_type!r}")
        if self.scale_rewards not in REWARD_SCALES:
            raise ValueError(f"model.loss.scale_rewards must be one of {sorted(REWARD_SCALES)}, got {self.scale_rewards!r}")
        if self.clip_eps < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(
                f"model.loss.clip_eps ({self.clip_eps}) and model.loss.epsilon_high ({self.epsilon_high}) must not be negative"
            )


@dataclass(frozen=True)
class Optimization:
    """The optimizer steps on each rollout and what guards them (``model.optimization``).

    Args:
        mu: Optimizer steps on each rollout (μ); the old policy's log-probs come from the first one.
        grad_clip: Clip the trainable gradients' total norm (logged before clipping as ``grad_norm``) to this;
            0 disables it.
        max_consecutive_skips: An optimizer step whose loss or gradient norm is not finite is skipped (weights,
            optimizer, scheduler and ``global_step`` unchanged); after this many in a row the run stops. 0: never.
        ref_update_every: Copy the policy into the reference every N rollout steps (the seed's outer iterations; counted
            as training batches, so a skipped optimizer step does not shift it); 0 never.
            Refused with LoRA, whose reference is the base model.
        reset_optimizer_on_ref_update: Clear the optimizer state at each reference refresh, as the seed does.
    """

    mu: int = 1
    grad_clip: float = 0.1
    max_consecutive_skips: int = 3
    ref_update_every: int = 0
    reset_optimizer_on_ref_update: bool = False

    def __post_init__(self) -> None:
        _at_least("optimization", "mu", self.mu, 1)
        if self.grad_clip < 0:
            raise ValueError(f"model.optimization.grad_clip must be 0 (no clipping) or more, got {self.grad_clip}")
        if self.max_consecutive_skips < 0:
            raise ValueError(
                f"model.optimization.max_consecutive_skips must be 0 (never stop) or more, got {self.max_consecutive_skips}"
            )
        _at_least("optimization", "ref_update_every", self.ref_update_every, 0)


@dataclass(frozen=True)
class Memory:
    """Options that trade time for memory; the update they compute is the same (``model.memory``).

    Args:
        gradient_checkpointing: Recompute decoder activations in the backward pass (saves memory, costs time).
        input_require_grads: Make embedding outputs require grad, as the seed does for reentrant checkpointing.
        rows_per_update: Rows per forward/backward in an update (gradient accumulation); ``None`` for all. A
            multiple of ``model.sampling.num_generations``.
        logprob_chunk_rows: Rows passed through the LM head at a time when computing log-probs.
    """

    gradient_checkpointing: bool = False
    input_require_grads: bool = False
    rows_per_update: int | None = None
    logprob_chunk_rows: int = 2

    def __post_init__(self) -> None:
        _at_least("memory", "rows_per_update", self.rows_per_update, 1)
        _at_least("memory", "logprob_chunk_rows", self.logprob_chunk_rows, 1)


@dataclass(frozen=True)
class Evaluation:
    """How the policy is evaluated: the accuracy callback, the evaluations during fit, ``validate``
    (``model.evaluation``). Greedy by default: one completion per problem, ``do_sample: False``.

    Args:
        max_new_tokens: Longest completion during evaluation; ``None`` for ``model.sampling.max_new_tokens``.
        generation_kwargs: Extra ``generate`` arguments for evaluation (greedy unless overridden).
        num_samples: k > 1 samples each problem k times at ``temperature`` instead of once greedily:
            ``val/accuracy`` is then the mean accuracy of the samples (pass@1 estimated over k), and
            ``val/pass@k`` (any sample right) and ``val/maj@k`` (the most frequent answer right) are logged beside it.
        temperature: Sampling temperature of the k samples (``num_samples`` > 1 only).
    """

    max_new_tokens: int | None = None
    generation_kwargs: dict[str, Any] | None = None
    num_samples: int = 1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _at_least("evaluation", "max_new_tokens", self.max_new_tokens, 1)
        _at_least("evaluation", "num_samples", self.num_samples, 1)
        if not self.temperature > 0:
            raise ValueError(f"model.evaluation.temperature must be positive, got {self.temperature}")


GROUPS = {"sampling": Sampling, "loss": Loss, "optimization": Optimization, "memory": Memory, "evaluation": Evaluation}


def check_max_steps(max_steps: int, mu: int) -> None:
    if max_steps > 0 and max_steps % mu:
        raise ValueError(
            f"trainer.max_steps ({max_steps}) counts optimizer steps and must be a multiple of model.optimization.mu "
            f"({mu}): {max_steps // mu} rollout steps would not be whole"
        )


def check_across_groups(sampling: Sampling, memory: Memory, optimization: Optimization, loss: Loss, lora: Any) -> None:
    """The checks that span groups (each group checks its own values)."""
    G, rows = sampling.num_generations, memory.rows_per_update
    if rows is not None and rows % G:
        raise ValueError(
            f"model.memory.rows_per_update ({rows}) must be a positive multiple of model.sampling.num_generations ({G})"
        )
    if lora is not None and optimization.ref_update_every and loss.beta != 0:
        raise ValueError(
            "model.optimization.ref_update_every must be 0 with model.lora: the reference is the base model "
            "(adapters off), which never changes. To continue from a trained policy, export it (merged) and "
            "start a new run from the export."
        )
