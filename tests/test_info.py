"""Parameter counts of the published presets, and the `llama4 info` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llama4.config import get_preset
from llama4.info import count_parameters


@pytest.mark.parametrize(
    "preset, total, active",
    [("scout", 108.6e9, 17.2e9), ("maverick", 401.6e9, 17.2e9), ("behemoth", 2.0e12, 288e9)],
)
def test_published_sizes(preset, total, active):
    p = count_parameters(get_preset(preset))
    assert abs(p["total"] - total) / total < 0.02, p
    assert abs(p["text_active"] - active) / active < 0.02, p
    assert p["vision_total"] > 0


def test_global_and_moe_layers_of_presets():
    scout, maverick = get_preset("scout").text, get_preset("maverick").text
    assert scout.global_layers[:3] == (3, 7, 11) and len(scout.global_layers) == 12
    assert scout.moe_layers == tuple(range(48)) and scout.qk_norm
    assert maverick.moe_layers == tuple(range(1, 48, 2)) and not maverick.qk_norm


def test_info_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "llama4.cli", "info", "debug", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["architecture"]["global_layers"] == [3]
    assert info["parameters"]["text_active"] < info["parameters"]["text_total"]
