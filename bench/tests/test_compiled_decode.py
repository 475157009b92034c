"""The decoding levers' bench (bench/compiled_decode.py) runs its oneDNN ways on the tiny geometry and prints them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `bench`

from bench import compiled_decode  # noqa: E402
from grpo_lightning.fast.kernels import onednn_available  # noqa: E402


@pytest.mark.skipif(not onednn_available(), reason="needs torch's oneDNN (mkldnn) CPU kernels")
def test_onednn_ways_run_and_print_seconds(tmp_path, capsys):
    ways = ["dynamic cache", "oneDNN, head reordered", "oneDNN, every weight reordered"]
    compiled_decode.main(["--tiny", "--layers", "2", "--rows", "2", "--prompt-tokens", "5", "--tokens", "3",
                          "--cache-dir", str(tmp_path), "--ways", *ways])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 layers, 2 rows × 3 new tokens after 5")
    for way, line in zip(ways, lines[1:], strict=True):
        assert line.split("  ")[1].strip() == way and "ms a token at best" in line
