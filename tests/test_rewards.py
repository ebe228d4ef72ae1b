"""Reward sources: functions, weighted sums, Llama 2 safety gating, whitening, clipping."""

import pytest
import torch

from alignkit.rollout.rewards import Clipped, FunctionReward, SafetyGated, WeightedSum, Whitened

P = [{"role": "user", "content": "q"}]


def const_by_text(table):
    return FunctionReward(lambda prompt, response: table[response])


def test_function_and_weighted_sum():
    a = const_by_text({"x": 1.0, "y": 2.0})
    b = const_by_text({"x": -1.0, "y": 4.0})
    s = WeightedSum([(a, 0.5), (b, 2.0)])
    assert s([P, P], ["x", "y"]).tolist() == pytest.approx([0.5 - 2.0, 1.0 + 8.0])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        a([P, P], ["x"])


def test_safety_gating_follows_llama2_eq4():
    helpful = const_by_text({"a": 3.0, "b": 3.0, "c": 1.0})
    safety = const_by_text({"a": 0.9, "b": -0.5, "c": 0.5})
    flagged = {"bad prompt"}
    gate = SafetyGated(helpful, safety, threshold=0.15, is_unsafe_prompt=lambda p: p[-1]["content"] in flagged)
    prompts = [P, P, [{"role": "user", "content": "bad prompt"}]]
    out = gate(prompts, ["a", "b", "c"])
    # a: safe prompt, safety above threshold -> helpfulness; b: safety below threshold -> safety;
    # c: flagged prompt -> safety whatever its value
    assert out.tolist() == pytest.approx([3.0, -0.5, 0.5])


def test_whitened_and_clipped():
    src = const_by_text({"a": 1.0, "b": 3.0, "c": 5.0})
    w = Whitened(src).fit([P] * 3, ["a", "b", "c"])
    out = w([P] * 3, ["a", "b", "c"])
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-6) and float(out.std()) == pytest.approx(1.0, abs=1e-5)
    assert Clipped(src, -2, 2)([P] * 3, ["a", "b", "c"]).tolist() == [1.0, 2.0, 2.0]
    assert isinstance(out, torch.Tensor)
