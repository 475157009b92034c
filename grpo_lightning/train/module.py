"""GRPOModule: the policy, a frozen reference, and one GRPO step per ``training_step``.

A step samples G completions for each of B prompts (rollout), scores them with the reward functions
(scoring), turns rewards into group-relative advantages (a :class:`~grpo_lightning.core.types.GRPOBatch`) and
runs μ updates of the clipped, KL-penalised objective on that one rollout (:func:`~grpo_lightning.train.update.grpo_update`;
manual optimization, so every optimizer step is explicit and ``global_step`` counts them: steps × μ). Its
options come in the groups of :mod:`grpo_lightning.train.options`, which check themselves; ``fast`` picks the
CPU speed pieces or the plain layers.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from grpo_lightning.core.scoring import Scores, load_reward_funcs
from grpo_lightning.core.step import prepare_batch, score_rollout, step_metrics
from grpo_lightning.core.types import GRPOBatch, Rollout
from grpo_lightning.engines.base import RolloutEngine
from grpo_lightning.engines.generate import GenerateEngine
from grpo_lightning.fast.head_loss import MemorySafeHead
from grpo_lightning.hf.lora import LoRA
from grpo_lightning.hf.models import build_policy
from grpo_lightning.hf.passes import PolicyPasses, held_root
from grpo_lightning.hf.sharding import Sharding
from grpo_lightning.train.callbacks import RandomStates, SampleText
from grpo_lightning.train.checkpoints import allow_checkpoint_classes
from grpo_lightning.train.distributed import gather_objects, gather_rows, seed_this_process, synchronize
from grpo_lightning.train.evaluation import EvaluationMixin
from grpo_lightning.train.guard import SkipGuard
from grpo_lightning.train.options import (
    Evaluation, Loss, Memory, Optimization, Sampling, check_across_groups, check_max_steps,
)
from grpo_lightning.train.precision import clip_grad_norm, grad_scaler, rounding_warning
from grpo_lightning.train.preemption import at_stage_end, checkpoint_path
from grpo_lightning.train.model_parallel import configure_sharding
from grpo_lightning.train.reference import build_reference, reference_logprobs, refresh_reference
from grpo_lightning.train.update import UpdateResult, grpo_update
from grpo_lightning.engines.mixin import RolloutMixin


class GRPOModule(RolloutMixin, EvaluationMixin, L.LightningModule):
    """GRPO fine-tuning of a causal language model.

    Args:
        model_name_or_path: Hub id or local directory of the policy (and tokenizer).
        dtype: Weights dtype when loading (``auto``, ``float32``, ``bfloat16``, ``float16``).
        attn_implementation: transformers' attention: ``sdpa``, ``eager``, ``flash_attention_2`` (needs
            flash-attn) and the others transformers lists; ``null`` for transformers' own choice (sdpa where
            available). An unknown value is refused before anything loads.
        revision: Hub revision (branch, tag or commit) of the model and its tokenizer; ``null`` for the default.
        trust_remote_code: Run the model repository's own modelling code (transformers' option); off by default.
        sampling: How rollouts are sampled (:class:`~grpo_lightning.train.options.Sampling`).
        loss: Rewards, advantages and the clipped KL-penalised objective (:class:`~grpo_lightning.train.options.Loss`).
        optimization: μ, clipping, skipped steps, reference refreshes (:class:`~grpo_lightning.train.options.Optimization`).
        memory: Checkpointing and row chunks, which trade time for memory (:class:`~grpo_lightning.train.options.Memory`).
        evaluation: Greedy evaluation's length and ``generate`` arguments (:class:`~grpo_lightning.train.options.Evaluation`).
        fast: Run the CPU speed pieces of :mod:`grpo_lightning.fast` where they apply: oneDNN products for
            the fp32 CPU passes without a graph (sampling, reference), the inverse-CDF sampler, a rollout's
            decoding buffers kept in the heap, and the update's fused gated MLPs. Off: plain ``nn.Linear``,
            ``generate``'s own sampling, the model's own MLPs. Both give the same update up to float
            rounding. Either way the LM head never holds full-vocabulary logits for all rows
            (:class:`~grpo_lightning.fast.head_loss.MemorySafeHead`).
        optimizer: Optimizer factory; default Adam with lr 5e-6 (the seed's), fused.
        lr_scheduler: Optional scheduler factory, stepped after every optimizer step.
        lora: Train LoRA adapters (``peft``) instead of all weights; ``None`` for full fine-tuning. The
            reference is then the policy with its adapters switched off, not a second copy.
        rollout: The rollout engine, a class path with ``init_args`` (:mod:`grpo_lightning.engines`, docs/vllm.md).
        sharding: Shard the policy and the reference with FSDP2 (:mod:`grpo_lightning.train.model_parallel`; with
            ``trainer.strategy: ModelParallelStrategy``, docs/several-gpus.md); ``None`` for one copy per process.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
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
        # (``loss_options``: the group beside the loss tensors, not a loss)
        self.sampling, self.loss_options, self.optimization = sampling, loss, optimization
        self.memory, self.evaluation, self.fast, self.sharding = memory, evaluation, fast, sharding
        self.automatic_optimization = False
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        # sharded: the structure only, on the meta device; process 0 reads the weights in configure_model
        self.policy, self.tokenizer = build_policy(
            model_name_or_path, dtype, lora, memory.gradient_checkpointing, memory.input_require_grads,
            meta=sharding is not None, attn_implementation=attn_implementation, revision=revision,
            trust_remote_code=trust_remote_code,
        )
        self.reference = build_reference(self.policy, loss.beta, lora)
        self.head = MemorySafeHead(fused_mlps=fast)  # how the passes run the LM head, on every device
        self.timings: dict[str, float] = {}
        self._grad_norm = torch.zeros(())
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
        allow_checkpoint_classes()  # before Lightning reads a checkpoint to resume from (weights_only)
        if self._trainer is not None:
            self.engine.run_dir = self.trainer.log_dir or self.trainer.default_root_dir

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's, with the option groups allowed for its ``weights_only`` read first."""
        allow_checkpoint_classes()
        return super().load_from_checkpoint(*args, **kwargs)

    def teardown(self, stage: str) -> None:
        self.engine.close()  # a managed vLLM server stops with the fit; engines without one do nothing

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
        checkpoint["last_evaluation"] = self.evaluation_state()
        if self.engine.max_staleness:  # one-step-off's rollout in flight, every process's
            checkpoint["rollout_in_flight"] = gather_objects(self._strategy, self.in_flight_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.engine.update_weights(self.policy)  # the checkpoint's weights replace the ones an engine holds
        if "skip_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["skip_guard"])
        if "rollout_steps" in checkpoint:
            self.rollout_steps = int(checkpoint["rollout_steps"])
        self.load_evaluation_state(checkpoint.get("last_evaluation"))
        self.load_in_flight_state(checkpoint.get("rollout_in_flight"))

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
        return root.logprobs(
            rollout.input_ids, rollout.attention_mask, rollout.prompt_length, chunk_rows=self.memory.logprob_chunk_rows,
            group=s.num_generations if s.share_prompt else 1, temperature=s.temperature, inside=inside,
        )

    def _reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        return reference_logprobs(
            self.reference_passes, self.passes, self.loss_options.beta, lambda root, inside: self._logprobs(root, rollout, inside),
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
        try:
            taken = self._timed("sampling", self._rollout, batch)
        except ConnectionError as e:  # a rollout server is gone: keep the steps done so far, before any update
            self.in_flight = None  # (one-step-off: its rollout is lost with the server)
            path = checkpoint_path(self.trainer)
            self.trainer.save_checkpoint(path)
            raise type(e)(f"{e}; checkpoint written to {path} (resume with --ckpt_path)") from e
        if taken is None:  # one-step-off's first step: its rollout is being sampled, nothing to update on yet
            return
        batch, rollout = taken  # one-step-off: the previous step's batch and rollout
        # a bad reward function stops the step here, before any update
        scores = score_rollout(self.reward_funcs, batch, rollout, self.sampling.num_generations)
        data = self._advantages(rollout, scores)
        data.ref_logp = self._timed("reference", self._reference_logprobs, rollout)  # None at β = 0
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
        """Advantages, the loss mask and the step's counts (the reference log-probs come after)."""
        loss = self.loss_options
        # With several processes the step is every process's rows: counts, the batch reward scale and the
        # logged metrics come from all of them (one gather), so the loss does not depend on their number.
        return prepare_batch(
            rollout, scores, self.sampling.num_generations, loss.scale_rewards, loss.mask_truncated_completions,
            gather=functools.partial(gather_rows, self._strategy),
        )

    def _update(self, data: GRPOBatch) -> UpdateResult:
        """μ optimizer steps on the rollout: :func:`~grpo_lightning.train.update.grpo_update`, the loop itself."""
        return grpo_update(self, data)

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
            return  # the gradients were clipped before the step (:func:`~grpo_lightning.train.update.grpo_update`)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        self._clip_gradients()

    def _log_step(self, data: GRPOBatch, update: UpdateResult) -> None:
        # Every value but the timings (this process's) is already the whole step's, the same on every process.
        N, stats = data.num_sequences, update.stats
        metrics = step_metrics(data, update.importance_ratios)
        self.log("reward", metrics.pop("reward"), prog_bar=True, batch_size=N)
        lr = torch.tensor(self.optimizers().param_groups[0]["lr"])
        timings = {f"time/{k}": torch.tensor(v) for k, v in self.timings.items()}
        skipped = torch.tensor(float(self.guard.total))  # optimizer steps skipped so far, non-finite
        if self.engine.max_staleness:  # updates between the weights that sampled the rollout and the policy's
            metrics["staleness"] = torch.tensor(float(self.staleness))
        self.log_dict({**metrics, "lr": lr, **stats, **timings, "skipped_steps": skipped}, batch_size=N)
