"""What went wrong when a model does not load, in one message that names the path or id and what to do.

transformers reports an empty directory as a missing sentencepiece, an unreachable hub as a network hint
buried under a traceback, and a truncated weights file as a raw ``SafetensorError``. These checks and
translations turn each into a :class:`ModelLoadError` (an ``OSError``, which the CLI prints without a
traceback; ``GRPO_TRACEBACK=1`` shows it).
"""

from __future__ import annotations

import json
from pathlib import Path


class ModelLoadError(OSError):
    """A model or its tokenizer could not be loaded; the message says why and what to do."""


def check_directory(path: Path, trust_remote_code: bool) -> None:
    """A local model directory has a config.json of an architecture this transformers knows."""
    from transformers import CONFIG_MAPPING

    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"model directory {path} has no config.json: it is not a Hugging Face model directory "
                             "(save_pretrained writes config.json, the tokenizer's files and the weights)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config} is not valid JSON ({e}): restore the file") from e
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise ModelLoadError(f"model {path}: its config.json has model_type {model_type!r}, an architecture this "
                             "version of transformers does not know: upgrade transformers, or set "
                             "model.trust_remote_code: true if the directory ships its own modelling code")


def explain(name_or_path: str, error: BaseException) -> ModelLoadError | None:
    """The one message for a load failure whose cause is known (None: keep transformers' own)."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from safetensors import SafetensorError

    chain, cause = [], error
    while cause is not None and len(chain) < 20:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    first = lambda kind: next((c for c in chain if isinstance(c, kind)), None)  # noqa: E731
    if (e := first(SafetensorError)) is not None:
        return ModelLoadError(f"model {name_or_path}: its weights cannot be read ({e}): the safetensors file is "
                              "incomplete or damaged; copy or download it again")
    if first(GatedRepoError) is not None:
        return ModelLoadError(f"model {name_or_path} is a gated repository: accept its terms on "
                              f"https://huggingface.co/{name_or_path} and log in (`hf auth login`, or set HF_TOKEN)")
    if first(RevisionNotFoundError) is not None:
        return ModelLoadError(f"model {name_or_path} has no such revision: check model.revision")
    if first(RepositoryNotFoundError) is not None:
        return ModelLoadError(f"model {name_or_path} is not on the Hugging Face hub (or is private: log in with "
                              "`hf auth login` or HF_TOKEN); for a local directory give its path (./NAME)")
    if first(LocalEntryNotFoundError) is not None:
        return ModelLoadError(f"model {name_or_path} is not in the local cache and the Hugging Face hub could not "
                              "be reached (offline, or HF_HUB_OFFLINE is set): connect once to download it, or "
                              "give the path of a local directory")
    return None
