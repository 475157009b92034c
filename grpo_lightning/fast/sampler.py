"""Drawing tokens from softmax(logits / T) with one uniform per row, for ``generate`` run in greedy mode."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LogitsProcessor


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
        z = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature  # (x / 1 is x)
        logp = torch.log_softmax(z, dim=-1)  # [rows, V]
        cdf = (logp.exp() if self.record else logp.exp_()).cumsum_(-1)  # in place unless logp is kept
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
