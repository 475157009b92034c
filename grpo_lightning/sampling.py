"""Sampling rollouts with ``generate``, in the mode and with the kernels that decoding wants.

Two traps shape this file. Sampling runs in eval mode with the KV cache on and gradient checkpointing
paused: a checkpointed decoder in train mode drops the cache while ``generate`` feeds one token per step,
so samples would not be conditioned on the prompt. And the loss assumes that tokens were drawn from
softmax(logits / T): by default sampling ignores the model's own generation config (top-k, top-p,
repetition penalty).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from grpo_lightning.kernels import onednn_linears
from grpo_lightning.rollout import (
    Rollout, build_rollout, cache_argument, can_share_prompt, causal_lm, eos_token_ids, is_checkpointing,
    set_checkpointing, shared_prompt_cache,
)


@contextmanager
def sampling_mode(model: Any, rows: int = 1) -> Iterator[None]:
    """Eval mode with checkpointing paused for the duration; the previous state is restored after.

    On the CPU, fp32 linear layers run through oneDNN meanwhile (:func:`~grpo_lightning.kernels.onednn_linears`),
    the LM head reordered for ``rows`` (the rows decoded at once): the bulk of a decoding step. Sampling
    runs without gradients, which that needs.
    """
    was_training, checkpointing = model.training, is_checkpointing(model)
    if checkpointing:
        set_checkpointing(model, False)
    model.eval()
    try:
        with onednn_linears(causal_lm(model), packed_head_rows=rows):
            yield
    finally:
        model.train(was_training)
        if checkpointing:
            set_checkpointing(model, True)


# generate's options that reshape the sampling distribution, with the values that leave it as it is
NEUTRAL = {"top_k": (None, 0), "top_p": (None, 1.0), "min_p": (None,), "typical_p": (None, 1.0),
           "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,)}


def reshapes_distribution(kwargs: dict[str, Any]) -> bool:
    """Whether ``generate`` options ask for more than softmax(logits / T): a temperature of their own, logits
    processors of their own, or a filter in :data:`NEUTRAL` set to a value that filters."""
    if "temperature" in kwargs or kwargs.get("logits_processor"):
        return True
    return any(kwargs[k] not in NEUTRAL[k] for k in NEUTRAL.keys() & kwargs.keys())


class InverseCDFSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores / T), for ``generate`` run in greedy mode.

    ``generate``'s own sampling calls ``torch.multinomial``, which draws one exponential variate per
    vocabulary entry; one uniform per row, looked up in the cumulative distribution, is much faster
    (bench/README.md has the measured times). The scores come
    back 0 at the drawn token and −inf elsewhere, so the greedy step's argmax takes it. The default
    processors (``min_new_tokens``, ...) run before this one, as they run before generate's own sampling.
    With ``record``, the log-prob of each drawn token is kept ([rows] per step; :meth:`take_logprobs`).
    """

    def __init__(self, temperature: float, record: bool = False):
        self.temperature, self.record, self.logprobs = temperature, record, []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # [rows, V]
        cdf = logp.exp().cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # [rows, 1], below the total mass
        # the first index whose cumulative mass exceeds u: tokens of probability 0 are never drawn
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        if self.record:
            self.logprobs.append(logp.gather(-1, tokens))
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)

    def take_logprobs(self) -> Tensor:
        """The recorded log-probs of the drawn tokens, [rows, steps]; the record starts again empty."""
        out, self.logprobs = torch.cat(self.logprobs, dim=-1), []
        return out


def plain_generation_config(model: Any) -> GenerationConfig:
    """The model's special-token ids and nothing else: no top-k, top-p, repetition penalty or other processor."""
    own = model.generation_config
    return GenerationConfig(bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id)


