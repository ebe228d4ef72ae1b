"""The engine every trainer drives: the non-finite guard (skip, count, stop; never save NaN
weights), gradient checkpointing applied to every trained model, online included."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import ModelConfig, OptimConfig, RunConfig
from alignkit.numerics import NonFiniteError
from alignkit.train.loop import Trainer
from alignkit.train.sft import build_sft_task, sft_batch_loss


def _items(tokenizer, n=16):
    from alignkit.data import SFTExample, tokenize_records

    recs = [SFTExample(prompt=[{"role": "user", "content": f"Item {i}?"}],
                       completion=f"The colour of item {i} is {'red' if i % 2 else 'blue'}.") for i in range(n)]
    return tokenize_records(recs, tokenizer, max_length=64)[0]


def _trainer(tiny_dir, tokenizer, out, loss=sft_batch_loss, steps=4, **run):
    from alignkit.models.loading import load_causal_lm

    torch.manual_seed(0)
    task = build_sft_task(_items(tokenizer), [], tokenizer.pad_token_id, padding_free=False)
    task.loss = loss
    optim = OptimConfig(lr=1e-2, batch_size=4, max_steps=steps, warmup_ratio=0.0)
    return Trainer(load_causal_lm(ModelConfig(path=str(tiny_dir))), task, optim,
                   RunConfig(output_dir=str(out), progress=False, report_to="jsonl", **run))


def _bad_at(steps: set[int], how: str = "loss"):
    """The SFT loss, made non-finite at the given optimizer steps (1-based; one call per step):
    'loss' makes the value NaN; 'grad' keeps the value finite (0 added) but makes the gradient
    NaN (d/dx √|x| at 0 is inf, times abs's derivative 0)."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value, metrics = sft_batch_loss(model, batch)
        if calls["n"] in steps:
            if how == "loss":
                value = value * float("nan")
            else:
                p = next(model.parameters())
                value = value + torch.sqrt((p - p.detach()).abs()).sum()
        return value, metrics

    return loss


def _finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(tiny_dir, tiny_tokenizer, tmp_path, how):
    trainer = _trainer(tiny_dir, tiny_tokenizer, tmp_path, _bad_at({2}, how))
    result = trainer.fit()
    assert result.steps == 4
    assert [r["skipped_nonfinite"] for r in result.history] == [0, 1, 1, 1]
    assert _finite(trainer.unwrapped())  # without the guard AdamW turns NaN gradients into NaN weights
    rows = (tmp_path / "metrics.jsonl").read_text().count('"skipped_nonfinite"')
    assert rows == 4  # logged in metrics.jsonl too


def test_a_skipped_step_leaves_weights_and_optimizer_as_they_were(tiny_dir, tiny_tokenizer, tmp_path):
    """A run whose step 3 is non-finite ends where a run of 2 steps ends, but for the schedule."""
    skipped = _trainer(tiny_dir, tiny_tokenizer, tmp_path / "a", _bad_at({3}), steps=3)
    skipped.fit()
    short = _trainer(tiny_dir, tiny_tokenizer, tmp_path / "b", steps=3)
    short.fit(stop_after=2)
    a, b = skipped.unwrapped().state_dict(), short.unwrapped().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_consecutive_non_finite_steps_stop_the_run_and_save_nothing(tiny_dir, tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_dir, tiny_tokenizer, tmp_path, _bad_at({2, 3, 4}), steps=6, save_every=1,
                       max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row \(the last: step 4\).*lower optim.lr"):
        trainer.fit()
    # checkpoints only of the steps before the stop; the last one is step 3 (the skipped steps 2-3 kept the weights)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert not (tmp_path / "model.safetensors").exists()


def test_a_resumed_run_keeps_counting_in_a_row(tiny_dir, tiny_tokenizer, tmp_path):
    """The count of steps in a row survives a resume: 1 before the kill + 1 after stop at 2."""
    first = _trainer(tiny_dir, tiny_tokenizer, tmp_path, _bad_at({2}), steps=4, save_every=2, max_nonfinite_steps=2)
    first.fit(stop_after=2)
    resumed = _trainer(tiny_dir, tiny_tokenizer, tmp_path, _bad_at({1}), steps=4, resume=True, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        resumed.fit()


def test_the_final_save_refuses_non_finite_weights(tiny_dir, tiny_tokenizer, tmp_path):
    from alignkit.models.loading import save_model
    from alignkit.train.outputs import OutputError

    trainer = _trainer(tiny_dir, tiny_tokenizer, tmp_path, steps=1)
    trainer.fit()
    with torch.no_grad():
        trainer.unwrapped().lm_head.weight[0, 0] = float("inf")
    with pytest.raises(OutputError, match=r"non-finite weights \(.*lm_head.weight\); not saving it"):
        trainer.save_final(lambda out: save_model(trainer.unwrapped(), tiny_tokenizer, out))
    assert not (tmp_path / "model.safetensors").exists()


def test_cli_learning_rate_1e3_stops_with_a_clear_error_and_no_model(tiny_dir, tmp_path, capsys):
    """The reported case: optim.lr=1e3 used to exit 0 with a 100% NaN model."""
    from alignkit.cli import main
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Item {i}?", "chosen": f"Item {i} is red.",
                                                   "rejected": "I don't know."} for i in range(64)])
    code = main(["rm", f"model.path={tiny_dir}", f"data.path={data}", "optim.lr=1e3", "optim.batch_size=4",
                 f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "run.report_to=jsonl"])
    err = capsys.readouterr().err
    assert code == 1 and "optimizer steps in a row" in err and "non-finite" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_online_non_finite_rewards_skip_the_update_and_the_run_goes_on(tiny_dir, tmp_path):
    """GRPO whose reward is NaN on the first rollout: that rollout's update is skipped and logged,
    the next rollouts train, and the saved policy is finite."""
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.grpo import GRPOConfig, run_grpo
    from alignkit.train.online import RewardConfig, RolloutConfig

    calls = {"n": 0}

    def reward(prompt, response):
        calls["n"] += 1
        return float("nan") if calls["n"] <= 16 else float(len(response))

    cfg = GRPOConfig(model=ModelConfig(path=str(tiny_dir)),
                     optim=OptimConfig(lr=1e-3, batch_size=16, schedule="constant", warmup_ratio=0.0),
                     run=RunConfig(output_dir=str(tmp_path), progress=False, report_to="jsonl"),
                     sampling=SamplingConfig(max_new_tokens=6), reward=RewardConfig(unfinished_penalty=0.0),
                     rollout=RolloutConfig(prompts_per_rollout=4, samples_per_prompt=4, num_rollouts=3, ppo_epochs=1))
    prompts = [[{"role": "user", "content": f"Item {i}?"}] for i in range(8)]
    res = run_grpo(cfg, prompts, FunctionReward(reward))
    assert [r["skipped_nonfinite"] for r in res.history] == [1, 1, 1]
    assert _finite(load_causal_lm(ModelConfig(path=str(tmp_path))))


