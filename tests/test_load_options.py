"""``model.attn_implementation``, ``model.revision``, ``model.trust_remote_code``: checked before anything
loads, passed on to the model and its tokenizer, kept in the hyperparameters a checkpoint saves."""

from __future__ import annotations

import pytest
import transformers

from grpo_lightning.hf.models import check_attn_implementation, load_model_and_tokenizer
from grpo_lightning.train.module import GRPOModule

TINY = "builtin:tiny-arithmetic"


def test_an_unknown_attention_is_refused_before_anything_loads():
    # the path does not exist either: the attention option is checked first
    with pytest.raises(ValueError, match="model.attn_implementation must be one of .*'sdpa'.* got 'fast'"):
        GRPOModule("./no/such/model", attn_implementation="fast")


def test_flash_attention_needs_its_package(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="'flash_attention_2' needs the flash-attn package"):
        check_attn_implementation("flash_attention_2")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_attention_reaches_the_model(attn):
    model, _ = load_model_and_tokenizer(TINY, "float32", attn_implementation=attn)
    assert model.config._attn_implementation == attn


def test_revision_and_remote_code_reach_the_model_and_the_tokenizer(monkeypatch):
    seen = {}
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def recording(owner, path, *args, _original=original, _name=cls.__name__, **kwargs):
            seen[_name] = {k: kwargs.get(k) for k in ("revision", "trust_remote_code")}
            kwargs.pop("revision"), kwargs.pop("trust_remote_code")  # a local directory has no revisions
            return _original(owner, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    load_model_and_tokenizer(TINY, "float32", revision="v1.0", trust_remote_code=True)
    assert seen == {name: {"revision": "v1.0", "trust_remote_code": True}
                    for name in ("AutoTokenizer", "AutoModelForCausalLM")}


def test_the_options_are_saved_in_the_hyperparameters():
    module = GRPOModule(TINY, dtype="float32", attn_implementation="eager")
    assert (module.hparams.attn_implementation, module.hparams.revision, module.hparams.trust_remote_code) == (
        "eager", None, False)
    assert module.policy.config._attn_implementation == "eager"


def test_the_chat_templates_tokenizer_follows_the_models_revision(monkeypatch, tmp_path):
    from grpo_lightning.train.cli import GRPOCLI
    from grpo_lightning.train.data import PromptDataModule

    args = ["--seed_everything", "0", "--model.model_name_or_path", TINY, "--data.source", "task:arithmetic", "--model.revision", "v1.0",
            "--data.chat_template", "true", "--trainer.default_root_dir", str(tmp_path)]
    data = GRPOCLI(GRPOModule, PromptDataModule, run=False, args=args).datamodule
    assert (data.hparams.tokenizer_name_or_path, data.hparams.tokenizer_revision) == (TINY, "v1.0")  # linked
    seen = []
    load = transformers.AutoTokenizer.from_pretrained

    def recording(name, **kwargs):
        seen.append(kwargs.pop("revision"))  # (a local directory has no revisions)
        tokenizer = load(name, **kwargs)
        tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"  # (the tiny model has none)
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    data.setup("validate")
    assert seen == ["v1.0"] and data.eval_records[0]["prompt"].startswith("<")


# the resumed run writes to a directory of its own on purpose: Lightning notes it keeps the old one's best path only
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_resumed_run_loads_the_model_as_the_checkpoint_says(tmp_path, tiny_model_dir, gsm8k_dir):
    from lightning.pytorch.cli import LightningCLI
    from test_train import make_config

    from grpo_lightning.train.cli import run

    quiet = ["--eval.before", "false", "--eval.after", "false", "--trainer.max_steps", "1"]
    first = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "eager", attn_implementation="eager", optimization={"mu": 1})
    ckpt = run(["fit", "--config", str(first), *quiet]).trainer.checkpoint_callback.last_model_path
    # a config that leaves the option at its default (sdpa where the model supports it)
    again = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "again", optimization={"mu": 1})
    resumed = run(["fit", "--config", str(again), *quiet[:4], "--trainer.max_steps", "2", "--ckpt_path", ckpt]).model
    # Lightning 2.6 reads a --ckpt_path checkpoint's hyperparameters over the config's; before, the config's stand
    if hasattr(LightningCLI, "_parse_ckpt_path"):
        assert resumed.hparams.attn_implementation == resumed.policy.config._attn_implementation == "eager"
    else:
        assert resumed.hparams.attn_implementation is None and resumed.policy.config._attn_implementation != "eager"
