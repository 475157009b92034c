"""Checkpoints read safely and written atomically.

Reading: every checkpoint is loaded with ``torch.load(weights_only=True)`` and an allow-list of the only
non-tensor objects a grpo-lightning checkpoint holds, so a file from elsewhere can never run code while it is
unpickled (Lightning itself loads with ``weights_only=False`` by default). A truncated file, a file that is
not a checkpoint, and a checkpoint of another model each get one :class:`CheckpointError` that names the file.

Writing: :class:`AtomicCheckpointIO` is Lightning's ``TorchCheckpointIO`` with a temporary file and a rename
(:func:`~grpo_lightning.train.atomic.atomic_file`): a crash or a full disk leaves the previous checkpoint readable.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from grpo_lightning.hf.lora import LoRA
from grpo_lightning.hf.sharding import Sharding
from grpo_lightning.train.atomic import atomic_file
from grpo_lightning.train.options import GROUPS

# What the project's checkpoints hold besides tensors, numbers, strings and containers: the option groups
# and the LoRA options among the hyperparameters.
SAFE_GLOBALS = [*GROUPS.values(), LoRA, Sharding]


def allow_checkpoint_classes() -> None:
    """Let ``torch.load(weights_only=True)`` unpickle :data:`SAFE_GLOBALS` (plain data classes), from now on.

    Called where a checkpoint is about to be read (here, and by ``GRPOModule`` before Lightning reads one),
    not when this module is imported. They stay allowed for the rest of the process: Lightning's own loads
    (a resumed fit, ``load_from_checkpoint``) call ``torch.load`` where no context of ours can wrap them, and
    torch's ``safe_globals`` context would drop them again on exit. Adding them twice changes nothing.
    """
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([g for g in SAFE_GLOBALS if g not in allowed])
# The entries Lightning writes in every training checkpoint.
REQUIRED_KEYS = ("state_dict", "global_step", "loops", "pytorch-lightning_version")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
SHARDED_META = "meta.pt"  # what ModelParallelStrategy writes beside the shards: everything but the weights


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not a grpo-lightning checkpoint, or belongs to another model."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, say); the previous file at that path is intact."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A ``ModelParallelStrategy`` checkpoint (FSDP2): a directory of per-process shards and Lightning's ``meta.pt``."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def sharded_weights(path: Path) -> dict[str, torch.Tensor]:
    """The names and shapes of a sharded checkpoint's weights (meta tensors: nothing is read but its index)."""
    from torch.distributed.checkpoint import FileSystemReader

    index = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    return {k[len(prefix):]: torch.empty(v.size, device="meta") for k, v in index.items() if k.startswith(prefix)}


def _unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint before unpickling anything, or ``None`` if it may be one."""
    if not path.is_file():
        return "does not exist" if not path.exists() else "is not a file"
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        return "is empty"
    if head != ZIP_MAGIC:
        return "is not a checkpoint (not a file that torch.save writes)"
    if not zipfile.is_zipfile(path):
        return "is truncated or corrupt (its zip archive has no end); it was probably cut off while being written"
    return None


def read_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False, required: tuple[str, ...] = REQUIRED_KEYS
) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded with ``weights_only=True``; :class:`CheckpointError` if it is not one.

    ``mmap`` maps the tensors instead of reading them: enough to check names and shapes without a second
    copy of a large checkpoint in memory. A sharded checkpoint (a directory) gives its weights as meta
    tensors: their names and shapes.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):  # the weights' index, and the rest of the checkpoint from meta.pt
        meta = read_checkpoint(path / SHARDED_META, map_location, mmap, required=REQUIRED_KEYS[1:])
        try:
            return {**meta, "state_dict": sharded_weights(path)}
        except Exception as e:  # (DCP raises its own types for a missing or cut index)
            raise CheckpointError(f"checkpoint {path} is a sharded checkpoint whose index cannot be read ({e})") from e
    reason = _unreadable_reason(path)
    if reason is None:
        try:
            allow_checkpoint_classes()  # (see there why for good, not in a context)
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            # torch's own message advises weights_only=False, which would run whatever the file holds
            found = str(e).split("Unsupported global:")[-1].split(".")[0].strip() if "Unsupported global" in str(e) else ""
            reason = (
                "holds objects that grpo-lightning checkpoints never hold" + (f" ({found})" if found else "")
                + "; it was not loaded, since unpickling them could run arbitrary code"
            )
        except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
            reason = f"is truncated or corrupt ({str(e).splitlines()[0]})"
    if reason is None and not (isinstance(checkpoint, dict) and all(k in checkpoint for k in required)):
        reason = "is a torch file but not a training checkpoint (no state_dict, global_step and loops)"
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} {reason}")
    return checkpoint


def check_same_model(checkpoint: dict[str, Any], state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's weights have this model's names and shapes."""
    saved = checkpoint["state_dict"]
    missing = [k for k in state_dict if k not in saved]
    extra = [k for k in saved if k not in state_dict]
    problem = None
    if missing or extra:
        problem = f"{len(missing)} of this model's weights are missing from it, {len(extra)} of its are not in this model"
        problem += f" (e.g. {(missing or extra)[0]})"
    else:
        for name, tensor in state_dict.items():
            if tuple(saved[name].shape) != tuple(tensor.shape):
                problem = f"{name} has shape {list(saved[name].shape)} there, {list(tensor.shape)} here"
                break
    if problem:
        source = checkpoint.get("hyper_parameters", {}).get("model_name_or_path")
        origin = f" (saved from model {source})" if source else ""
        raise CheckpointError(f"checkpoint {path} belongs to another model{origin}: {problem}")


