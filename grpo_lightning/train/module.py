"""GRPOModule: the policy, a frozen reference, and one GRPO step per ``training_step``.

A step samples G completions for each of B prompts (rollout), scores them with the reward functions
(scoring), turns rewards into group-relative advantages (a :class:`~grpo_lightning.core.types.GRPOBatch`) and
runs μ updates of the clipped, KL-penalised objective on that one rollout (manual optimization, so every
optimizer step is explicit and ``global_step`` counts them: steps × μ). Its options come in the groups of
:mod:`grpo_lightning.train.options`, which check themselves; ``fast`` picks the speed pieces or the plain path.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from grpo_lightning.core.loss import token_mean_part
from grpo_lightning.core.scoring import Scores, load_reward_funcs
from grpo_lightning.core.step import prepare_batch, score_rollout, step_metrics
from grpo_lightning.core.types import GRPOBatch, Rollout
from grpo_lightning.engines.base import RolloutEngine
from grpo_lightning.engines.generate import GenerateEngine
from grpo_lightning.fast.head_loss import FusedHead
from grpo_lightning.hf.lora import LoRA
from grpo_lightning.hf.models import build_policy
from grpo_lightning.hf.passes import PlainHead, PolicyPasses, held_root
from grpo_lightning.hf.sharding import Sharding
from grpo_lightning.train.callbacks import RandomStates, SampleText
from grpo_lightning.train.distributed import (
    gather_rows, gradient_scale, no_backward_sync, seed_this_process, sum_over_processes, synchronize,
)
from grpo_lightning.train.evaluation import EvaluationMixin
from grpo_lightning.train.guard import SkipGuard
from grpo_lightning.train.options import (
    FLAT_KEYS, Evaluation, Loss, Memory, Optimization, Sampling, check_across_groups, check_max_steps,
)
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
        sampling: How rollouts are sampled (:class:`~grpo_lightning.train.options.Sampling`).
        loss: Rewards, advantages and the clipped KL-penalised objective (:class:`~grpo_lightning.train.options.Loss`).
        optimization: μ, clipping, skipped steps, reference refreshes (:class:`~grpo_lightning.train.options.Optimization`).
        memory: Checkpointing and row chunks, which trade time for memory (:class:`~grpo_lightning.train.options.Memory`).
        evaluation: Greedy evaluation's length and ``generate`` arguments (:class:`~grpo_lightning.train.options.Evaluation`).
        fast: Run the speed pieces of :mod:`grpo_lightning.fast` where they apply: the update's loss gradient
            inside the LM-head pass with fused gated MLPs and the tied embedding's one gradient buffer,
            log-probs that recompute each chunk, oneDNN products for the fp32 CPU passes without a graph
            (sampling, reference) and the inverse-CDF sampler. Off: the plain path (:class:`PlainHead`, plain
            ``nn.Linear``, ``generate``'s own sampling). Both give the same update up to float rounding.
        optimizer: Optimizer factory; default Adam with lr 5e-6 (the seed's), fused.
        lr_scheduler: Optional scheduler factory, stepped after every optimizer step.
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
        sampling: Sampling = Sampling(),  # (frozen: one shared default is safe)
        loss: Loss = Loss(),
        optimization: Optimization = Optimization(),
        memory: Memory = Memory(),
        evaluation: Evaluation = Evaluation(),
        fast: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lora: LoRA | None = None,
        rollout: RolloutEngine | None = None,
        sharding: Sharding | None = None,
    ):
        super().__init__()
        sharding = Sharding(**sharding) if isinstance(sharding, dict) else sharding  # (`sharding: {}` in YAML)
        check_across_groups(sampling, memory, optimization, loss, lora)
        if sharding is not None and lora is not None:
            raise ValueError("model.lora cannot be combined with model.sharding: LoRA with FSDP2 is not supported yet")
        # imported now: a wrong path fails before any model loads
        self.reward_funcs = load_reward_funcs(loss.reward_funcs, loss.reward_weights)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rollout"])
        # The options themselves: under the command line the saved hyperparameters are the config's plain dicts.
        self.sampling, self.loss, self.optimization = sampling, loss, optimization
        self.memory, self.evaluation, self.fast, self.sharding = memory, evaluation, fast, sharding
        self.automatic_optimization = False
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        # sharded: the structure only, on the meta device; process 0 reads the weights in configure_model
        self.policy, self.tokenizer = build_policy(
            model_name_or_path, dtype, lora, memory.gradient_checkpointing, memory.input_require_grads,
            meta=sharding is not None,
        )
        self.reference = build_reference(self.policy, loss.beta, lora)
        self.head = FusedHead() if fast else PlainHead()  # how the passes run the LM head
        self.timings: dict[str, float] = {}
        self._loss_scale, self._grad_norm = 1.0, torch.zeros(())
        self.guard = SkipGuard(optimization.max_consecutive_skips)
        # Rollout steps (training batches) finished: what the schedules count. ``global_step`` counts optimizer
        # steps, μ per rollout step less any the guard skipped, so ``global_step // mu`` would drift.
        self.rollout_steps = 0
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
        check_max_steps(self.trainer.max_steps, self.optimization.mu)  # the command line checks it before fit too
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
        checkpoint["rollout_steps"] = self.rollout_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        flat = sorted(FLAT_KEYS.keys() & checkpoint.get("hyper_parameters", {}).keys())
        if flat and self._trainer is None:  # built by load_from_checkpoint, which drops options it does not know
            raise ValueError(
                f"the checkpoint's options are flat ({', '.join(flat[:3])}, ...), as before model.sampling and the "
                "other groups: resume it with the command line's --ckpt_path, which puts them in their groups, "
                "or build the module from nest_flat_options(hyper_parameters) (grpo_lightning.train.options)"
            )
        self.engine.update_weights(self.policy)  # the checkpoint's weights replace the ones an engine holds
        if "skip_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["skip_guard"])
        if "rollout_steps" in checkpoint:
            self.rollout_steps = int(checkpoint["rollout_steps"])

    # --- one GRPO step -------------------------------------------------------------------------------

    @property
    def passes(self) -> PolicyPasses:
        """The root through which every pass over the policy runs (:mod:`grpo_lightning.hf.passes`)."""
        return held_root(self, "_policy_passes", self.policy, self.head)

    @property
    def reference_passes(self) -> PolicyPasses | None:
        return held_root(self, "_reference_passes", self.reference, self.head)

    def _logprobs(self, root: PolicyPasses, rollout: Rollout, inside: Any = None) -> torch.Tensor:
        s = self.sampling
        return root(
            "logprobs", rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
            self.memory.logprob_chunk_rows, group=s.num_generations if s.share_prompt else 1,
            temperature=s.temperature, inside=inside,
        )

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        return reference_logprobs(
            self.reference_passes, self.passes, self.loss.beta, lambda root, inside: self._logprobs(root, rollout, inside),
            fast=self.fast,
        )

    def _refresh_reference(self, step: int) -> None:
        o = self.optimization
        refreshed = refresh_reference(self.reference, self.policy, step, o.ref_update_every)
        if refreshed and o.reset_optimizer_on_ref_update:
            self.optimizers().optimizer.state.clear()

    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        step = self.rollout_steps  # rollout steps completed before this one (skipped optimizer steps do not shift it)
        self._refresh_reference(step)
        self.timings = {}
        rollout = self._timed("sampling", self._rollout, batch)
        # a bad reward function stops the step here, before any update
        scores = score_rollout(self.reward_funcs, batch, rollout, self.sampling.num_generations)
        data = self._timed("reference", self._advantages, rollout, scores)
        stats = self._timed("update", self._update, data)
        self.engine.update_weights(self.policy)  # the next rollout samples from the updated weights
        self._log_step(data, stats)
        # for the sample-text callback: the first prompt and its first samples
        G = self.sampling.num_generations
        self.last_samples = (step, self.global_step, batch["prompt"][0], rollout.completions[: min(2, G)], scores.total[: min(2, G)])
        self.rollout_steps = step + 1

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
        loss = self.loss
        # With several processes the step is every process's rows: counts, the batch reward scale and the
        # logged metrics come from all of them (one gather), so the loss does not depend on their number.
        data = prepare_batch(
            rollout, scores, self.sampling.num_generations, loss.scale_rewards, loss.mask_truncated_completions,
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
        mu, optimizer, scheduler = self.optimization.mu, self.optimizers(), self.lr_schedulers()
        mask = data.loss_mask
        n, per = mask.shape[0], self.memory.rows_per_update or mask.shape[0]  # this process's rows, rows per chunk
        scaler = grad_scaler(self._trainer)  # fp16's GradScaler, or None
        scale, self._loss_scale = gradient_scale(self._strategy), loss_scale(scaler)
        old_logp = torch.zeros(mask.shape, device=self.device) if mu > 1 else None  # [n, C]
        totals: dict[str, torch.Tensor] = {}
        for update in range(mu):  # (no gradients here: each step ends by freeing its own)
            totals = {}
            for start in range(0, n, per):
                rows = slice(start, start + per)
                last = start + per >= n  # the chunk whose backward reduces the accumulated gradients
                with no_backward_sync(self._strategy, enabled=not last, root=self.passes):
                    logp, entropy, loss, stats = self._rows_loss(data, rows, None if update == 0 else old_logp)
                    if update == 0 and old_logp is not None:
                        old_logp[rows] = logp.detach()
                    self.manual_backward(loss if scale == 1 else loss * scale)
                stats = {"loss": loss.detach(), **stats, "entropy": token_mean_part(entropy, mask[rows], data.num_tokens)}
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0) + value
            if scaler is None:  # (a GradScaler's gradients are clipped once unscaled, in the step's hook)
                self._clip_gradients()
            # a non-finite loss or norm skips the step (a GradScaler skips its own overflows: the loss is judged)
            if not self.guard.allow_step(self.trainer, totals["loss"], None if scaler else self._grad_norm):
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
        self._grad_norm = clip_grad_norm(params, self.optimization.grad_clip, root).detach()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Under a GradScaler (16-mixed) Lightning unscales a plain optimizer's gradients just before this hook,
        # inside optimizer.step(); a fused one would unscale in its own step, after clipping: do it now (the
        # scaler records it, and the fused step does not unscale again).
        scaler = grad_scaler(self._trainer)
        if scaler is None:
            return  # the gradients were clipped before the step (:meth:`_update`)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        self._clip_gradients()

    def _rows_loss(self, data: GRPOBatch, rows: slice, old_logp: torch.Tensor | None) -> tuple:
        s, loss = self.sampling, self.loss
        return self.passes(
            "loss", data, rows, old_logp, chunk_rows=self.memory.logprob_chunk_rows,
            group=s.num_generations if s.share_prompt else 1, temperature=s.temperature, loss_scale=self._loss_scale,
            clip_eps=loss.clip_eps, beta=loss.beta, epsilon_high=loss.epsilon_high, loss_type=loss.loss_type,
            max_new_tokens=s.max_new_tokens,
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
