"""GRPO and RLOO on a tiny model with a Python-function reward; the advantage table; the CLI."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import ModelConfig, OptimConfig, RunConfig
from alignkit.rollout.generate import SamplingConfig
from alignkit.rollout.rewards import FunctionReward
from alignkit.train.grpo import ADVANTAGES, GRPOConfig, RLOOConfig, run_grpo, run_rloo
from alignkit.train.online import KLConfig, RewardConfig, RolloutConfig

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(32)]


def digits(prompt, response: str) -> float:
    """Reward: the fraction of the response's characters that are digits."""
    return sum(c.isdigit() for c in response) / max(1, len(response))



def _cfg(cls, tiny_dir, out, rollouts=10, **kw):
    cfg = cls(
        model=ModelConfig(path=str(tiny_dir)),
        optim=OptimConfig(lr=1e-2, batch_size=16, schedule="constant", warmup_ratio=0.0),
        run=RunConfig(output_dir=str(out), progress=False, report_to="jsonl"),
        sampling=SamplingConfig(max_new_tokens=16),
        reward=RewardConfig(unfinished_penalty=0.0),
        rollout=RolloutConfig(prompts_per_rollout=8, samples_per_prompt=4, num_rollouts=rollouts, ppo_epochs=1),
    )
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def _late(history, key="reward"):
    return sum(h[key] for h in history[-3:]) / 3


def test_grpo_raises_the_reward_at_a_reported_kl(tiny_dir, tmp_path):
    res = run_grpo(_cfg(GRPOConfig, tiny_dir, tmp_path), PROMPTS, FunctionReward(digits))
    h = res.history
    assert _late(h) > h[0]["reward"] + 0.06, [r["reward"] for r in h]
    assert h[-1]["kl"] > 0.1 and h[-1]["kl_estimator"] == "k3" and "loss/kl" in h[-1]
    for key in ("entropy", "clipfrac", "approx_kl", "response_length", "reward/group_std", "time/update"):
        assert key in h[-1], key
    assert (res.output_dir / "config.json").exists()


def test_rloo_raises_the_reward(tiny_dir, tmp_path):
    cfg = _cfg(RLOOConfig, tiny_dir, tmp_path, rollouts=12, kl=KLConfig(kl_coef=0.001, kl_estimator="k1", kl_penalty="reward"))
    cfg.optim.lr = 2e-2
    res = run_rloo(cfg, PROMPTS, FunctionReward(digits))
    h = res.history
    assert _late(h) > h[0]["reward"] + 0.04, [r["reward"] for r in h]
    assert h[-1]["kl_estimator"] == "k1" and "loss/kl" not in h[-1]  # the KL is in the reward


def test_advantage_table():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    cfg = GRPOConfig()
    rloo = ADVANTAGES["rloo"](scores, 4, cfg)
    assert torch.allclose(rloo[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 2.0]))
    assert torch.allclose(rloo.view(2, 4).sum(1), torch.zeros(2), atol=1e-6)  # leave-one-out sums to 0
    grpo = ADVANTAGES["grpo"](scores, 4, cfg)
    assert torch.allclose(grpo.view(2, 4).mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(grpo.view(2, 4).std(1), torch.ones(2), atol=1e-3)
    cfg.scale_rewards = False  # Dr. GRPO: centring only
    assert torch.allclose(ADVANTAGES["grpo"](scores, 4, cfg)[:4], torch.tensor([-2.0, -1.0, 0.0, 3.0]))


def test_config_is_checked():
    with pytest.raises(ValueError, match="group size"):
        GRPOConfig(rollout=RolloutConfig(samples_per_prompt=1)).validate()
    with pytest.raises(ValueError, match="advantage"):
        GRPOConfig(advantage="ppo").validate()
    with pytest.raises(ValueError, match="zero expected gradient"):
        GRPOConfig(kl=KLConfig(kl_estimator="k1", kl_penalty="loss")).validate()


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_cli(command, tiny_dir, tmp_path):
    from alignkit.cli import main
    from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model
    from tests.conftest import write_jsonl

    rm = save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), tmp_path / "rm")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Item {i}?", "completion": "red"} for i in range(4)])
    code = main([command, f"model.path={tiny_dir}", f"data.path={data}", f"reward_models=[{rm}]", "weights=[2.0]",
                 "reward.whiten=true", "num_rollouts=1", "prompts_per_rollout=2", "samples_per_prompt=2",
                 "optim.batch_size=4", "max_new_tokens=6", f"run.output_dir={tmp_path / 'out'}", "run.progress=false"])
    assert code == 0 and (tmp_path / "out" / "config.json").exists()
