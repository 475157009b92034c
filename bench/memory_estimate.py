"""GPU memory of the seed config at the peak of each phase, computed from the tensors the code holds (not measured).

    python -m bench.memory_estimate                      # Qwen2.5-0.5B, 4 prompts x 16 samples x 500 tokens
    python -m bench.memory_estimate --measure-prompts    # the packaged GSM8K prompts' lengths, Qwen2 tokenizer

Each phase lists what is alive at its peak, in bytes, from the shapes in the code (docs/gpu-memory.md walks
through them): ``GRPOModule`` under ``bf16-mixed`` with fp32 weights, fused Adam, a frozen fp32 reference,
``share_prompt`` on, ``rows_per_update`` None (all rows in one forward), the fused head loss. Allocator
overhead (``max_memory_reserved`` − ``max_memory_allocated``) and the CUDA context are not counted.
The update's saved activations (:func:`saved_activations`) are checked against the tensors autograd really
saves, on the CPU with the CPU-only kernels off (``bench/tests/test_memory_estimate.py``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.limits import Geometry, layer_weights, model_weights

FP32, BF16, INT64 = 4, 2, 8
GIB = 1024**3
QWEN_05B = Geometry(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
# Longest prompt of the packaged GSM8K sample (64 train, 32 test problems) with the Qwen2 tokenizer; mean 86.
SAMPLE_MAX_PROMPT = 137


@dataclass(frozen=True)
class Run:
    prompts: int = 4  # B
    generations: int = 16  # G
    prompt_length: int = SAMPLE_MAX_PROMPT  # P, a batch's prompts left-padded to its longest
    new_tokens: int = 500  # C, every completion at full length
    chunk_rows: int = 8  # logprob_chunk_rows
    eval_rows: int = 64  # eval_batch_size, greedy, one sample per prompt
    eval_prompt_length: int = SAMPLE_MAX_PROMPT
    checkpointing: bool = True
    cast_cache: bool = False  # autocast's weight-cast cache: on under Lightning 2.4 / 2.5, off from 2.6

    @property
    def rows(self) -> int:
        return self.prompts * self.generations


def head_dim(g: Geometry) -> int:
    return g.hidden // g.heads


def parameters(g: Geometry) -> int:
    """Every parameter once: the matrices, the q/k/v biases, two RMSNorm weights a layer and the final one."""
    biases = g.layers * (g.hidden + 2 * g.kv_heads * head_dim(g))
    return model_weights(g) + biases + (2 * g.layers + 1) * g.hidden


def attention_weights(g: Geometry) -> int:
    return layer_weights(g) - 3 * g.hidden * g.intermediate


def layer_bytes_per_token(g: Geometry, gated: bool) -> int:
    """Bytes one decoder layer saves for the backward pass per token, under bf16 autocast (Qwen2, sdpa).

    input_layernorm: its fp32 input and normalised x (4H + 4H) and 1/rms (4); q, k, v each save their own bf16
    cast of the normed input (3 × 2H); sdpa saves q, k, v repeated to all heads (a padding mask rules out
    its GQA path), its output (4 × 2H) and a logsumexp per head (4 × heads); post_attention_layernorm as the
    first (8H + 4); the MLP: gate and up each save a bf16 cast of their input (2 × 2H), and gate's output,
    SiLU's, up's and the product (4 × 2I). GatedMLP keeps its fp32 input, gate and up (4H + 2 × 2I) instead.
    """
    H, I = g.hidden, g.intermediate
    mlp = 4 * H + (4 * I if gated else 8 * I)
    return 8 * H + 4 + 6 * H + 8 * H + 4 * g.heads + 8 * H + 4 + mlp


def saved_activations(g: Geometry, rows: int, tokens: int, checkpointing: bool, cast_cache: bool = False) -> int:
    """What the update's decoder forward leaves for the backward pass: [rows, tokens] through every layer.

    Shared by all layers: the ids (int64), RoPE's cos and sin ([rows, T, d] fp32 each), the final norm's input,
    x and 1/rms. Per layer with checkpointing: its fp32 input (the recompute's), and the bool mask [rows, 1, T, T]
    once. Without: :func:`layer_bytes_per_token`, sdpa's bf16 copy of the mask (converted in each layer) and the
    bf16 casts of the layer's weights that its products save (the attention's only with GatedMLP, which saves
    the fp32 weights); with the cast cache those casts are the cache's, counted with it.
    """
    S, H = rows * tokens, g.hidden
    shared = INT64 * S + 2 * FP32 * head_dim(g) * S + (8 * H + 4) * S
    if checkpointing:
        return shared + g.layers * FP32 * H * S + rows * tokens * tokens
    casts = 0 if cast_cache else BF16 * attention_weights(g)  # GatedMLP: the update runs it without checkpointing
    return shared + g.layers * (layer_bytes_per_token(g, gated=True) * S + casts + BF16 * rows * tokens * tokens)


def kv_cache(g: Geometry, rows: int, positions: int, dtype_bytes: int) -> int:
    return rows * positions * 2 * g.layers * g.kv_heads * head_dim(g) * dtype_bytes


def decoding_step(g: Geometry, rows: int, positions: int, dtype_bytes: int, sampler: bool) -> int:
    """A decoding step's largest transient: one layer's K and V repeated to all heads for sdpa, or the logits.

    Logits of the last position: the head's output, ``generate``'s fp32 copy and, when sampling, the
    InverseCDFSampler's log-probs, cumulative sums and output (3 × fp32).
    """
    repeated = 2 * rows * positions * g.heads * head_dim(g) * dtype_bytes
    logits = rows * g.vocab * (dtype_bytes + FP32 + (3 * FP32 if sampler else 0))
    return max(repeated, logits)


def phases(g: Geometry, run: Run) -> dict[str, list[tuple[str, int]]]:
    """{phase: [(what, bytes)]} at each phase's peak; sampling, reference and update run under autocast."""
    n, N, P, C, c = parameters(g), run.rows, run.prompt_length, run.new_tokens, run.chunk_rows
    H, V = g.hidden, g.vocab
    static = [("policy weights, fp32", FP32 * n), ("Adam moments (from the first step on), fp32", 2 * FP32 * n),
              ("reference weights, fp32", FP32 * n)]
    cache = [("autocast's bf16 weight casts (Lightning < 2.6)", BF16 * (n - (2 * g.layers + 1) * H))] if run.cast_cache else []
    chunk = ("LM-head chunk: bf16 logits and their fp32 copy [c, C, V]", c * C * V * (BF16 + FP32))
    head_cast = [] if run.cast_cache else [("the head weight's bf16 cast for dz·W", BF16 * V * H)]
    T = P + C
    update = "checkpointing on" if run.checkpointing else "checkpointing off (GatedMLP on)"
    return {
        "sampling": static + cache + [
            ("KV cache, bf16 [N, P + C - 1] positions", kv_cache(g, N, P + C - 1, BF16)),
            ("last decoding step's transient", decoding_step(g, N, P + C - 1, BF16, sampler=True)),
        ],
        "reference": static + cache + [
            ("completion hidden states [N, C, H], fp32", FP32 * N * C * H),
            chunk,
            ("log-probs and logsumexp [N, C], fp32", 2 * FP32 * N * C),
        ],
        f"update, {update}": static + cache + [
            ("saved activations [N, P + C]", saved_activations(g, N, T, run.checkpointing, run.cast_cache)),
            ("final hidden states [N, P + C, H], fp32", FP32 * N * T * H),
            ("HeadLoss dh [N, C, H] and dW [V, H], fp32", FP32 * N * C * H + FP32 * V * H),
            ("LM-head chunk: p [c, C, V] fp32 and its bf16 cast", c * C * V * (FP32 + BF16)),
            *head_cast,
            ("log-probs and entropies [N, C], fp32", 2 * FP32 * N * C),
        ],
        "evaluation after training (under autocast)": static + cache + [
            ("KV cache, bf16", kv_cache(g, run.eval_rows, run.eval_prompt_length + C - 1, BF16)),
            ("last decoding step's transient", decoding_step(g, run.eval_rows, run.eval_prompt_length + C - 1, BF16, sampler=False)),
        ],
    }


