"""The rollout-engine seam: generate prompts × G → :class:`Rollout`, take the policy's weights, free memory;
and the tail every engine shares (:func:`build_rollout`).

The training step (``GRPOModule._rollout``) and evaluation (``EvaluationMixin.evaluate_batch``) sample only
through this interface. An engine that samples from the policy object itself (:class:`GenerateEngine`) needs
no weights pushed; one that keeps its own copy of the weights (vLLM) is told after each update that its copy is
stale (:meth:`RolloutEngine.update_weights`) and refreshes it before it samples again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo_lightning.core.logprobs import completion_mask
from grpo_lightning.core.types import Rollout


@dataclass
class SamplingCall:
    """The sampling options of one :meth:`RolloutEngine.generate` call (documented there)."""

    temperature: float
    generation_kwargs: dict[str, Any]
    use_model_generation_config: bool
    rows_per_call: int | None
    share_prompt: bool
    record_logprobs: bool
    fast: bool = True


class PendingRollout:
    """A rollout that may still be being sampled: :meth:`result` waits for it (once) and returns it."""

    def __init__(self, finish: Callable[[], Rollout]):
        self._finish, self._rollout = finish, None

    def result(self) -> Rollout:
        if self._rollout is None:
            self._rollout = self._finish()
        return self._rollout


class RolloutEngine(ABC):
    """Samples rollouts for the training step and for evaluation.

    An engine whose log-probs are not the trainer's sets ``Rollout.importance_sampling`` on its rollouts: the
    correction the loss applies for the gap (:class:`~grpo_lightning.core.importance.ImportanceSampling`).
    """

    run_dir: str | None = None  # the run's log directory, set by the module: where an engine writes its own logs
    timings: dict[str, float] = {}  # seconds of the engine's own stages in its last call, logged as time/<name>
    # How many updates old the weights of a training rollout may be: 0, sampled at its step; 1, sampled during
    # the previous step's update (one-step-off; :class:`~grpo_lightning.engines.mixin.RolloutMixin`).
    max_staleness: int = 0
    # Under several processes every call ends in a collective: all processes call it equally often.
    collective: bool = False

    def generate(self, *args: Any, **kwargs: Any) -> Rollout:
        """:meth:`submit`'s rollout, waited for (its arguments)."""
        return self.submit(*args, **kwargs).result()

    def submit(
        self,
        policy: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        num_generations: int,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        generation_kwargs: dict[str, Any] | None = None,
        use_model_generation_config: bool = False,
        rows_per_call: int | None = None,
        share_prompt: bool = True,
        record_logprobs: bool = False,
        fast: bool = True,
    ) -> PendingRollout:
        """``num_generations`` completions of each prompt, the G of a prompt adjacent: B prompts → N = B*G rows.

        Tokens are drawn from softmax(logits / ``temperature``) unless ``generation_kwargs`` ask otherwise
        (``{"do_sample": False}``: greedy). ``rows_per_call`` bounds the rows sampled at once (memory) and
        ``share_prompt`` reads each prompt once for its G samples, where the engine can. ``record_logprobs``
        keeps each sampled token's log-prob in ``Rollout.sample_logprobs``. ``fast`` lets an engine use the
        speed pieces of :mod:`grpo_lightning.fast` (``model.fast``); engines without any ignore it.

        An engine that samples elsewhere (a server) returns while it samples; the others return the finished rollout.
        """
        options = SamplingCall(
            temperature, dict(generation_kwargs or {}), use_model_generation_config, rows_per_call, share_prompt,
            record_logprobs, fast,
        )
        return self._submit(policy, tokenizer, list(prompts), num_generations, max_new_tokens, options)

    def _submit(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> PendingRollout:
        """What :meth:`submit` does; by default :meth:`_generate` at once."""
        rollout = self._generate(policy, tokenizer, prompts, num_generations, max_new_tokens, options)
        return PendingRollout(lambda: rollout)

    @abstractmethod
    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> Rollout:
        """What :meth:`generate` does, in each engine."""

    def update_weights(self, policy: Any) -> None:
        """The policy's weights changed (an optimizer step, a checkpoint load): sample from the new ones next."""

    def free(self) -> None:
        """Between rollouts: give back what the engine holds that the update could use."""

    def close(self) -> None:
        """The run is over (fit ended or failed): stop what the engine started, such as a server."""


def build_rollout(
    prompt_ids: Tensor, prompt_mask: Tensor, completions: Sequence[Tensor], eos_ids: Sequence[int], pad_id: int,
    tokenizer: Any, sample_logprobs: Sequence[Tensor] | None = None,
) -> Rollout:
    """The :class:`Rollout` of sampled completions: the tail every rollout engine shares.

    prompt_ids, prompt_mask: [N, P], left-padded, the G rows of a prompt adjacent. ``completions`` are row
    blocks [n_i, C_i] (or single rows [C_i]) in row order, covering the N rows, each right-padded with
    ``pad_id`` to the longest. A completion ends at its first EOS of any id in ``eos_ids`` (kept), never where
    padding seems to start: the pad token may be an EOS. ``sample_logprobs`` match ``completions`` piece by
    piece and are padded with 0.
    """
    pieces = [c if c.dim() == 2 else c.unsqueeze(0) for c in completions]
    C = max(p.shape[1] for p in pieces)
    completion_ids = torch.cat([F.pad(p, (0, C - p.shape[1]), value=pad_id) for p in pieces])  # [N, C]
    logprobs = None
    if sample_logprobs is not None:
        rows = [p if p.dim() == 2 else p.unsqueeze(0) for p in sample_logprobs]
        logprobs = torch.cat([F.pad(p.float(), (0, C - p.shape[1])) for p in rows])  # [N, C]
    mask = completion_mask(completion_ids, eos_ids)
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(completion_ids, mask)], skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion_ids.to(prompt_ids.device)], dim=1),
        attention_mask=torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1),
        completion_mask=mask,
        prompt_length=prompt_ids.shape[1],
        completions=texts,
        truncated=~is_eos.any(dim=1),
        sample_logprobs=logprobs,
    )
