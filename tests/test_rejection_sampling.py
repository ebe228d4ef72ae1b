"""Rejection sampling: best-of-N selection, the SFT items built from it, learning, the CLI."""

from __future__ import annotations

import pytest
import torch

from alignkit.config import ModelConfig, OptimConfig, RunConfig
from alignkit.data import IGNORE_INDEX
from alignkit.rollout.generate import Generations, HFGenerator, SamplingConfig
from alignkit.rollout.rewards import FunctionReward
from alignkit.train.online import RewardConfig
from alignkit.train.rejection_sampling import RSConfig, run_rs, select_best, sft_items_from

PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(16)]


def digits(prompt, response: str) -> float:
    return sum(c.isdigit() for c in response) / max(1, len(response))



def test_select_best_keeps_the_argmax_of_each_group_and_trains_on_its_tokens():
    gens = Generations(prompt_ids=[[5, 6]] * 3 + [[7]] * 3, response_ids=[[10, 1], [11, 1], [12], [13, 1], [14, 1], [15, 1]],
                       texts=["a", "b", "c", "d", "e", "f"], finished=[True, True, False, True, True, True],
                       prompt_index=[0, 0, 0, 1, 1, 1])
    rows, best = select_best(gens, torch.tensor([0.1, 0.9, 0.5, 2.0, -1.0, 1.0]), n=3)
    assert rows == [1, 3] and best.tolist() == pytest.approx([0.9, 2.0])
    items = sft_items_from(gens, rows)
    assert items[0] == {"input_ids": [5, 6, 11, 1], "labels": [IGNORE_INDEX, IGNORE_INDEX, 11, 1], "length": 4}


def _mean_reward(policy_dir, tokenizer_dir) -> float:
    from alignkit.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(ModelConfig(path=str(policy_dir)), trainable=False)
    gen = HFGenerator(model, load_tokenizer(str(tokenizer_dir)), SamplingConfig(max_new_tokens=16))
    texts = gen.generate(PROMPTS, n=4, seed=123).texts
    return sum(digits(None, t) for t in texts) / len(texts)


def test_rejection_sampling_raises_the_reward(tiny_dir, tmp_path):
    cfg = RSConfig(
        model=ModelConfig(path=str(tiny_dir)),
        optim=OptimConfig(lr=1e-2, batch_size=8, epochs=10, warmup_ratio=0.0, schedule="constant"),
        run=RunConfig(output_dir=str(tmp_path), progress=False, report_to="jsonl"),
        sampling=SamplingConfig(max_new_tokens=16, temperature=1.0),
        reward=RewardConfig(unfinished_penalty=0.0),
        num_samples=8, rounds=2,
    )
    res = run_rs(cfg, PROMPTS, FunctionReward(digits))
    h = res.history
    assert [r["round"] for r in h] == [1, 2] and all(r["kept"] == len(PROMPTS) for r in h)
    assert h[0]["reward/best"] > h[0]["reward/mean"]
    assert h[1]["reward/mean"] > h[0]["reward/mean"]  # round 2 samples from the improved policy
    before, after = _mean_reward(tiny_dir, tiny_dir), _mean_reward(res.output_dir, tiny_dir)
    assert after > before + 0.04, (before, after)
    assert (tmp_path / "round-1" / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").exists()


def test_cli(tiny_dir, tmp_path):
    from alignkit.cli import main
    from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model
    from tests.conftest import write_jsonl

    rm = save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), tmp_path / "rm")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Item {i}?", "chosen": "a", "rejected": "b"} for i in range(3)])
    code = main(["rs", f"model.path={tiny_dir}", f"data.path={data}", f"reward_models=[{rm}]", "num_samples=2",
                 "max_new_tokens=6", f"run.output_dir={tmp_path / 'out'}", "run.progress=false"])
    assert code == 0 and (tmp_path / "out" / "config.json").exists()
    # A second run into the finished folder is refused; run.overwrite replaces the model.
    assert main(["rs", f"model.path={tiny_dir}", f"data.path={data}", f"reward_models=[{rm}]", "num_samples=2",
                 "max_new_tokens=6", f"run.output_dir={tmp_path / 'out'}", "run.progress=false"]) == 1
    assert main(["rs", f"model.path={tiny_dir}", f"data.path={data}", f"reward_models=[{rm}]", "num_samples=2",
                 "max_new_tokens=6", f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "run.overwrite=true"]) == 0