def total(items: list[tuple[str, int]]) -> int:
    return sum(size for _, size in items)


def format_table(g: Geometry, run: Run) -> str:
    """Markdown: what every phase holds, then each phase's own tensors and its total (the former included)."""
    on, off = phases(g, replace(run, checkpointing=True)), phases(g, replace(run, checkpointing=False))
    every = next(iter(on.values()))[: 4 if run.cast_cache else 3]
    lines = [f"computed, not measured: {parameters(g):,} parameters, {run.prompts} prompts x {run.generations} samples, "
             f"prompt {run.prompt_length} + {run.new_tokens} new tokens, LM-head chunk of {run.chunk_rows} rows, "
             f"evaluation batch {run.eval_rows} (prompt {run.eval_prompt_length})", "", "| phase | what | GiB |", "|---|---|---:|"]
    lines += [f"| every phase | {what} | {size / GIB:.2f} |" for what, size in every]
    for phase, items in {**on, **off}.items():
        own = [item for item in items if item not in every]
        lines += [f"| {phase} | {what} | {size / GIB:.2f} |" for what, size in own]
        lines.append(f"| **{phase}** | **peak, every phase's included** | **{total(items) / GIB:.2f}** |")
    return "\n".join(lines)


def measure_prompt_lengths() -> dict[str, tuple[int, float]]:
    """{split: (longest, mean)} token counts of the packaged GSM8K sample's prompts, Qwen2 tokenizer."""
    from bench.workload import build_tokenizer
    from grpo_lightning.builtin.answer_format import build_prompt
    from grpo_lightning.train.data import load_records

    tokenizer, out = build_tokenizer(), {}
    for split in ("train", "test"):
        lengths = [len(tokenizer(build_prompt(r["question"])).input_ids) for r in load_records("builtin:gsm8k-sample", split)]
        out[split] = (max(lengths), sum(lengths) / len(lengths))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-length", type=int, default=SAMPLE_MAX_PROMPT)
    parser.add_argument("--eval-prompt-length", type=int, default=SAMPLE_MAX_PROMPT)
    parser.add_argument("--cast-cache", action="store_true", help="Lightning 2.4 / 2.5: autocast caches bf16 weights")
    parser.add_argument("--measure-prompts", action="store_true")
    args = parser.parse_args(argv)
    if args.measure_prompts:
        for split, (longest, mean) in measure_prompt_lengths().items():
            print(f"{split}: longest prompt {longest} tokens, mean {mean:.1f}")
    run = Run(prompt_length=args.prompt_length, eval_prompt_length=args.eval_prompt_length, cast_cache=args.cast_cache)
    print(format_table(QWEN_05B, run))


if __name__ == "__main__":
    main()
