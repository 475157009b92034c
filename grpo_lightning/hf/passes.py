"""Every pass over the policy, through one root module: :class:`PolicyPasses`.

A sharding wrapper (FSDP2's ``fully_shard``) gathers a module's weights in that module's forward hooks: a
pass that reads a weight outside them sees a shard. So the sampling prefill, ``generate``, the log-prob
passes (the reference's) and the update's loss pass (LM head, tied embedding) are the root's methods
:meth:`~PolicyPasses.prefill`, :meth:`~PolicyPasses.generate`, :meth:`~PolicyPasses.logprobs` and
:meth:`~PolicyPasses.loss`, which FSDP2 treats as forwards (:data:`PASSES`, registered by
:func:`grpo_lightning.hf.sharding.shard`); nothing else in the package touches the policy's weights during a
step. The root is not a child of the LightningModule: the policy's parameters stay listed once, under ``policy.*``.

How the LM head runs is a strategy handed to the root. :class:`PlainHead` here is the readable reference:
autograd through chunked logits (:mod:`grpo_lightning.core.logprobs`), which keeps every chunk's logits for
the backward pass. The trainer runs the memory-safe head of :mod:`grpo_lightning.fast.head_loss` on every
device; a test holds the two equal. The loss itself comes from the caller (the update,
:mod:`grpo_lightning.train.update`): this layer knows no GRPO.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import Tensor

from grpo_lightning.core.logprobs import token_logprobs
from grpo_lightning.hf.models import cache_argument, causal_lm, decoder, is_checkpointing
from grpo_lightning.hf.sharding import gathered

# The loss of rows [start, stop) of a pass's rows from their log-probs [stop - start, C]: (loss, detached stats).
# The loss must split over rows (a chunk's part of the step's loss), so that a head may run it chunk by chunk.
LossFn = Callable[[Tensor, int, int], tuple[Tensor, dict[str, Tensor]]]
PASSES = ("prefill", "generate", "logprobs", "loss")  # the root's methods that read the weights


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them: [N, T] → [N, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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


class PlainHead:
    """The LM head in plain PyTorch: chunked logits, autograd for the gradient (the readable reference)."""

    def logprobs(self, model: Any, hidden: Tensor, targets: Tensor, chunk_rows: int, temperature: float,
                 with_entropy: bool) -> Tensor | tuple[Tensor, Tensor]:
        head = causal_lm(model).get_output_embeddings()
        return token_logprobs(hidden, head.weight, targets, chunk_rows, head.bias, temperature, with_entropy)

    def loss(self, model: Any, ids: Tensor, attn: Tensor, P: int, group: int, loss_fn: LossFn, chunk_rows: int,
             temperature: float, loss_scale: float) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(loss, log-probs [n, C], entropies [n, C], stats); ``loss_scale`` is for heads that scale gradients themselves."""
        hidden = completion_hidden(model, ids, attn, P, group)
        logp, entropy = self.logprobs(model, hidden, ids[:, P:], chunk_rows, temperature, True)
        loss, stats = loss_fn(logp, 0, logp.shape[0])
        return loss, logp, entropy, stats


