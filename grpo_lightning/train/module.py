"""GRPOModule: the policy, a frozen reference, and one GRPO step per ``training_step``.

A step samples G completions for each of B prompts (rollout), scores them with the reward functions
(scoring), turns rewards into group-relative advantages (a :class:`~grpo_lightning.core.types.GRPOBatch`) and
runs μ updates of the clipped, KL-penalised objective on that one rollout (manual optimization, so every
optimizer step is explicit and ``global_step`` counts them: steps × μ).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from grpo_lightning.core.loss import token_mean_part
from grpo_lightning.core.scoring import DEFAULT_REWARD_FUNCS, Scores, load_reward_funcs
from grpo_lightning.core.step import prepare_batch, score_rollout, step_metrics
from grpo_lightning.core.types import GRPOBatch, Rollout
from grpo_lightning.engines.base import RolloutEngine
from grpo_lightning.engines.generate import GenerateEngine
from grpo_lightning.fast.head_loss import FusedHead
from grpo_lightning.hf.lora import LoRA
from grpo_lightning.hf.models import build_policy
from grpo_lightning.hf.passes import PolicyPasses, held_root
from grpo_lightning.hf.sharding import Sharding, gradient_sync
from grpo_lightning.train.callbacks import RandomStates, SampleText
from grpo_lightning.train.distributed import (
    gather_rows, gradient_scale, no_backward_sync, seed_this_process, sum_over_processes, synchronize,
)
from grpo_lightning.train.evaluation import EvaluationMixin
from grpo_lightning.train.guard import SkipGuard
from grpo_lightning.train.options import check_choices, check_max_steps, check_reference, check_sizes
from grpo_lightning.train.precision import clip_grad_norm, grad_scaler, loss_scale, rounding_warning
from grpo_lightning.train.preemption import at_stage_end
from grpo_lightning.train.sharding import configure_sharding
from grpo_lightning.train.reference import build_reference, reference_logprobs, refresh_reference
from grpo_lightning.engines.mixin import RolloutMixin


class GRPOModule(RolloutMixin, EvaluationMixin, L.LightningModule):
    """GRPO fine-tuning of a causal language model.

    Args:
        model_name_or_path: Hub id or local directory of the policy (and tokenizer).
        dtype: Weights dtype when loading (``auto``, ``float32``, ``bfloat16``, ``float16``).
        num_generations: Samples per prompt (G); advantages compare samples of the same prompt.
        max_new_tokens: Longest completion sampled during training.
        temperature: Sampling temperature T of the rollouts; every log-prob pass scores softmax(logits / T).
        use_model_generation_config: Sample with the model's own generation config (Qwen2.5-Instruct's top-k
            20, top-p 0.8, repetition penalty), as the seed does. Off by default: tokens are drawn from
            softmax(logits / T) exactly, the distribution the ratio, the KL and the gradient assume.
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
        mu: Optimizer steps on each rollout (μ); the old policy's log-probs come from the first one.
        ref_update_every: Copy the policy into the reference every N steps (the seed's outer iterations); 0 never.
            Refused with LoRA, whose reference is the base model (see ``lora``).
        reset_optimizer_on_ref_update: Clear the optimizer state at each reference refresh, as the seed does.
        optimizer: Optimizer factory; default Adam with lr 5e-6 (the seed's), fused.
        lr_scheduler: Optional scheduler factory, stepped after every optimizer step.
        grad_clip: Clip the trainable gradients' total norm (logged before clipping as ``grad_norm``) to this;
            0 disables it.
        max_consecutive_skips: An optimizer step whose loss or gradient norm is not finite is skipped (weights,
            optimizer, scheduler and ``global_step`` unchanged); after this many in a row the run stops. 0: never.
        gradient_checkpointing: Recompute decoder activations in the backward pass (saves memory, costs time).
        input_require_grads: Make embedding outputs require grad, as the seed does for reentrant checkpointing.
        rows_per_generate: Rows per ``generate`` call while sampling; ``None`` for all B*G at once.
        rows_per_update: Rows per forward/backward in an update (gradient accumulation); ``None`` for all.
        logprob_chunk_rows: Rows passed through the LM head at a time when computing log-probs.
        logprob_recompute: Recompute each chunk's logits in the backward pass instead of keeping them
            (saves [rows, C, vocab] floats of memory, costs one more LM-head matmul).
        fused_head_loss: Take the loss's gradient inside the update's LM-head pass (no logits kept, three head
            products instead of four; :class:`~grpo_lightning.fast.head_loss.HeadLoss`); off: autograd.
        share_prompt: Read each prompt once for its G samples (sampling and log-prob passes) via a repeated
            KV cache; the training pass falls back to full sequences while gradient checkpointing is on.
        generation_kwargs: Extra ``generate`` arguments for rollouts (e.g. ``min_new_tokens: 8``); arguments that
            change the sampling distribution (top-k, top-p, ...) make the loss score a different one.
        eval_max_new_tokens: Longest completion during evaluation; ``None`` for ``max_new_tokens``.
        eval_generation_kwargs: Extra ``generate`` arguments for evaluation (greedy unless overridden).
        lora: Train LoRA adapters (``peft``) instead of all weights; ``None`` for full fine-tuning. The
            reference is then the policy with its adapters switched off, not a second copy.
        rollout: The rollout engine, a class path with ``init_args`` (:mod:`grpo_lightning.engines`, docs/vllm.md).
        sharding: Shard the policy and the reference with FSDP2 (:mod:`grpo_lightning.train.sharding`; with
            ``trainer.strategy: ModelParallelStrategy``, docs/several-gpus.md); ``None`` for one copy per process.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "auto",
        num_generations: int = 16,
        max_new_tokens: int = 500,
        temperature: float = 1.0,
        use_model_generation_config: bool = False,
        beta: float = 0.04,
        clip_eps: float = 0.1,
        epsilon_high: float | None = None,
        loss_type: str = "grpo",
        scale_rewards: str = "group",
        mask_truncated_completions: bool = False,
        reward_funcs: Sequence[str] = DEFAULT_REWARD_FUNCS,
        reward_weights: Sequence[float] | None = None,
        mu: int = 1,
        ref_update_every: int = 0,
        reset_optimizer_on_ref_update: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float = 0.1,
        max_consecutive_skips: int = 3,
        gradient_checkpointing: bool = False,
        input_require_grads: bool = False,
        rows_per_generate: int | None = None,
        rows_per_update: int | None = None,
        logprob_chunk_rows: int = 2,
        logprob_recompute: bool = True,
        fused_head_loss: bool = True,
        share_prompt: bool = True,
        generation_kwargs: dict[str, Any] | None = None,
        eval_max_new_tokens: int | None = None,
        eval_generation_kwargs: dict[str, Any] | None = None,
        lora: LoRA | None = None,
        rollout: RolloutEngine | None = None,
        sharding: Sharding | None = None,
    ):
        super().__init__()
        sharding = Sharding(**sharding) if isinstance(sharding, dict) else sharding  # (`sharding: {}` in YAML)
        check_sizes(num_generations, max_new_tokens, mu, rows_per_generate, rows_per_update, logprob_chunk_rows)
        check_choices(loss_type, scale_rewards, clip_eps, epsilon_high, temperature)
        check_reference(lora, ref_update_every, beta)
        # imported now: a wrong path fails before any model loads
        self.reward_funcs = load_reward_funcs(reward_funcs, reward_weights)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rollout", "sharding"])
        self.hparams["sharding"] = None if sharding is None else dataclasses.asdict(sharding)  # (checkpoints hold plain data)
        self.automatic_optimization = False
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        if sharding is not None and lora is not None:
            raise ValueError("model.lora cannot be combined with model.sharding: LoRA with FSDP2 is not supported yet")
        self.sharding = sharding
        # sharded: the structure only, on the meta device; process 0 reads the weights in configure_model
        self.policy, self.tokenizer = build_policy(
            model_name_or_path, dtype, lora, gradient_checkpointing, input_require_grads, meta=sharding is not None
        )
        self.reference = build_reference(self.policy, beta, lora)
        self.head = FusedHead(logprob_recompute, fused_head_loss)  # how the passes run the LM head
        self.timings: dict[str, float] = {}
        self._loss_scale, self._grad_norm = 1.0, torch.zeros(())
        self.guard = SkipGuard(max_consecutive_skips)
        self.engine = rollout if rollout is not None else GenerateEngine()

    def train(self, mode: bool = True) -> GRPOModule:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: never in train mode, whatever Lightning toggles
        return self

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:  # the seed's Adam; fused, which spares the step's parameter-sized temporaries
            optimizer = torch.optim.Adam(params, lr=5e-6, fused=True)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def on_fit_start(self) -> None:
        check_max_steps(self.trainer.max_steps, self.hparams.mu)  # the command line checks it before fit too
        # After the precision plugin has cast the weights (bf16-true does) and the optimizer exists.
        if message := rounding_warning(self.optimizers().param_groups):
            rank_zero_warn(message)

    def configure_model(self) -> None:
        configure_sharding(self)  # FSDP2 under ModelParallelStrategy; nothing for DDP or one process

    def setup(self, stage: str) -> None:
        # Before a checkpoint's random states are restored: every process samples from its own stream.
        seed_this_process(self.global_rank)

    @property
    def _strategy(self) -> Any:
        return self._trainer.strategy if self._trainer is not None else None

    def configure_callbacks(self) -> list[L.Callback]:
        # installed by the command line, and by default without it (random states: a resumed run samples
        # what the uninterrupted run would have)
        given = self.trainer.callbacks if self._trainer is not None else []
        return [c() for c in (RandomStates, SampleText) if not any(isinstance(g, c) for g in given)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skip_guard"] = self.guard.state_dict()  # the same on every process: one decision for all

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.engine.update_weights(self.policy)  # the checkpoint's weights replace the ones an engine holds
        if "skip_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["skip_guard"])

    # --- one GRPO step -------------------------------------------------------------------------------

    @property
    def passes(self) -> PolicyPasses:
        """The root through which every pass over the policy runs (:mod:`grpo_lightning.hf.passes`)."""
        return held_root(self, "_policy_passes", self.policy, self.head)

    @property
    def reference_passes(self) -> PolicyPasses | None:
        return held_root(self, "_reference_passes", self.reference, self.head)

    def _logprobs(self, root: PolicyPasses, rollout: Rollout, inside: Any = None) -> torch.Tensor:
        hp = self.hparams
        return root(
            "logprobs", rollout.input_ids, rollout.attention_mask, rollout.prompt_length, hp.logprob_chunk_rows,
            group=hp.num_generations if hp.share_prompt else 1, temperature=hp.temperature, inside=inside,
        )

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        return reference_logprobs(self.reference_passes, self.passes, self.hparams.beta, lambda root, inside: self._logprobs(root, rollout, inside))

    def _refresh_reference(self, step: int) -> None:
        refreshed = refresh_reference(self.reference, self.policy, step, self.hparams.ref_update_every)
        if refreshed and self.hparams.reset_optimizer_on_ref_update:
            self.optimizers().optimizer.state.clear()

    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        step = self.global_step // self.hparams.mu  # rollout steps completed before this one
        self._refresh_reference(step)
        self.timings = {}
        rollout = self._timed("sampling", self._rollout, batch)
        # a bad reward function stops the step here, before any update
        scores = score_rollout(self.reward_funcs, batch, rollout, self.hparams.num_generations)
        data = self._timed("reference", self._advantages, rollout, scores)
        stats = self._timed("update", self._update, data)
        self.engine.update_weights(self.policy)  # the next rollout samples from the updated weights
        self._log_step(data, stats)
        # for the sample-text callback: the first prompt and its first samples
        G = self.hparams.num_generations
        self.last_samples = (step, self.global_step, batch["prompt"][0], rollout.completions[: min(2, G)], scores.total[: min(2, G)])

    def _timed(self, name: str, stage: Any, *args: Any) -> Any:
        synchronize(self.device)  # a GPU runs behind the host: its work lands in the phase that queued it
        clock = time.perf_counter()
        out = stage(*args)
        synchronize(self.device)
        self.timings[name] = time.perf_counter() - clock
        at_stage_end(self._trainer, name)  # a boundary between stages: where a signalled run stops
        return out

    def _advantages(self, rollout: Rollout, scores: Scores) -> GRPOBatch:
        """Advantages, the loss mask and the step's counts; then the reference log-probs (skipped when β = 0)."""
        hp = self.hparams
        # With several processes the step is every process's rows: counts, the batch reward scale and the
        # logged metrics come from all of them (one gather), so the loss does not depend on their number.
        data = prepare_batch(
            rollout, scores, hp.num_generations, hp.scale_rewards, hp.mask_truncated_completions,
            gather=functools.partial(gather_rows, self._strategy),
        )
        data.ref_logp = self._reference_logprobs(rollout)
        return data

    def _update(self, data: GRPOBatch) -> dict:
        """μ optimizer steps on one rollout; rows are processed ``rows_per_update`` at a time.

        The first update runs on the weights that sampled the rollout, so its log-probs, detached, are the
        old policy's: later updates take their ratio against them (at μ = 1 the ratio is exactly 1). Each
        chunk's loss and statistics are already its part of the step's (the denominators are the step's
        counts), so they are summed: the gradient is that of the uncut step.

        With several processes each one runs its own rows; the denominators count every process's rows, so the
        parts sum over processes too. DDP and FSDP average gradients over processes, hence the loss is scaled
        by their number, and every chunk but the last skips the gradient all-reduce (one per optimizer step).
        """
        hp, optimizer, scheduler = self.hparams, self.optimizers(), self.lr_schedulers()
        mask = data.loss_mask
        n, per = mask.shape[0], hp.rows_per_update or mask.shape[0]  # this process's rows, rows per chunk
        scale, self._loss_scale = gradient_scale(self._strategy), loss_scale(grad_scaler(self._trainer))
        old_logp = torch.zeros(mask.shape, device=self.device) if hp.mu > 1 else None  # [n, C]
        totals: dict[str, torch.Tensor] = {}
        for update in range(hp.mu):  # (no gradients here: each step ends by freeing its own)
            totals = {}
            for start in range(0, n, per):
                rows = slice(start, start + per)
                last = start + per >= n  # the chunk whose backward reduces the accumulated gradients
                with no_backward_sync(self._strategy, enabled=not last), gradient_sync(self.passes, last):
                    logp, entropy, loss, stats = self._rows_loss(data, rows, None if update == 0 else old_logp)
                    if update == 0 and old_logp is not None:
                        old_logp[rows] = logp.detach()
                    self.manual_backward(loss if scale == 1 else loss * scale)
                stats = {"loss": loss.detach(), **stats, "entropy": token_mean_part(entropy, mask[rows], data.num_tokens)}
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0) + value
            scaler = grad_scaler(self._trainer)
            if scaler is None:  # (a GradScaler's gradients are clipped once unscaled, in the step's hook)
                self._clip_gradients()
            # a non-finite loss or norm skips the step (a GradScaler skips its own overflows: the loss is judged)
            if not self.guard.allow_step(self.trainer, totals["loss"], optimizer, None if scaler else self._grad_norm):
                optimizer.zero_grad()  # skipped: weights, Adam's state and step count, scheduler all unchanged
                continue
            optimizer.step()
            # Autocast may have cached bf16 casts of the weights the step just changed in place (Lightning < 2.6
            # keeps its cache on): the next update must read the new weights.
            torch.clear_autocast_cache()
            optimizer.zero_grad()  # the gradients are spent: sampling and the next forward pass reuse their memory
            if scheduler is not None:
                scheduler.step()
        # statistics of the last of the μ updates, whole step (the norm is already every process's gradients')
        return {**sum_over_processes(self._strategy, totals), "grad_norm": self._grad_norm}

    def _clip_gradients(self) -> None:
        """Clip the trainable gradients (true values, not loss-scaled) to ``grad_clip``; keep their norm before it."""
        params = [p for p in self.policy.parameters() if p.grad is not None]
        root = getattr(self._strategy, "model", None)  # the FSDP(1) root owns the flat shards' norm
        self._grad_norm = clip_grad_norm(params, self.hparams.grad_clip, root).detach()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Under a GradScaler (16-mixed) Lightning unscales a plain optimizer's gradients just before this hook,
        # inside optimizer.step(); a fused one would unscale in its own step, after clipping: do it now (the
        # scaler records it, and the fused step does not unscale again).
        scaler = grad_scaler(self._trainer)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        if scaler is not None:
            self._clip_gradients()

    def _rows_loss(self, data: GRPOBatch, rows: slice, old_logp: torch.Tensor | None) -> tuple:
        hp = self.hparams
        return self.passes(
            "loss", data, rows, old_logp, chunk_rows=hp.logprob_chunk_rows,
            group=hp.num_generations if hp.share_prompt else 1, temperature=hp.temperature, loss_scale=self._loss_scale, clip_eps=hp.clip_eps, beta=hp.beta,
            epsilon_high=hp.epsilon_high, loss_type=hp.loss_type, max_new_tokens=hp.max_new_tokens,
        )

    def _log_step(self, data: GRPOBatch, stats: dict) -> None:
        # Every value but the timings (this process's) is already the whole step's, the same on every process.
        N = data.num_sequences
        metrics = step_metrics(data)
        self.log("reward", metrics.pop("reward"), prog_bar=True, batch_size=N)
        lr = torch.tensor(self.optimizers().param_groups[0]["lr"])
        timings = {f"time/{k}": torch.tensor(v) for k, v in self.timings.items()}
        skipped = torch.tensor(float(self.guard.total))  # optimizer steps skipped so far, non-finite
        self.log_dict({**metrics, "lr": lr, **stats, **timings, "skipped_steps": skipped}, batch_size=N)
