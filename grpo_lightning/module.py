"""GRPOModule: the policy, a frozen reference, and one GRPO step per ``training_step``.

A step samples G completions for each of B prompts (rollout), scores them with the reward functions
(scoring), turns rewards into group-relative advantages (a :class:`~grpo_lightning.step.GRPOBatch`) and
runs μ updates of the clipped, KL-penalised objective on that one rollout (manual optimization, so every
optimizer step is explicit and ``global_step`` counts them: steps × μ).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from grpo_lightning.allocator import set_mmap_threshold
from grpo_lightning.distributed import (
    gather_objects, gather_rows, gradient_scale, no_backward_sync, rng_state, seed_this_process, set_rng_state,
    sum_over_processes,
)
from grpo_lightning.engines import GenerateEngine, RolloutEngine
from grpo_lightning.engines.mixin import RolloutMixin
from grpo_lightning.evaluation import EvaluationMixin
from grpo_lightning.kernels import onednn_linears
from grpo_lightning.lora import LoRA, adapters_off
from grpo_lightning.loss import token_mean_part
from grpo_lightning.models import build_policy, frozen_copy
from grpo_lightning.options import check_choices, check_memory_and_reference, check_sizes
from grpo_lightning.precision import rounding_warning
from grpo_lightning.rollout import Rollout, causal_lm, sequence_logprobs
from grpo_lightning.scoring import DEFAULT_REWARD_FUNCS, Scores, load_reward_funcs
from grpo_lightning.step import GRPOBatch, prepare_batch, rows_loss, score_rollout, step_metrics


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
        grad_clip: Gradient-norm clipping value; 0 disables it.
        gradient_checkpointing: Recompute decoder activations in the backward pass (saves memory, costs time).
        input_require_grads: Make embedding outputs require grad, as the seed does for reentrant checkpointing.
        rows_per_generate: Rows per ``generate`` call while sampling; ``None`` for all B*G at once.
        rows_per_update: Rows per forward/backward in an update (gradient accumulation); ``None`` for all.
        logprob_chunk_rows: Rows passed through the LM head at a time when computing log-probs.
        logprob_recompute: Recompute each chunk's logits in the backward pass instead of keeping them
            (saves [rows, C, vocab] floats of memory, costs one more LM-head matmul).
        fused_head_loss: Take the loss's gradient inside the update's LM-head pass (no logits kept, three head
            products instead of four; :class:`~grpo_lightning.head_logprob.HeadLoss`); off: autograd.
        share_prompt: Read each prompt once for its G samples (sampling and log-prob passes) via a repeated
            KV cache; the training pass falls back to full sequences while gradient checkpointing is on.
        generation_kwargs: Extra ``generate`` arguments for rollouts (e.g. ``min_new_tokens: 8``); arguments that
            change the sampling distribution (top-k, top-p, ...) make the loss score a different one.
        eval_max_new_tokens: Longest completion during evaluation; ``None`` for ``max_new_tokens``.
        eval_generation_kwargs: Extra ``generate`` arguments for evaluation (greedy unless overridden).
        log_samples_every_n_steps: Log a few completions as text to TensorBoard every N steps; 0 never.
        lora: Train LoRA adapters (``peft``) instead of all weights; ``None`` for full fine-tuning. The
            reference is then the policy with its adapters switched off, not a second copy.
        rollout: The rollout engine, a class path with ``init_args`` (:mod:`grpo_lightning.engines`, docs/vllm.md).
        malloc_mmap_threshold: From ``setup`` on, glibc returns freed buffers of this many bytes or more to the
            OS instead of keeping them in its heap (lower peak memory on the CPU; the whole process, Linux with
            glibc only; see :mod:`~grpo_lightning.allocator`). ``None`` leaves malloc as it is.
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
        log_samples_every_n_steps: int = 10,
        lora: LoRA | None = None,
        rollout: RolloutEngine | None = None,
        malloc_mmap_threshold: int | None = 1 << 20,
    ):
        super().__init__()
        check_sizes(num_generations, max_new_tokens, mu, rows_per_generate, rows_per_update, logprob_chunk_rows)
        check_choices(loss_type, scale_rewards, clip_eps, epsilon_high, temperature)
        check_memory_and_reference(malloc_mmap_threshold, lora, ref_update_every, beta)
        # imported now: a wrong path fails before any model loads
        self.reward_funcs = load_reward_funcs(reward_funcs, reward_weights)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "rollout"])
        self.automatic_optimization = False
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.policy, self.tokenizer = build_policy(
            model_name_or_path, dtype, lora, gradient_checkpointing, input_require_grads
        )
        self.reference = None if beta == 0 or lora is not None else frozen_copy(self.policy)
        self.timings: dict[str, float] = {}
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
        max_steps = self.trainer.max_steps
        if max_steps > 0 and max_steps % self.hparams.mu:
            raise ValueError(
                f"trainer.max_steps ({max_steps}) counts optimizer steps and must be a multiple of model.mu "
                f"({self.hparams.mu}): {max_steps // self.hparams.mu} rollout steps would not be whole"
            )
        # After the precision plugin has cast the weights (bf16-true does) and the optimizer exists.
        message = rounding_warning(self.optimizers().param_groups)
        if message:
            rank_zero_warn(message)

    def setup(self, stage: str) -> None:
        # Before a checkpoint's random states are restored: every process samples from its own stream.
        seed_this_process(self.global_rank)
        if self.hparams.malloc_mmap_threshold is not None:
            set_mmap_threshold(self.hparams.malloc_mmap_threshold)

    @property
    def _strategy(self) -> Any:
        return self._trainer.strategy if self._trainer is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Sampling draws from the global generators: keep their state so a resumed run samples what the
        # uninterrupted run would have. Every process samples its own prompts with its own state, so the
        # checkpoint holds one state per process (every process runs this hook; the saving one writes the file).
        checkpoint["rng_states"] = gather_objects(self._strategy, rng_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.engine.update_weights(self.policy)  # the checkpoint's weights replace the ones an engine holds
        states = checkpoint.get("rng_states")
        if states is None:
            return
        states = [states] if isinstance(states, dict) else states  # a checkpoint of one process, older layout
        rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        if len(states) != world:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} processes, this run has {world}: "
                "sampling will not repeat what the stopped run would have drawn"
            )
        if rank < len(states):
            set_rng_state(states[rank])

    # --- one GRPO step -------------------------------------------------------------------------------

    def _logprobs(self, model: Any, rollout: Rollout, rows: slice = slice(None), with_entropy: bool = False) -> Any:
        hp = self.hparams
        return sequence_logprobs(
            model, rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_length,
            hp.logprob_chunk_rows, group=hp.num_generations if hp.share_prompt else 1, recompute=hp.logprob_recompute,
            temperature=hp.temperature, with_entropy=with_entropy,
        )

    @torch.no_grad()
    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        if self.hparams.beta == 0:
            return None
        # no graph here: the layers' products can run through oneDNN (grpo_lightning.kernels)
        if self.reference is not None:
            with onednn_linears(self.reference):
                return self._logprobs(self.reference, rollout)
        with adapters_off(self.policy), onednn_linears(causal_lm(self.policy)):  # LoRA: the base model is the reference
            return self._logprobs(self.policy, rollout)

    def _refresh_reference(self, step: int) -> None:
        every = self.hparams.ref_update_every
        if self.reference is None or not every or step == 0 or step % every:
            return
        self.reference.load_state_dict(self.policy.state_dict())
        if self.hparams.reset_optimizer_on_ref_update:
            self.optimizers().optimizer.state.clear()

    def training_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        step = self.global_step // self.hparams.mu  # rollout steps completed before this one
        self._refresh_reference(step)
        self.timings = {}
        rollout = self._timed("sampling", self._rollout, batch)
        # a bad reward function stops the step here, before any update
        scores = score_rollout(self.reward_funcs, batch, rollout, self.hparams.num_generations)
        data = self._timed("reference", self._advantages, rollout, scores)
        # The old policy's log-probs need no pass of their own: they are the first update's, detached.
        self.timings["old_policy"] = 0.0
        stats = self._timed("update", self._update, data)
        self.engine.update_weights(self.policy)  # the next rollout samples from the updated weights
        self._log_step(data, stats)
        self._log_samples(step, batch, rollout, scores.total)

    def _timed(self, name: str, stage: Any, *args: Any) -> Any:
        clock = time.perf_counter()
        out = stage(*args)
        self.timings[name] = time.perf_counter() - clock
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
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        mask = data.loss_mask
        n = mask.shape[0]  # this process's rows
        per = hp.rows_per_update or n
        scale = gradient_scale(self._strategy)
        old_logp = torch.zeros(mask.shape, device=self.device) if hp.mu > 1 else None  # [n, C]
        totals: dict[str, torch.Tensor] = {}
        for update in range(hp.mu):  # (no gradients here: each step ends by freeing its own)
            totals = {}
            for start in range(0, n, per):
                rows = slice(start, start + per)
                with no_backward_sync(self._strategy, enabled=start + per < n):
                    logp, entropy, loss, stats = self._rows_loss(data, rows, None if update == 0 else old_logp)
                    if update == 0 and old_logp is not None:
                        old_logp[rows] = logp.detach()
                    self.manual_backward(loss if scale == 1 else loss * scale)
                stats = {"loss": loss.detach(), **stats, "entropy": token_mean_part(entropy, mask[rows], data.num_tokens)}
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0) + value
            if hp.grad_clip:
                self.clip_gradients(optimizer, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad()  # the gradients are spent: sampling and the next forward pass reuse their memory
            if scheduler is not None:
                scheduler.step()
        return sum_over_processes(self._strategy, totals)  # statistics of the last of the μ updates, whole step

    def _rows_loss(self, data: GRPOBatch, rows: slice, old_logp: torch.Tensor | None) -> tuple:
        hp = self.hparams
        return rows_loss(
            self.policy, data, rows, old_logp, fused=hp.fused_head_loss, chunk_rows=hp.logprob_chunk_rows,
            group=hp.num_generations if hp.share_prompt else 1, recompute=hp.logprob_recompute,
            temperature=hp.temperature, clip_eps=hp.clip_eps, beta=hp.beta, epsilon_high=hp.epsilon_high,
            loss_type=hp.loss_type, max_new_tokens=hp.max_new_tokens,
        )

    def _log_step(self, data: GRPOBatch, stats: dict) -> None:
        # Every value but the timings (this process's) is already the whole step's, the same on every process.
        N = data.num_sequences
        metrics = step_metrics(data)
        self.log("reward", metrics.pop("reward"), prog_bar=True, batch_size=N)
        lr = torch.tensor(self.optimizers().param_groups[0]["lr"])
        timings = {f"time/{k}": torch.tensor(v) for k, v in self.timings.items()}
        self.log_dict({**metrics, "lr": lr, **stats, **timings}, batch_size=N)

    def _log_samples(self, step: int, batch: dict, rollout: Rollout, rewards: list[float]) -> None:
        every = self.hparams.log_samples_every_n_steps
        experiment = getattr(self.logger, "experiment", None)
        if not every or step % every or not hasattr(experiment, "add_text"):
            return
        G = self.hparams.num_generations
        text = "\n\n".join(
            f"**prompt**\n\n```\n{batch['prompt'][0]}\n```\n\n**sample {i}, reward {rewards[i]:.2f}**\n\n```\n{rollout.completions[i]}\n```"
            for i in range(min(2, G))
        )
        experiment.add_text("samples", text, global_step=self.global_step)
