"""PPO on a tiny model with Python-function rewards: it learns, at a reported KL; the variants run;
PPO-ptx keeps the pretraining loss lower; the cost constraint holds; resume; the CLI."""

from __future__ import annotations

import shutil

import pytest
import torch

from alignkit.config import ModelConfig, OptimConfig, RunConfig
from alignkit.rollout.generate import SamplingConfig
from alignkit.rollout.rewards import FunctionReward
from alignkit.train.online import KLConfig, RewardConfig, RolloutConfig
from alignkit.train.ppo import PPOConfig, run_ppo

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(32)]


def digits(prompt, response: str) -> float:
    """Reward: the fraction of the response's characters that are digits."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


def odd_digits(prompt, response: str) -> float:
    """Cost: the fraction that are odd digits (so the constrained optimum uses even ones)."""
    return sum(c in "13579" for c in response) / max(1, len(response))



def _cfg(tiny_dir, out, rollouts=10, **kw) -> PPOConfig:
    cfg = PPOConfig(
        model=ModelConfig(path=str(tiny_dir)),
        optim=OptimConfig(lr=1e-2, batch_size=16, schedule="constant", warmup_ratio=0.0),
        run=RunConfig(output_dir=str(out), progress=False, report_to="jsonl"),
        sampling=SamplingConfig(max_new_tokens=16),
        reward=RewardConfig(unfinished_penalty=0.0),
        rollout=RolloutConfig(prompts_per_rollout=32, num_rollouts=rollouts, ppo_epochs=2),
        kl=KLConfig(kl_coef=0.01),
    )
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def _mean(history, key, rows):
    return sum(h[key] for h in history[rows]) / len(history[rows])


@pytest.fixture(scope="module")
def ppo_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    return run_ppo(_cfg(tiny_dir, out), PROMPTS, reward=FunctionReward(digits), cost=None)


def test_ppo_raises_the_reward_at_a_reported_kl(ppo_run):
    h = ppo_run.history
    start, end = h[0]["reward"], _mean(h, "reward", slice(-3, None))
    assert end > start + 0.06, (start, end)
    assert h[-1]["kl"] > 0.1 and h[-1]["kl_estimator"] == "k1"
    for key in ("reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "loss/value", "loss/policy",
                "explained_variance", "response_length", "time/generation", "time/scoring", "time/update", "tokens_per_s",
                "cpu/generation", "cpu/scoring", "cpu/update", "cpu/step"):
        assert key in h[-1], key
    # CPU seconds per phase, which add up to the step's (the benchmark's step split reads them)
    row = h[-1]
    assert all(row[f"cpu/{p}"] > 0 for p in ("generation", "scoring", "update"))
    assert abs(row["cpu/step"] - sum(row[f"cpu/{p}"] for p in ("generation", "scoring", "update"))) < 1e-9
    # the saved policy is a plain HF directory
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ppo_run.output_dir)
    assert (ppo_run.output_dir / "metrics.jsonl").read_text().count("\n") == len(h)


def test_ppo_variants_lora_shared_critic_adaptive_kl_penalty_in_loss(tiny_dir, tmp_path):
    """LoRA (reference = adapter-disabled base), a value head on the policy, k3 KL as a loss term
    (PPO-penalty) with the adaptive controller, value clipping off, grad accumulation."""
    cfg = _cfg(tiny_dir, tmp_path, rollouts=3, value_model="shared", clip_eps_value=0.0,
               kl=KLConfig(kl_coef=0.1, kl_estimator="k3", kl_penalty="loss", kl_control="adaptive",
                           target_kl=0.001, kl_horizon=100))
    cfg.model.lora, cfg.model.lora_r = True, 4
    cfg.optim.batch_size, cfg.optim.grad_accum = 8, 2
    cfg.rollout.prompts_per_rollout = 16
    res = run_ppo(cfg, PROMPTS[:16], reward=FunctionReward(digits))
    h = res.history
    assert [r["kl_estimator"] for r in h] == ["k3"] * 3 and "loss/kl" in h[-1]
    # rollout 1 is sampled from π_ref itself (KL 0 < target: β shrinks); then KL > target: β grows
    assert h[0]["kl"] == 0 and h[1]["kl"] > 0.001
    assert h[1]["kl_coef"] < h[0]["kl_coef"] and h[2]["kl_coef"] > h[1]["kl_coef"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in h)
    assert (res.output_dir / "adapter").exists() and (res.output_dir / "config.json").exists()


def test_ptx_lowers_the_pretraining_loss(tiny_dir, tiny_tokenizer, tmp_path):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.train.ppo import ptx_items
    from alignkit.train.sft import heldout_nll

    texts = [f"The colour of item {i} is {'red' if i % 2 else 'blue'}." for i in range(16)]
    nll = {}
    for coef in (0.0, 1.0):
        cfg = _cfg(tiny_dir, tmp_path / f"ptx{coef}", rollouts=4, ptx_coef=coef)
        cfg.rollout.prompts_per_rollout = 16
        res = run_ppo(cfg, PROMPTS, reward=FunctionReward(digits), ptx_texts=texts)
        model = load_causal_lm(ModelConfig(path=str(res.output_dir)), trainable=False)
        nll[coef] = heldout_nll(model, ptx_items(tiny_tokenizer, texts, cfg), tiny_tokenizer.pad_token_id)["nll"]
        if coef:
            assert "ptx/nll" in res.history[-1]
    assert nll[1.0] < nll[0.0] - 0.5, nll


def test_cost_constraint_keeps_the_cost_under_its_threshold(tiny_dir, tmp_path, ppo_run):
    """Reward: digits; cost: odd digits. Unconstrained PPO (same reward) drives the cost far above
    the threshold; with the learned Lagrange multiplier the cost stays below it while the reward
    still rises (through even digits)."""
    threshold = 0.04
    cfg = _cfg(tiny_dir, tmp_path, cost_threshold=threshold, lagrange_init=1.0, lagrange_lr=2.0)
    res = run_ppo(cfg, PROMPTS, reward=FunctionReward(digits), cost=FunctionReward(odd_digits))
    h = res.history
    costs = [r["cost"] for r in h]
    assert _mean(h, "cost", slice(-3, None)) <= threshold and max(costs) <= 1.25 * threshold, costs
    assert h[-1]["lambda"] != h[0]["lambda"]  # λ is learned
    assert _mean(h, "reward", slice(-3, None)) > h[0]["reward"] + 0.03
    # The constraint is what keeps the cost down: the unconstrained run (same reward, same start)
    # more than triples the start's odd digits and ends above the bound, where the constrained
    # policy stays below it; all three sampled the same way.
    unconstrained = torch.tensor([odd_digits(None, t) for t in _sample(ppo_run.output_dir, tiny_dir)]).mean()
    constrained = torch.tensor([odd_digits(None, t) for t in _sample(res.output_dir, tiny_dir)]).mean()
    start = torch.tensor([odd_digits(None, t) for t in _sample(tiny_dir, tiny_dir)]).mean()
    print(f"sampled cost: start {float(start):.3f}, unconstrained {float(unconstrained):.3f}, constrained {float(constrained):.3f}")
    # (measured: start 0.022, unconstrained 0.076, constrained 0.039, with per-sample streams)
    assert unconstrained > 3 * start and unconstrained > 1.5 * threshold, (float(start), float(unconstrained))
    assert constrained < unconstrained, (float(constrained), float(unconstrained))


def _sample(policy_dir, tiny_dir):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm, load_tokenizer
    from alignkit.rollout.generate import HFGenerator

    model = load_causal_lm(ModelConfig(path=str(policy_dir)), trainable=False)
    gen = HFGenerator(model, load_tokenizer(str(tiny_dir)), SamplingConfig(max_new_tokens=16))
    return gen.generate(PROMPTS, n=8, seed=1).texts  # 8 per prompt: a mean over 2 was too noisy to test against


def test_resume_continues_exactly(tiny_dir, tmp_path, capsys):
    from alignkit.models.loading import load_causal_lm

    cfg = _cfg(tiny_dir, tmp_path / "run", rollouts=2)
    cfg.rollout.prompts_per_rollout, cfg.run.save_every = 8, 1
    full = run_ppo(cfg, PROMPTS, reward=FunctionReward(digits))
    shutil.copytree(full.output_dir, tmp_path / "full")
    cfg.run.resume = True  # continues from the checkpoint after rollout 1 and redoes rollout 2
    resumed = run_ppo(cfg, PROMPTS, reward=FunctionReward(digits))
    assert "at rollout 1/2" in capsys.readouterr().out
    a = load_causal_lm(ModelConfig(path=str(tmp_path / "full"))).state_dict()
    b = load_causal_lm(ModelConfig(path=str(resumed.output_dir))).state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert [r["rollout"] for r in resumed.history] == [1, 2]
    assert resumed.history[1]["reward"] == pytest.approx(full.history[1]["reward"])


def test_cli_ppo_with_a_reward_model_directory(tiny_dir, tmp_path):
    from alignkit.cli import main
    from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model
    from tests.conftest import write_jsonl

    rm = save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), tmp_path / "rm")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Item {i}?", "chosen": "red", "rejected": "blue"} for i in range(6)])
    code = main(["ppo", f"model.path={tiny_dir}", f"data.path={data}", f"reward_models=[{rm}]", "num_rollouts=1",
                 "prompts_per_rollout=4", "ppo_epochs=1", "optim.batch_size=4", "max_new_tokens=8",
                 f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "run.report_to=jsonl"])
    assert code == 0 and (tmp_path / "out" / "config.json").exists()