@contextmanager
def generation_config(model: Any, use_model_config: bool) -> Iterator[None]:
    """Generate with the model's own generation config, or (``use_model_config=False``) with a plain one.

    ``generate`` fills every option left unset from ``model.generation_config`` (Qwen2.5-Instruct's declares
    top-k 20, top-p 0.8 and a repetition penalty), so the plain config replaces it for the call.
    """
    lm = causal_lm(model)  # set on a peft wrapper, the config would stay behind in the base model after generate
    own = lm.generation_config
    if not use_model_config:
        lm.generation_config = plain_generation_config(lm)
    try:
        yield
    finally:
        lm.generation_config = own


@torch.no_grad()
def generate_rollout(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    rows_per_call: int | None = None,
    generation_kwargs: dict | None = None,
    record_logprobs: bool = False,
    share_prompt: bool = True,
    use_model_generation_config: bool = False,
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt with ``generate`` (KV cache on, eval mode).

    By default tokens are drawn from softmax(logits / ``temperature``) exactly, whatever the model's
    generation config declares; ``use_model_generation_config`` samples with that config instead (the
    seed's behaviour: Qwen2.5-Instruct's top-k, top-p and repetition penalty). ``generation_kwargs`` are
    passed on last (e.g. ``{"do_sample": False}``, ``{"min_new_tokens": 64}``).
    ``rows_per_call`` bounds the rows of one ``generate`` call (memory).
    Plain softmax(logits / T) sampling runs through :class:`InverseCDFSampler`; any option that reshapes the
    distribution (:func:`reshapes_distribution`) leaves the sampling to ``generate``.
    ``record_logprobs`` keeps the log-prob of each sampled token under the distribution the sampler drew
    it from (on ``generate``'s own path from its processed scores, [rows, C, V] per call: meant for checks).
    ``share_prompt`` prefills each prompt once and repeats its KV cache for its G samples.
    """
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
    prompt_ids = enc.input_ids.repeat_interleave(num_generations, dim=0)  # [N, P]
    prompt_mask = enc.attention_mask.repeat_interleave(num_generations, dim=0)
    N, P = prompt_ids.shape
    rows = rows_per_call or N
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": True, **(generation_kwargs or {})}
    sampler = None
    if kwargs["do_sample"] and not use_model_generation_config and not reshapes_distribution(kwargs):
        # softmax(logits / T) exactly: drawn by our processor, which generate's greedy step then picks
        sampler = InverseCDFSampler(temperature, record=record_logprobs)
        kwargs = {**kwargs, "do_sample": False, "logits_processor": LogitsProcessorList([sampler])}
    elif kwargs["do_sample"]:  # (greedy needs none of these: they would only draw warnings)
        # top-k 0 and top-p 1 switch off transformers' own defaults (top-k 50) under the plain config
        plain = {} if use_model_generation_config else {"top_k": 0, "top_p": 1.0}
        kwargs = {"temperature": temperature, **plain, **kwargs}
    pieces, logprob_pieces = [], []
    with sampling_mode(model, rows), generation_config(model, use_model_generation_config):
        for start in range(0, N, rows):
            ids, attn = prompt_ids[start : start + rows], prompt_mask[start : start + rows]
            extra = {}
            if share_prompt and P > 1 and can_share_prompt(model, num_generations):
                # prefill all but the last prompt token once per prompt; generate reads the rest from the cache
                extra[cache_argument(causal_lm(model))] = shared_prompt_cache(
                    model, ids[::num_generations, :-1], attn[::num_generations, :-1], num_generations
                )[1]
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                **extra,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                use_cache=True,
                return_dict_in_generate=True,
                output_scores=record_logprobs and sampler is None,
                **kwargs,
            )
            new = out.sequences[:, P:]  # [rows, C_call]
            pieces.append(new)
            if record_logprobs and sampler is not None:
                logprob_pieces.append(sampler.take_logprobs())
            elif record_logprobs:
                scores = torch.stack(out.scores, dim=1).float()  # [rows, C_call, V], after temperature and filters
                logprob_pieces.append(torch.log_softmax(scores, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1))
    return build_rollout(
        prompt_ids, prompt_mask, pieces, eos_ids, pad_id, tokenizer, logprob_pieces if record_logprobs else None
    )
