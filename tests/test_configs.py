"""Every YAML in configs/ parses against the CLI (hub ids are not loaded: parsing only)."""

from pathlib import Path

import pytest

from grpo_lightning.cli import GRPOCLI
from grpo_lightning.data import GSM8KDataModule
from grpo_lightning.module import GRPOModule
from grpo_lightning.warmup import SFTDataModule, SFTWarmup, WarmupCLI

class ParseOnly(GRPOCLI):
    """The real parser and validation, without loading models or data."""

    def instantiate_classes(self) -> None:
        pass


class WarmupParseOnly(WarmupCLI):
    def instantiate_classes(self) -> None:
        pass


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {c.name for c in CONFIGS}
    assert {"qwen2.5-0.5b-gsm8k.yaml", "cpu-gsm8k-tiny.yaml", "quickstart.yaml", "warmup-tiny.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# "), f"{config.name} should open with the command that runs it"
    if "grpo_lightning.warmup" in first:
        cli = WarmupParseOnly(SFTWarmup, SFTDataModule, run=False, args=["--config", str(config)])
    else:
        assert first.startswith("# grpo-lightning fit --config"), first
        cli = ParseOnly(GRPOModule, GSM8KDataModule, run=False, args=["--config", str(config)])
    assert cli.config.model.model_name_or_path  # parsed and type-checked against the signatures