class PolicyPasses(torch.nn.Module):
    """The root through which every pass over ``model`` runs, one method per pass (:data:`PASSES`).

    ``inside``, when given, is a context manager entered within the pass (kernels that repack weights, say,
    or the adapters switched off), so that what it reads is read inside the root too. There is no
    ``forward``: call the pass by name.
    """

    def __init__(self, model: Any, head: PlainHead | None = None):
        super().__init__()
        self.model = model
        self.head = head or PlainHead()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"PolicyPasses has no forward: call one of its passes, {', '.join(PASSES)}")

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, repeats: int) -> tuple[Tensor, Any]:
        """:func:`shared_prompt_cache`: B prompts [B, L] read once, their KV cache repeated ``repeats`` times."""
        return shared_prompt_cache(self.model, prompt_ids, prompt_mask, repeats)

    def generate(self, chunks: list[tuple[Tensor, Tensor]], share: int, each: Callable[[Any], Any],
                 inside: ContextManager | None = None, **kwargs: Any) -> list[Any]:
        """``each(generate(...))`` for each chunk (prompt ids [n, P], mask [n, P]) of rows, in one pass.

        With ``share`` = G, each prompt's first P − 1 tokens are prefilled once for its G samples
        (:func:`shared_prompt_cache`) and ``generate`` reads them from the repeated cache.
        """
        out = []
        # sharded layers: gathered once for the rollout, not at every new token
        with inside or contextlib.nullcontext(), gathered(self):
            for ids, attn in chunks:
                extra = {}
                if share:
                    extra[cache_argument(causal_lm(self.model))] = shared_prompt_cache(
                        self.model, ids[::share, :-1], attn[::share, :-1], share
                    )[1]
                out.append(each(self.model.generate(input_ids=ids, attention_mask=attn, **extra, **kwargs)))
        return out

    def logprobs(self, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, *, chunk_rows: int = 2,
                 group: int = 1, temperature: float = 1.0, with_entropy: bool = False,
                 inside: ContextManager | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Per-token log-probs of the completion positions of ``input_ids``: [N, P + C] → [N, C].

        They are log softmax(logits / ``temperature``): the distribution that rollouts sampled from. Only the C
        completion positions go through the LM head (:func:`completion_hidden`; ``group`` shares prompts).
        """
        with inside or contextlib.nullcontext():
            hidden = completion_hidden(self.model, input_ids, attention_mask, prompt_length, group)
            return self.head.logprobs(self.model, hidden, input_ids[:, prompt_length:], chunk_rows, temperature, with_entropy)

    def loss(self, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, loss_fn: LossFn, *,
             chunk_rows: int = 2, group: int = 1, temperature: float = 1.0,
             loss_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """(``loss_fn``'s loss of these rows, their log-probs [n, C] and entropies [n, C], its summed stats).

        ``input_ids`` [n, P + C] are the rows of one chunk; the head runs ``loss_fn`` on them, in pieces of
        ``chunk_rows`` rows or whole. ``loss_scale`` is the GradScaler's factor for the coming backward pass
        (``16-mixed``), which a head that takes its gradients in the forward pass applies itself.
        """
        return self.head.loss(self.model, input_ids, attention_mask, prompt_length, group, loss_fn, chunk_rows,
                              temperature, loss_scale)


def held_root(owner: Any, name: str, model: Any, head: PlainHead | None = None) -> PolicyPasses | None:
    """The root over ``model`` that ``owner`` holds as ``name``, made when absent or stale; None without a model.

    Held outside ``owner``'s module tree (``object.__setattr__``): the weights stay listed once, under the
    model's own name (``policy.*``), and a checkpoint's keys do not change.
    """
    root = owner.__dict__.get(name)
    if model is not None and (root is None or root.model is not model):
        root = PolicyPasses(model, head)
        object.__setattr__(owner, name, root)
    return None if model is None else root


def bare_model(model: Any) -> Any:
    """The model a root runs its passes over (``model`` itself when it is no root)."""
    return model.model if isinstance(model, PolicyPasses) else model


def as_passes(model: Any) -> PolicyPasses:
    """``model`` itself when it is a root already, else a root over it (for callers holding a bare model)."""
    return model if isinstance(model, PolicyPasses) else PolicyPasses(model)


def sequence_logprobs(
    model: Any, input_ids: Tensor, attention_mask: Tensor, prompt_length: int, chunk_rows: int = 2, group: int = 1,
    temperature: float = 1.0, with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:meth:`PolicyPasses.logprobs` of ``model`` (a root, or a bare model under a plain root)."""
    return as_passes(model).logprobs(input_ids, attention_mask, prompt_length, chunk_rows=chunk_rows, group=group,
                                     temperature=temperature, with_entropy=with_entropy)
