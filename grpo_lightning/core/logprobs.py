"""Per-token log-probs in plain PyTorch: the completion mask, and log softmax(logits / T)[target] chunk by chunk.

The pad token may be the EOS token, so a completion ends at its first EOS of any id the model declares,
never where padding seems to start. The loss assumes that tokens were drawn from softmax(logits / T), so
every log-prob pass (the reference's, and the update's, whose first gives the old policy's detached)
divides the logits by T. This is the readable reference; the trainer runs the memory-safe LM head of
:mod:`grpo_lightning.fast.head_loss`, which computes the same values without keeping every chunk's logits
for the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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



def _chunk_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float, with_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    logits = F.linear(hidden, weight, bias)  # [n, C, V], one chunk of rows only
    # half-precision logits in float32 for the softmax; float64 ones (a parity test's) stay float64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
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
    temperature: float = 1.0, with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits / temperature)[target] for each position, ``chunk_rows`` rows at a time through the head.

    hidden: [N, C, H] hidden states that predict ``targets`` [N, C]; weight: [V, H]. Returns [N, C] float32 (float64 for float64 weights).
    Only one chunk's [chunk_rows, C, V] logits exist at a time in the forward pass; autograd keeps them all
    for the backward pass. :func:`~grpo_lightning.fast.head_loss.head_logprobs` computes the same values
    with a backward that recomputes each chunk's logits instead (one more LM-head matmul, far less memory).
    ``with_entropy`` also returns each position's entropy of the full distribution, [N, C] without
    gradient, computed from each chunk's logits while they exist (one more pass over them).
    """
    out, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        piece = _chunk_logprobs(h, weight, bias, t, temperature, with_entropy)
        if with_entropy:
            piece, entropy = piece
            entropies.append(entropy)
        out.append(piece)
    return (torch.cat(out), torch.cat(entropies)) if with_entropy else torch.cat(out)
