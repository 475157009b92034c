"""Export any training checkpoint in Hugging Face format, after the run:

    python -m grpo_lightning.train.export runs/quickstart/checkpoints/epoch=0-step=60.ckpt runs/quickstart/best_model

The module is rebuilt from the options the checkpoint saved (its base model must still be where
``model_name_or_path`` says), its weights replaced by the checkpoint's, and saved as fit's ``export`` saves it
(:class:`~grpo_lightning.train.callbacks.HFExport`: a LoRA policy merged, its adapters in ``adapter/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from grpo_lightning.hf.lora import LoRA
from grpo_lightning.train.callbacks import HFExport
from grpo_lightning.train.checkpoints import CheckpointError, is_sharded_checkpoint, read_checkpoint
from grpo_lightning.train.options import GROUPS


def module_options(hparams: dict[str, Any]) -> dict[str, Any]:
    """The module's arguments from a checkpoint's saved hyperparameters (the command line saves plain dicts)."""
    options = {k: v for k, v in hparams.items() if not k.startswith("_") and k not in ("optimizer", "lr_scheduler", "rollout")}
    for name, group in GROUPS.items():
        if isinstance(options.get(name), dict):
            options[name] = group(**options[name])
    if isinstance(options.get("lora"), dict):
        options["lora"] = LoRA(**options["lora"])
    options.pop("sharding", None)  # one full copy here: the checkpoint is a single file
    return options


def export_checkpoint(checkpoint: str | Path, export_dir: str | Path, overwrite: bool = False) -> Path:
    """Save the policy of ``checkpoint`` and its tokenizer to ``export_dir``; where it went."""
    from grpo_lightning.train.module import GRPOModule

    if is_sharded_checkpoint(checkpoint):
        raise CheckpointError(
            f"checkpoint {checkpoint} is sharded (FSDP2): gather it into one file first "
            "(torch.distributed.checkpoint.format_utils.dcp_to_torch_save), then export that file"
        )
    saved = read_checkpoint(checkpoint)
    module = GRPOModule(**module_options(saved.get("hyper_parameters", {})))
    module.load_state_dict(saved["state_dict"])
    export = HFExport(str(export_dir), overwrite=overwrite)
    export.path = Path(export_dir)
    export.check(export.path)
    export.save(module, None)
    return export.path


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a grpo-lightning checkpoint in Hugging Face format.")
    parser.add_argument("checkpoint", help="a .ckpt file written by fit (last.ckpt, the best one, any)")
    parser.add_argument("export_dir", help="where to save the model and tokenizer")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty export_dir")
    parsed = parser.parse_args(args)
    try:
        export_checkpoint(parsed.checkpoint, parsed.export_dir, parsed.overwrite)
    except (ValueError, OSError, ImportError) as e:  # a bad file, a non-empty directory: one message
        raise SystemExit(f"export: error: {e}") from None


if __name__ == "__main__":
    main()
