"""The examples run through the Python API, on a tiny model (``--tiny``), as CI runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("examples")  # shared: the tiny base model is built once


def test_sft_then_dpo(out):
    sft, dpo = _load("sft_then_dpo").main(["--tiny", "--out", str(out / "a"), "--steps", "2"])
    assert sft.output_dir == out / "a" / "sft" and dpo.output_dir == out / "a" / "dpo"
    assert "eval/accuracy" in dpo.eval_metrics or dpo.stopped_at
    for stage in (sft, dpo):
        assert (stage.output_dir / "model.safetensors").exists() and (stage.output_dir / "README.md").exists()
    card = (dpo.output_dir / "README.md").read_text()
    assert f"base_model: {sft.output_dir}" in card and "alignkit.dpo(model=<" in card  # chained from the SFT stage


def test_sft_rm_grpo(out):
    sft, rm, grpo = _load("sft_rm_grpo").main(["--tiny", "--out", str(out / "b"), "--steps", "2"])
    config = json.loads((rm.output_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert len(grpo.history) == 2 and "reward" in grpo.history[-1]
    saved = (grpo.output_dir / "alignkit_config.yaml").read_text()
    assert str(rm.output_dir) in saved  # the reward model beside the Python reward


def test_python_reward_of_the_examples():
    common = _load("_common")
    prompts = [[{"role": "user", "content": common.prompt(i)}] for i in range(3)]
    assert common.says_the_colour(prompts, ["Item 0 is red.", "It is red.", "Item 2 is green."]) == [1.0, 0.0, 1.0]