def last_checkpoint(dirpath: str | Path) -> Path | None:
    """The newest ``last*.ckpt`` in ``dirpath``: the file Lightning's ``ckpt_path="last"`` picks."""
    candidates = [p for p in Path(dirpath).glob("last*.ckpt") if p.is_file() or is_sharded_checkpoint(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def readable_alternatives(dirpath: str | Path, bad: Path) -> list[tuple[Path, int]]:
    """Every other checkpoint in ``dirpath`` that reads, newest first, with its ``global_step``."""
    found = []
    for p in sorted(Path(dirpath).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if p.resolve() == bad.resolve():
            continue
        try:
            found.append((p, int(read_checkpoint(p, mmap=True)["global_step"])))
        except CheckpointError:
            continue
    return found


def check_resume_checkpoint(ckpt_path: str, dirpath: str | None, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse, with one message, a ``--ckpt_path`` (a file or ``last``) that is unreadable or of another model.

    For ``last`` with a bad ``last.ckpt`` the message names the readable checkpoints beside it, if any.
    ``best`` and ``hpc`` are left to Lightning, which finds them through its own callbacks.
    """
    if ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
        return
    if ckpt_path == "last":
        path = last_checkpoint(dirpath) if dirpath else None
        if path is None:
            return  # Lightning warns and starts from scratch, as it always has
    else:
        path = Path(ckpt_path)
    try:
        check_same_model(read_checkpoint(path, mmap=True), state_dict, path)
    except CheckpointError as e:
        if ckpt_path != "last":
            raise
        others = readable_alternatives(path.parent, path)
        listed = "; ".join(f"{p} (step {step})" for p, step in others)
        hint = f"readable older checkpoints: {listed} (pass one as --ckpt_path)" if others else "no other readable checkpoint is there"
        raise CheckpointError(f"{e}; {hint}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, writing through a temporary file and reading with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        try:
            with atomic_file(path) as tmp:
                torch.save(checkpoint, tmp)
        except OSError as e:
            raise CheckpointWriteError(
                e.errno, f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint at that "
                "path, if any, is intact: free space and resume from it"
            ) from e

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded_checkpoint(path):
            raise CheckpointError(
                f"checkpoint {path} is sharded (FSDP2, one file per process): resume it with trainer.strategy "
                "ModelParallelStrategy and model.sharding, on any number of processes"
            )
        return read_checkpoint(path, map_location=map_location or "cpu")


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give the trainer's strategy :class:`AtomicCheckpointIO` unless it was configured with its own I/O."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class GRPOCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (the ``checkpoint`` section) whose best checkpoint is judged right after
    each evaluation, with periodic checkpoints beside it.

    With ``monitor`` (``val/accuracy``, ``mode: max``, ``save_top_k: 1``) the monitored value is fresh only at the
    end of an evaluation: that is where the top-k are judged, and ``last`` saved (so a resumed run does not
    evaluate that step again). ``every_n_train_steps`` then writes ``last`` only: Lightning's own would judge the
    top-k on the previous evaluation's value, skip the evaluation that follows at the same step, and write
    nothing at all before the first evaluation. Without ``monitor`` it is Lightning's, except at the end:
    a fit that ends normally always leaves ``last`` at its final step (:meth:`on_train_end`).
    """

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # Lightning 2.5+ writes ``last`` here only when nothing wrote it during the run, and 2.4 not at all (it
        # wrote it at the epoch's end, which the command line's ``save_on_train_epoch_end: false`` turns off):
        # on every version, ``last`` is the final step's, to resume from. (A stopped run raises: no save here.)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        every = self._every_n_train_steps
        if every < 1 or trainer.global_step % every or self._should_skip_saving_checkpoint(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is None:
            return super().on_validation_end(trainer, pl_module)
        if trainer.fast_dev_run or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
