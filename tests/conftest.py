"""Shared fixtures: a tiny Qwen2-architecture model and tokenizer built offline, and real GSM8K rows.

The GSM8K rows come from the sample packaged with the project (``builtin:gsm8k-sample``): the tests read
nothing outside the repository.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from grpo_lightning.builtin.tiny import Recipe, build
from grpo_lightning.train.data import builtin_data_dir

GSM8K_DIR = builtin_data_dir("gsm8k-sample")  # 64 train, 32 test problems


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine run many times faster on one intra-op thread than on two; the
    count the session started with comes back at its end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_state_left(one_thread):
    """Whatever process-wide state a test changes is put back before the next one: torch's thread count, the
    environment, the classes allowed for weights_only loads (pytest itself puts the warning filters back after
    each test). What the library must put back itself is tested in tests/test_process_state.py."""
    threads, environ, safe = torch.get_num_threads(), dict(os.environ), torch.serialization.get_safe_globals()
    yield
    torch.set_num_threads(threads)
    for name in os.environ.keys() - environ.keys():
        del os.environ[name]
    os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(safe)


# The tests' tiny model: 2 layers of width 32 and a 200-token BPE of GSM8K text, pad == eos (as Qwen's).
# Every test's expectation was measured on exactly this model: change the recipe and they move.
TESTS_RECIPE = Recipe(vocab_size=200, qwen_split=False, own_pad=False, decoder_defaults=False, vocab_multiple=1,
                      hidden_size=32, intermediate_size=64, num_hidden_layers=2, bos_is_eos=False)


def build_tiny_model(out: Path, texts: list[str], seed: int = 0) -> Path:
    """The tests' tiny model, its tokenizer trained on ``texts``, saved to ``out`` (the package's builder)."""
    return build(out, seed, TESTS_RECIPE, texts)


def gsm8k_rows(split: str, n: int | None = None) -> list[dict]:
    """The first ``n`` rows (all when ``None``) of a split of the packaged GSM8K sample."""
    with (GSM8K_DIR / f"{split}.jsonl").open() as f:
        return [json.loads(line) for line in f][:n]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    rows = gsm8k_rows("train") + gsm8k_rows("test")
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts)


@pytest.fixture(scope="session")
def gsm8k_dir(tmp_path_factory) -> Path:
    """A small local GSM8K directory with the first real rows of each split."""
    out = tmp_path_factory.mktemp("gsm8k")
    for split, n in (("train", 64), ("test", 8)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(split, n)))
    return out


def fixed_update_batch(module, prompts=("Natalia sold clips.", "Weng earns $12."), seed: int = 1) -> tuple:
    """A rollout of ``module``'s policy (3 samples each) with random advantages, reference and old log-probs."""
    from grpo_lightning.engines.generate import generate_rollout
    from grpo_lightning.core.types import GRPOBatch

    torch.manual_seed(0)
    rollout = generate_rollout(module.policy, module.tokenizer, list(prompts), 3, 10)
    N, C = rollout.completion_mask.shape
    g = torch.Generator().manual_seed(seed)
    data = GRPOBatch(rollout=rollout, scores=None, rewards=torch.zeros(N), advantages=torch.randn(N, generator=g),
                     loss_mask=rollout.completion_mask, num_sequences=N, num_tokens=int(rollout.completion_mask.sum()),
                     frac_reward_zero_std=torch.zeros(()), ref_logp=torch.randn(N, C, generator=g) * 0.1 - 4)
    old = torch.randn(N, C, generator=g) * 0.1 - 4  # log-probs near −4, ratios near 1 with some clipped
    return data, old


@pytest.fixture(scope="session", autouse=True)
def cli_arguments_are_only_the_tests():
    """The tests call the command line's ``run(args)`` in this process: without pytest's own arguments in
    ``sys.argv``, Lightning's CLI sees a program run with exactly ``args`` (and warns of nothing). Session-wide,
    so that module fixtures which run the command line see it too."""
    given = sys.argv
    sys.argv = given[:1]
    yield
    sys.argv = given


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Six held-out problems of the arithmetic task, as chat prompts of the packaged tiny model (the vLLM tests)."""
    from grpo_lightning.train.data import PromptDataModule

    data = PromptDataModule(source="task:arithmetic", eval_size=6, eval_batch_size=6, seed=0,
                            tokenizer_name_or_path="builtin:tiny-arithmetic")
    data.setup("validate")
    return next(iter(data.val_dataloader()))["prompt"]