def test_gradient_checkpointing_is_applied_to_the_ppo_policy_and_critic(tiny_dir, tmp_path):
    """It used to be printed as on and never applied online. Now every checkpointable layer of
    the policy and of a separate critic recomputes, and the update is the same as without it."""
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train import ppo
    from alignkit.train.online import RewardConfig, RolloutConfig

    seen = {}
    real_loop = ppo.OnlineLoop

    def spy(*args, **kwargs):
        loop = real_loop(*args, **kwargs)
        model = loop.unwrapped()
        seen["layers"] = [getattr(layer, "gradient_checkpointing", False)
                          for part in (model.policy, model.critic) for layer in part.modules()
                          if type(layer).__name__.endswith("DecoderLayer")]
        return loop

    def run(out, checkpointing):
        cfg = ppo.PPOConfig(model=ModelConfig(path=str(tiny_dir)),
                            optim=OptimConfig(lr=1e-3, batch_size=8, schedule="constant", warmup_ratio=0.0),
                            run=RunConfig(output_dir=str(out), progress=False, report_to="jsonl",
                                          gradient_checkpointing=checkpointing),
                            sampling=SamplingConfig(max_new_tokens=8), reward=RewardConfig(unfinished_penalty=0.0),
                            rollout=RolloutConfig(prompts_per_rollout=8, num_rollouts=1, ppo_epochs=1))
        ppo.run_ppo(cfg, [[{"role": "user", "content": f"Item {i}?"}] for i in range(8)],
                    reward=FunctionReward(lambda p, r: float(len(r))))
        return load_causal_lm(ModelConfig(path=str(out))).state_dict()

    ppo.OnlineLoop = spy
    try:
        plain = run(tmp_path / "a", False)
        assert seen["layers"] and not any(seen["layers"])
        recomputed = run(tmp_path / "b", True)
        assert len(seen["layers"]) == 4 and all(seen["layers"])  # 2 policy + 2 critic layers
    finally:
        ppo.OnlineLoop = real_loop
    assert max(float((plain[k] - recomputed[k]).abs().max()) for k in plain) < 1e-6


