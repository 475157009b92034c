"""Decoding's levers measured alone: a static KV cache with a compiled step, and oneDNN's products on weights
reordered for the rows decoded at once.

    python -m bench.compiled_decode --layers 24          # the real depth, setting (a)'s 8 rows × 64 tokens
    python -m bench.compiled_decode --layers 2 --tiny    # a quick look
    python -m bench.compiled_decode --ways "oneDNN, head reordered" "oneDNN, every weight reordered"

Runs transformers' ``generate`` (greedy, every completion forced to full length) on the seeded benchmark model
in each way, each three times, in one process:

- the dynamic cache (what ``generate`` uses by default), plain ``nn.Linear``;
- the static cache eager;
- the static cache with the decoding step compiled (``torch.compile`` through ``generate``'s own compile path,
  which transformers switches on for GPUs and which is forced here for the CPU). The first compiled call
  includes the compilation: the difference to the later ones is its cost;
- the dynamic cache with every linear layer through oneDNN (``fast/kernels.py``) and only the LM head's weight
  reordered for the rows, as sampling did before;
- the same with every weight reordered, as sampling does now (``onednn_linears(model, packed_rows=rows)``).
  The oneDNN ways' seconds include reordering the weights, once per call as once per rollout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_lightning.fast.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # as the command line does, before torch is imported (THP_MEM_ALLOC_ENABLE=0: without)

from bench import workload

WAYS = ("dynamic cache", "static cache", "static cache, compiled", "oneDNN, head reordered",
        "oneDNN, every weight reordered")


def timed_calls(model, ids, tokens: int, way: str, calls: int = 3) -> list[float]:
    """Seconds of ``calls`` generate calls of ``tokens`` new tokens for the rows ``ids`` [rows, P]."""
    import torch
    from transformers.generation.configuration_utils import CompileConfig

    from grpo_lightning.fast.kernels import OneDNNLinear, onednn_linears

    options, rows = {}, ids.shape[0]
    if way.startswith("static"):
        compile_config = CompileConfig()
        compile_config._compile_all_devices = way.endswith("compiled")  # transformers compiles on GPUs only
        options = {"cache_implementation": "static", "compile_config": compile_config,
                   "disable_compile": not way.endswith("compiled")}
    seconds = []
    with torch.no_grad():
        for _ in range(calls):
            start = time.perf_counter()
            kernels = contextlib.nullcontext()
            if way.startswith("oneDNN"):
                kernels = onednn_linears(model, packed_rows=rows if way.endswith("every weight reordered") else None)
            with kernels:
                if way.endswith("head reordered"):  # (onednn_linears puts the plain layer back after)
                    model.lm_head = OneDNNLinear(model.lm_head.layer, rows)
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, **options)
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tiny", action="store_true", help="the 64-wide geometry instead of Qwen2.5-0.5B's")
    parser.add_argument("--rows", type=int, default=8, help="rows sampled at once (setting (a): 2 prompts × 4)")
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(workload.DEFAULT_CACHE), help="where the seeded model is built once")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="the ways measured, in this order")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = workload.prepare_model_dir(args.cache_dir, num_layers=args.layers, tiny=args.tiny)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (args.rows, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    print(f"{args.layers} layers, {args.rows} rows × {args.tokens} new tokens after {args.prompt_tokens}, "
          f"{args.threads} threads: seconds per generate call")
    for way in args.ways:
        seconds = timed_calls(model, ids, args.tokens, way)
        print(f"  {way:32s} " + "  ".join(f"{s:6.2f}" for s in seconds)
              + f"   ({min(seconds) / args.tokens * 1000:.0f} ms a token at best, prefill included)", flush=True)


if __name__ == "__main__":
    main()
