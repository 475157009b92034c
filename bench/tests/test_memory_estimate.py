"""The GPU memory estimate: its arithmetic on a geometry counted by hand, its activations against autograd's own."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `bench`

from bench import memory_estimate as me  # noqa: E402
from bench.limits import Geometry  # noqa: E402

# hidden 4, 2 heads of width 2, 1 KV head, intermediate 8, vocab 10, one layer (test_limits.py's)
TINY = Geometry(hidden=4, layers=1, heads=2, kv_heads=1, intermediate=8, vocab=10)
# 1 prompt × 2 samples: N = 2 rows, P = 3, C = 2, so T = 5 and S = N·T = 10 tokens; 1 row per head chunk
RUN = me.Run(prompts=1, generations=2, prompt_length=3, new_tokens=2, chunk_rows=1, eval_rows=2, eval_prompt_length=3)


def test_parameters():
    # matrices 184 (test_limits), biases q 4 + k 2 + v 2 = 8, norms 2·4 + 4 = 12
    assert me.parameters(TINY) == 204
    assert me.parameters(me.QWEN_05B) == 494_032_768  # Qwen2.5-0.5B-Instruct's count


def test_layer_bytes_by_hand():
    # 8H + 4 (norm) + 6H (q, k, v casts) + 8H (sdpa q, k, v, out) + 4·heads + 8H + 4 (norm) + MLP
    # MLP: 4H + 8I plain = 16 + 64; GatedMLP 4H + 4I = 16 + 32
    assert me.layer_bytes_per_token(TINY, gated=False) == 32 + 4 + 24 + 32 + 8 + 32 + 4 + 80 == 216
    assert me.layer_bytes_per_token(TINY, gated=True) == 184


def test_phases_by_hand():
    totals = {phase: me.total(items) for phase, items in me.phases(TINY, RUN).items()}
    # every phase: weights 204·4 = 816, Adam 1632, reference 816 → 3264
    # sampling: KV 2 rows × 4 positions × (2 · 1 layer · 1 head · 2) × 2 B = 64; the step's transient is the
    # logits, 2 rows × 10 × (2 + 4 + 12) = 360 (above the repeated K, V: 2 · 2 · 4 · 2 heads · 2 · 2 = 128)
    assert totals["sampling"] == 3264 + 64 + 360
    # reference: hidden 2·2·4·4 = 64, chunk 1·2·10·6 = 120, log-probs and logsumexp 2·2·2·4 = 32
    assert totals["reference"] == 3264 + 64 + 120 + 32
    # update, checkpointing: saved = ids 8·10 + cos, sin 2·4·2·10 = 160 + final norm (8·4 + 4)·10 = 360
    #   + 1 layer's fp32 input 4·4·10 = 160 + bool mask 2·5·5 = 50 → 810; final hidden 2·5·4·4 = 160;
    #   dh 2·2·4·4 = 64, dW 10·4·4 = 160; chunk 1·2·10·6 = 120 + head cast 10·4·2 = 80; log-probs, entropies 32
    assert totals["update, checkpointing on"] == 3264 + 810 + 160 + 64 + 160 + 120 + 80 + 32
    # evaluation (bf16, under the trainer's autocast): KV 2 · 4 · 4 · 2 = 64; repeated K, V 2 · 2 · 4 · 2 · 2 · 2 = 128
    # above the logits 2 · 10 · (2 + 4) = 120
    assert totals["evaluation after training (under autocast)"] == 3264 + 64 + 128
    off = {phase: me.total(items) for phase, items in me.phases(TINY, replace(RUN, checkpointing=False)).items()}
    # without: the layer saves 184·10 = 1840 + its attention's bf16 weight casts 2·(16+16+8+8) = 96 + bf16 mask
    # 2·2·25 = 100 → 2036, and the shared 80 + 160 + 360 → 2636 in place of 810
    assert off["update, checkpointing off (GatedMLP on)"] == 3264 + 2636 + 160 + 64 + 160 + 120 + 80 + 32


def test_cast_cache_holds_the_weights_once():
    cached = {p: me.total(i) for p, i in me.phases(TINY, replace(RUN, checkpointing=False, cast_cache=True)).items()}
    # the cache: every weight but the norms' in bf16, (204 − 12) · 2 = 384; the update's own casts (96 + 80) go
    assert cached["sampling"] == 3264 + 64 + 360 + 384
    assert cached["update, checkpointing off (GatedMLP on)"] == 3264 + 2636 + 160 + 64 + 160 + 120 + 80 + 32 + 384 - 96 - 80


@pytest.mark.parametrize("gated", [False, True])
def test_saved_activations_are_what_autograd_saves(monkeypatch, gated):
    """The update's decoder forward under bf16 autocast on the CPU path that CUDA takes (oneDNN off)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_lightning.fast.gated_mlp import gated_mlps
    from grpo_lightning.hf.passes import completion_hidden

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    g = Geometry(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, vocab=100)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=g.vocab, hidden_size=g.hidden, intermediate_size=g.intermediate,
                                         num_hidden_layers=g.layers, num_attention_heads=g.heads,
                                         num_key_value_heads=g.kv_heads, tie_word_embeddings=True)).train()
    rows, P, C = 3, 4, 5
    ids = torch.randint(0, g.vocab, (rows, P + C))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as a batch of prompts of unequal length has
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage → bytes; several saved views of one tensor count once

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            gated_mlps(model, enabled=gated):
        completion_hidden(model, ids, mask, P)
    S, T = rows * (P + C), P + C
    expected = me.saved_activations(g, rows, T, checkpointing=False)
    if not gated:  # the plain MLP: its own count, and every product's bf16 weight cast
        expected += g.layers * ((me.layer_bytes_per_token(g, False) - me.layer_bytes_per_token(g, True)) * S
                                + 2 * (me.layer_weights(g) - me.attention_weights(g)))
    assert sum(saved.values()) == expected
