"""Rollouts and what scores them: the :class:`Rollout`, completion masks, and per-token log-probs.

Sampling itself is in :mod:`grpo_lightning.sampling`. Two traps shape this file. The pad token may be the
EOS token, so a completion ends at its first EOS of any id the model declares, never where padding seems
to start. And the loss assumes that tokens were drawn from softmax(logits / T), so every log-prob pass
(reference, old policy, policy) divides the logits by T.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo_lightning.head_logprob import head_logprobs


@dataclass
class Rollout:
    """The samples of one training step, N = B*G rows, the G samples of a prompt adjacent."""

    input_ids: Tensor  # [N, P + C] left-padded prompt, then completion (right-padded)
    attention_mask: Tensor  # [N, P + C] prompt padding 0, completion through its first EOS 1
    completion_mask: Tensor  # [N, C] 1 up to and including the first EOS
    prompt_length: int  # P
    completions: list[str]  # N decoded completions, EOS and what follows removed
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    sample_logprobs: Tensor | None = None  # [N, C] log-probs seen by the sampler, when recorded
    # how the loss corrects for a sampler whose log-probs are not the trainer's (importance.ImportanceSampling)
    importance_sampling: Any = None


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every EOS id the generation config declares (Qwen declares two), plus the tokenizer's."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(declared if isinstance(declared, (list, tuple)) else [declared] if declared is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model declares no EOS token: completions could never end")
    return sorted(ids)


def completion_mask(completion_ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """1 up to and including the first EOS of each row, 0 after it; all 1 in a row without EOS.

    completion_ids: [N, C] → [N, C] int mask.
    """
    N, C = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    first_eos = torch.full((N,), C, dtype=torch.long, device=completion_ids.device)
    has_eos = is_eos.any(dim=1)
    first_eos[has_eos] = is_eos.int().argmax(dim=1)[has_eos]
    return (torch.arange(C, device=completion_ids.device).expand(N, C) <= first_eos.unsqueeze(1)).int()


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


def _chunk_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float, with_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    logits = F.linear(hidden, weight, bias).float()  # [n, C, V], one chunk of rows only
    if temperature != 1.0:
        logits = logits / temperature  # the distribution the sampler drew from
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    logp = picked - lse  # log_softmax(logits)[target] without the full log_softmax
    if not with_entropy:
        return logp
    with torch.no_grad():  # a statistic: no graph for it
        # H = −Σ p·log p = logsumexp(z) − Σ p·z, from the logits this chunk has anyway
        entropy = lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1)
    return logp, entropy


def token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 2, bias: Tensor | None = None,
    recompute: bool = True, temperature: float = 1.0, with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits / temperature)[target] for each position, ``chunk_rows`` rows at a time through the head.

    hidden: [N, C, H] hidden states that predict ``targets`` [N, C]; weight: [V, H]. Returns [N, C] float32.
    Only one chunk's [chunk_rows, C, V] logits exist at a time. With ``recompute`` the pass is
    :func:`~grpo_lightning.head_logprob.head_logprobs`, whose own backward recomputes each chunk's logits
    (one more LM-head matmul) instead of keeping all N rows' logits alive; without it the logits stay for
    the backward pass.
    ``with_entropy`` also returns each position's entropy of the full distribution, [N, C] without
    gradient, computed from each chunk's logits while they exist (one more pass over them).
    """
    if recompute:
        return head_logprobs(hidden, weight, targets, chunk_rows, bias, temperature, with_entropy)
    out, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        piece = _chunk_logprobs(h, weight, bias, t, temperature, with_entropy)
        if with_entropy:
            piece, entropy = piece
            entropies.append(entropy)
        out.append(piece)
    return (torch.cat(out), torch.cat(entropies)) if with_entropy else torch.cat(out)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them: [N, T] → [N, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_argument(module: Any) -> str:
    """The name under which ``module.forward`` (and its ``generate``) takes a KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40 / 6.0);
    earlier releases know only ``past_key_values``.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def shared_prompt_cache(
    model: Any, prompt_ids: Tensor, prompt_mask: Tensor, repeats: int, prompt_embeds: Tensor | None = None
) -> tuple[Tensor, Any]:
    """Run the decoder once over B distinct prompts [B, L]; repeat the KV cache for their ``repeats`` samples.

    Returns the prompts' last hidden states [B, L, H] and a cache of B * repeats rows. ``prompt_embeds``
    [B, L, H], when given, stand in for the decoder's own lookup of ``prompt_ids``.
    """
    tokens = {"input_ids": prompt_ids} if prompt_embeds is None else {"inputs_embeds": prompt_embeds}
    out = decoder(model)(**tokens, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask), use_cache=True)
    cache = out[cache_argument(decoder(model))]  # the output field carries the argument's name
    cache.batch_repeat_interleave(repeats)
    return out.last_hidden_state, cache


def can_share_prompt(model: Any, group: int) -> bool:
    # Checkpointed layers in train mode drop any cache handed to them: the shared prompt would be lost.
    return group > 1 and not (model.training and is_checkpointing(model))


def completion_hidden(
    model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, group: int = 1,
    embed: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The last hidden states that predict the completion tokens of ``input_ids``: [N, P + C] → [N, C, H].

    ``group`` = G when each run of G rows shares one prompt: the decoder then reads each prompt once and the
    completions attend to its repeated KV cache (exact up to float rounding). ``embed`` ([N, P + C] →
    [N, P + C, H]), when given, replaces the decoder's embedding lookup, in one call for all the ids.
    """
    P, backbone = prompt_length, decoder(model)
    positions = position_ids(attention_mask)
    embeds = None if embed is None else embed(input_ids)

    def tokens(rows: slice, cols: slice) -> dict[str, Tensor]:
        return {"input_ids": input_ids[rows, cols]} if embeds is None else {"inputs_embeds": embeds[rows, cols]}

    if can_share_prompt(model, group):
        prompt_hidden, cache = shared_prompt_cache(
            model, input_ids[::group, :P], attention_mask[::group, :P], group,
            None if embeds is None else embeds[::group, :P],
        )
        completion = backbone(
            **tokens(slice(None), slice(P, None)), attention_mask=attention_mask, position_ids=positions[:, P:],
            use_cache=True, **{cache_argument(backbone): cache},
        ).last_hidden_state  # [N, C, H]
        # the last prompt position predicts the first completion token
        return torch.cat([prompt_hidden[:, -1:].repeat_interleave(group, dim=0), completion[:, :-1]], dim=1)
    full = backbone(**tokens(slice(None), slice(None)), attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return full.last_hidden_state[:, P - 1 : -1]  # [N, C, H]: the state at t predicts token t + 1


def sequence_logprobs(
    model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, chunk_rows: int = 2, group: int = 1,
    recompute: bool = True, temperature: float = 1.0, with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs of the completion positions of ``input_ids`` under ``model``: [N, P + C] → [N, C].

    They are log softmax(logits / ``temperature``): the distribution that rollouts sampled from. Only the C
    completion positions go through the LM head (:func:`completion_hidden`; ``group`` shares prompts).
    ``with_entropy`` also returns the entropies (:func:`token_logprobs`).
    """
    hidden = completion_hidden(model, input_ids, attention_mask, prompt_length, group)
    head = causal_lm(model).get_output_embeddings()
    return token_logprobs(
        hidden, head.weight, input_ids[:, prompt_length:], chunk_rows, head.bias, recompute, temperature, with_entropy
    )


def decoder(model: Any) -> Any:
    """The decoder stack without the LM head, through any wrapper.

    ``base_model`` of the ``transformers`` model, not of ``model``: on a peft model that is the LoRA wrapper,
    whose forward adds the LM head. The adapters live inside the decoder's layers, so calling the decoder
    applies them. (Not ``get_decoder()``: transformers 4.56 returns None for Qwen2 there.)
    """
    return causal_lm(model).base_model


def causal_lm(model: Any) -> Any:
    """The ``transformers`` model itself: under a peft wrapper, its base model (the adapters stay in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_checkpointing(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5 renamed the flag."""
    model = causal_lm(model)
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def set_checkpointing(model: Any, enabled: bool) -> None:
    """Turn activation checkpointing on (non-reentrant) or off, under either transformers API."""
    model = causal_lm(model)
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
