"""The default rollout engine (:class:`GenerateEngine`): ``generate`` on the policy, in the mode and with the
kernels that decoding wants.

Two traps shape this file. Sampling runs in eval mode with the KV cache on and gradient checkpointing
paused: a checkpointed decoder in train mode drops the cache while ``generate`` feeds one token per step,
so samples would not be conditioned on the prompt. And the loss assumes that tokens were drawn from
softmax(logits / T): by default sampling ignores the model's own generation config (top-k, top-p,
repetition penalty).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList

from grpo_lightning.core.types import Rollout
from grpo_lightning.engines.base import RolloutEngine, SamplingCall, build_rollout
from grpo_lightning.fast.allocator import heap_kept
from grpo_lightning.fast.kernels import onednn_linears
from grpo_lightning.fast.sampler import InverseCDFSampler
from grpo_lightning.hf.models import causal_lm, eos_token_ids, is_checkpointing, set_checkpointing
from grpo_lightning.hf.passes import as_passes, can_share_prompt


@contextmanager
def sampling_mode(model: Any, rows: int = 1, kernels: bool = True) -> Iterator[None]:
    """Eval mode with checkpointing paused for the duration; the previous state is restored after.

    On the CPU, fp32 linear layers run through oneDNN meanwhile (:func:`~grpo_lightning.fast.kernels.onednn_linears`),
    the LM head's and the trainable weights reordered for ``rows`` (the rows decoded at once): the bulk of a
    decoding step. Sampling runs without gradients, which that needs. ``kernels=False`` leaves that to the
    caller (a root's forward).
    """
    was_training, checkpointing = model.training, is_checkpointing(model)
    if checkpointing:
        set_checkpointing(model, False)
    model.eval()
    try:
        with onednn_linears(causal_lm(model), packed_rows=rows) if kernels else contextlib.nullcontext():
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
    fast: bool = True,
) -> Rollout:
    """Sample ``num_generations`` completions for each prompt with ``generate`` (KV cache on, eval mode).

    By default tokens are drawn from softmax(logits / ``temperature``) exactly, whatever the model's
    generation config declares; ``use_model_generation_config`` samples with that config instead (the
    seed's behaviour: Qwen2.5-Instruct's top-k, top-p and repetition penalty). ``generation_kwargs`` are
    passed on last (e.g. ``{"do_sample": False}``, ``{"min_new_tokens": 64}``).
    ``rows_per_call`` bounds the rows of one ``generate`` call (memory).
    With ``fast``, plain softmax(logits / T) sampling runs through :class:`InverseCDFSampler`, the fp32 CPU
    products through oneDNN, and the decoding steps' buffers stay in the heap (:func:`heap_kept`); without
    it, or with an option that reshapes the distribution (:func:`reshapes_distribution`), ``generate``
    samples itself (softmax(logits / T) all the same: its top-k and top-p are switched off) through plain
    ``nn.Linear`` layers.
    ``record_logprobs`` keeps the log-prob of each sampled token under the distribution the sampler drew
    it from (on ``generate``'s own path from its processed scores, [rows, C, V] per call: meant for checks).
    ``share_prompt`` prefills each prompt once and repeats its KV cache for its G samples.
    ``model`` is a :class:`~grpo_lightning.hf.passes.PolicyPasses` root, or a bare model (given a root of its own).
    """
    passes = as_passes(model)
    model = passes.model
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
    if fast and kwargs["do_sample"] and not use_model_generation_config and not reshapes_distribution(kwargs):
        # softmax(logits / T) exactly: drawn by our processor, which generate's greedy step then picks
        sampler = InverseCDFSampler(temperature, record=record_logprobs)
        kwargs = {**kwargs, "do_sample": False, "logits_processor": LogitsProcessorList([sampler])}
    elif kwargs["do_sample"]:  # (greedy needs none of these: they would only draw warnings)
        # top-k 0 and top-p 1 switch off transformers' own defaults (top-k 50) under the plain config
        plain = {} if use_model_generation_config else {"top_k": 0, "top_p": 1.0}
        kwargs = {"temperature": temperature, **plain, **kwargs}
    logprob_pieces: list[Tensor] = []

    def record(out: Any) -> Tensor:
        new = out.sequences[:, P:]  # [rows, C_call]
        if record_logprobs and sampler is not None:
            logprob_pieces.append(sampler.take_logprobs())
        elif record_logprobs:
            scores = torch.stack(out.scores, dim=1).float()  # [rows, C_call, V], after temperature and filters
            logprob_pieces.append(torch.log_softmax(scores, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1))
        return new

    chunks = [(prompt_ids[s : s + rows], prompt_mask[s : s + rows]) for s in range(0, N, rows)]
    # prefill all but the last prompt token once per prompt; generate reads the rest from the cache
    share = num_generations if share_prompt and P > 1 and can_share_prompt(model, num_generations) else 0
    # each new token allocates and frees a few [rows, V] fp32 buffers: on the CPU they stay in the heap meanwhile
    step_buffers = rows * causal_lm(model).get_output_embeddings().weight.shape[0] * 4 + (1 << 20)  # (+ room)
    heap = heap_kept(step_buffers) if fast and device.type == "cpu" else contextlib.nullcontext()
    with sampling_mode(model, rows, kernels=False), generation_config(model, use_model_generation_config), heap:
        pieces = passes.generate(
            chunks, share, record, inside=onednn_linears(causal_lm(model), packed_rows=rows) if fast else None,
            eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True, return_dict_in_generate=True,
            output_scores=record_logprobs and sampler is None, **kwargs,
        )
    return build_rollout(
        prompt_ids, prompt_mask, pieces, eos_ids, pad_id, tokenizer, logprob_pieces if record_logprobs else None
    )


class GenerateEngine(RolloutEngine):
    """The default engine: :func:`generate_rollout` on the policy itself.

    It samples from the very weights being trained, so nothing is pushed after an update and its recorded
    log-probs are the trainer's own: no importance-sampling correction applies.
    """

    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> Rollout:
        o = options
        return generate_rollout(
            policy, tokenizer, prompts, num_generations, max_new_tokens, o.temperature, o.rows_per_call,
            o.generation_kwargs, record_logprobs=o.record_logprobs, share_prompt=o.share_prompt,
            use_model_generation_config=o.use_model_generation_config, fast=o.fast,
        )
