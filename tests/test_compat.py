"""What users wrote before the package had subpackages keeps working: import paths in configs, checkpoints."""

import sys
import types

import lightning as L
import pytest
import torch

from grpo_lightning.builtin import gsm8k
from grpo_lightning.core.scoring import MOVED, import_object, load_reward_funcs
from grpo_lightning.hf.lora import LoRA
from grpo_lightning.train.checkpoints import read_checkpoint
from grpo_lightning.train.data import load_records
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Loss, Sampling

OLD_DEFAULTS = ["grpo_lightning.scoring.correctness", "grpo_lightning.scoring.format"]


@pytest.mark.parametrize("old", [*MOVED, "grpo_lightning.scoring:format"])
def test_a_moved_path_resolves_with_one_warning_naming_its_new_home(old):
    new = MOVED[old.replace(":", ".")]
    with pytest.warns(DeprecationWarning, match=f"write '{new}'") as caught:
        assert import_object(old) is import_object(new)
    assert len(caught) == 1


def test_the_old_default_rewards_load_under_their_log_names():
    with pytest.warns(DeprecationWarning):
        funcs = load_reward_funcs(OLD_DEFAULTS)
    assert list(funcs) == ["correctness", "format"]
    assert funcs["correctness"][0] is gsm8k.correctness


def test_the_old_answer_extractor_path_loads_records(gsm8k_dir):
    with pytest.warns(DeprecationWarning, match="grpo_lightning.builtin.gsm8k.extract_dataset_answer"):
        old = load_records(str(gsm8k_dir), "test", answer_extractor="grpo_lightning.rewards.extract_dataset_answer")
    assert old == load_records(str(gsm8k_dir), "test")


def test_an_unmoved_missing_path_still_fails():
    with pytest.raises(ImportError, match="cannot import 'grpo_lightning.scoring.nope'"):
        import_object("grpo_lightning.scoring.nope")


def test_the_roots_add_no_state_dict_keys(tiny_model_dir):
    """A checkpoint's weights are ``policy.*`` and ``reference.*`` as before: the pass roots are not children."""
    module = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2))
    module.passes  # made on first use
    names = {f"policy.{k}" for k in module.policy.state_dict()} | {f"reference.{k}" for k in module.reference.state_dict()}
    assert set(module.state_dict()) == names
    assert sum(1 for _ in module.parameters()) == 2 * sum(1 for _ in module.policy.parameters())


def test_a_checkpoint_with_the_old_hyperparameters_loads(tiny_model_dir, tmp_path):
    """Hyperparameters saved before the move name the old reward paths; the weights load into the new module."""
    module = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2))
    with torch.no_grad():
        next(module.policy.parameters()).add_(1.0)  # a change the loaded module must show
    hparams = {**module.hparams, "loss": Loss(reward_funcs=OLD_DEFAULTS)}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 0, "loops": {},
                "pytorch-lightning_version": L.__version__}, path)
    with pytest.warns(DeprecationWarning):
        loaded = GRPOModule.load_from_checkpoint(path, map_location="cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.state_dict().values()))


def test_loading_a_checkpoint_with_flat_options_in_python_names_the_way_to_resume(tiny_model_dir, tmp_path):
    """Options saved flat, before the groups: load_from_checkpoint would build the module without them."""
    module = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2))
    hparams = {"model_name_or_path": str(tiny_model_dir), "num_generations": 2, "beta": 0.0, "mu": 2}
    path = tmp_path / "flat.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 0, "loops": {},
                "pytorch-lightning_version": L.__version__}, path)
    with pytest.raises(ValueError, match=r"options are flat \(beta, mu, num_generations, ...\).*--ckpt_path"):
        GRPOModule.load_from_checkpoint(path, map_location="cpu")


def test_a_checkpoint_pickling_lora_under_its_old_module_reads(tmp_path, monkeypatch):
    old = types.ModuleType("grpo_lightning.lora")
    old.LoRA = LoRA
    monkeypatch.setitem(sys.modules, "grpo_lightning.lora", old)
    monkeypatch.setattr(LoRA, "__module__", "grpo_lightning.lora")  # pickled as checkpoints before the move did
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lora": LoRA(r=4)}, "global_step": 0, "loops": {},
                "pytorch-lightning_version": L.__version__}, path)
    monkeypatch.undo()
    assert b"grpo_lightning.lora" in path.read_bytes()
    assert read_checkpoint(path)["hyper_parameters"]["lora"] == LoRA(r=4)
