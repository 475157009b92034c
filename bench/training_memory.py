"""What full fine-tuning of Qwen2.5-0.5B holds in memory: parameters, gradients, Adam state and the reference.

    python -m bench.training_memory            # the real 24-layer geometry, about 10 GB of RAM, ~1 minute
    python -m bench.training_memory --layers 2  # a quick look at the same split

Builds the Qwen2.5-0.5B-Instruct architecture (random weights: the sizes are what matter) in float32 on
the CPU, runs one forward/backward and one fused Adam step, copies it into a frozen reference as
``GRPOModule`` does, and adds up the bytes of every tensor each part holds. The same tensors in bfloat16
(``precision: bf16-true``) take half; the table shows both. Activations are left out: they depend on the
batch, the completion length and gradient checkpointing, not on the precision of the weights.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workload import build_model

GIB = 1024**3


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(num_layers: int) -> dict[str, int]:
    """Bytes held by each part of a float32 GRPO training state, measured on the real tensors."""
    policy = build_model(num_layers)
    params = [p for p in policy.parameters() if p.requires_grad]  # tied embeddings count once
    ids = torch.randint(0, 1000, (2, 16))
    policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    optimizer = torch.optim.Adam(params, lr=5e-6, fused=True)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    reference = copy.deepcopy(policy).requires_grad_(False)
    return {
        "parameters": sum(p.numel() for p in params),
        "policy weights": tensor_bytes(params),
        "gradients": tensor_bytes(p.grad for p in params),
        "Adam state (2 moments)": tensor_bytes(state),
        "reference weights": tensor_bytes(reference.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="decoder layers; Qwen2.5-0.5B has 24")
    args = parser.parse_args()
    sizes = measure(args.layers)
    n = sizes.pop("parameters")
    print(f"Qwen2.5-0.5B geometry, {args.layers} layers: {n:,} trainable parameters (tied embeddings once)")
    print(f"{'part':<26}{'fp32 weights (bf16-mixed)':>27}{'bf16 weights (bf16-true)':>26}")
    total = 0
    for part, size in sizes.items():
        total += size
        print(f"{part:<26}{size / GIB:>23.2f} GiB{size / 2 / GIB:>22.2f} GiB")
    print(f"{'total':<26}{total / GIB:>23.2f} GiB{total / 2 / GIB:>22.2f} GiB")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")


if __name__ == "__main__":
    main()