def test_online_runs_evaluate_on_held_out_prompts(tiny_dir, tmp_path):
    """With data.eval_path, GRPO scores one response per held-out prompt every run.eval_every
    rollouts and after the last, through the engine's evaluation."""
    from alignkit.config import DataConfig
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.grpo import GRPOConfig, run_grpo
    from alignkit.train.online import RewardConfig, RolloutConfig
    from tests.conftest import write_jsonl

    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"Question {i}?"} for i in range(3)])
    cfg = GRPOConfig(model=ModelConfig(path=str(tiny_dir)), data=DataConfig(eval_path=str(held_out)),
                     optim=OptimConfig(lr=1e-3, batch_size=8, schedule="constant", warmup_ratio=0.0),
                     run=RunConfig(output_dir=str(tmp_path / "out"), progress=False, report_to="jsonl", eval_every=2),
                     sampling=SamplingConfig(max_new_tokens=6), reward=RewardConfig(unfinished_penalty=0.0),
                     rollout=RolloutConfig(prompts_per_rollout=2, samples_per_prompt=4, num_rollouts=3, ppo_epochs=1))
    res = run_grpo(cfg, [[{"role": "user", "content": f"Item {i}?"}] for i in range(4)],
                   FunctionReward(lambda p, r: float(len(r))))
    assert ["eval/reward" in r for r in res.history] == [False, True, True]
    assert {"eval/score", "eval/response_length", "eval/unfinished"} <= set(res.history[-1])
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("eval/reward") == 2


def test_a_checkpoint_is_renamed_into_place_only_after_every_process_wrote_its_files(tmp_path, monkeypatch):
    """Every process writes into the temporary folder (its RNG state; FSDP shards): the main
    process may rename it only after all are done (a 2-process FSDP run failed with "Parent
    directory .tmp-step-2 does not exist" on the slower process). Checked by the order of calls."""
    from types import SimpleNamespace

    from alignkit.train import engine as engine_mod

    events = []

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            events.append("wait")

        def save_state(self, path):
            events.append("save_state")
            __import__("os").makedirs(path, exist_ok=True)

    real_replace = engine_mod.os.replace
    monkeypatch.setattr(engine_mod.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    fake = SimpleNamespace(run=RunConfig(output_dir=str(tmp_path), keep_checkpoints=2), acc=Acc(), total_steps=4,
                           fingerprint={}, _state={}, skipped_nonfinite=0, _nonfinite_streak=0,
                           callbacks=SimpleNamespace(checkpoint=lambda *a: None))
    engine_mod.Engine.save_checkpoint(fake, 2)
    assert events.index("rename") > events.index("save_state") + 1  # a barrier between them
    assert "wait" in events[events.index("save_state") : events.index("rename")]
    assert (tmp_path / "checkpoints" / "step-2").is_dir()
