"""Many processes, one result: 2 processes (gloo, CPU) equal 1 process with the same global batch.

``accelerate launch --multi_gpu --num_processes 2`` runs this file as a script (the ``__main__``
block below: on a machine without CUDA accelerate runs DDP over gloo on the CPU); it trains SFT,
a pairwise reward model and DPO with 2 processes × batch 2 × 2 accumulation steps and saves the
weights and the loss of every step. The tests train the same tasks in this process with batch 8 ×
1 (the same global batch of 8) and compare. The data (17 items, global batch 8) ends each epoch
with a batch of one example, so one process has nothing in that step (it runs a zero-weighted
batch) and the other runs one micro-batch: the awkward case is covered too.

The same launch then runs GRPO (4 prompts × 4 samples) and PPO (5 prompts: 3 on one process, 2
on the other) for 2 rollouts, each rollout one minibatch, against 1 process with the same
minibatch. Sampling is made a function of the prompt alone in both runs
(:func:`per_prompt_sampling`), so the comparison covers everything after sampling: scoring,
log-probs, advantages, the split minibatch update and the logged means.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KINDS = ("sft", "rm", "dpo")
ONLINE = ("grpo", "ppo")
N_ITEMS, STEPS, LR = 17, 4, 1e-3  # 17 = 8 + 8 + 1: the third step has a single example


# ---- the runs (used both by the tests and by the launched processes) ----------------------------


def _sft_items(tokenizer):
    from alignkit.data import SFTExample, tokenize_records

    recs = [SFTExample(prompt=[{"role": "user", "content": f"Item {i}?"}],
                       completion=("The colour of item %d is %s. " % (i, "red" if i % 2 else "blue")) * (1 + i % 3))
            for i in range(N_ITEMS)]
    return tokenize_records(recs, tokenizer, max_length=64)[0]


def _pair_items(tokenizer):
    from alignkit.data import PreferencePair, tokenize_records

    recs = [PreferencePair(prompt=[{"role": "user", "content": f"What colour is item {i}?"}],
                           chosen=f"Item {i} is {'red' if i % 2 else 'blue'}." + " Sure." * (i % 3),
                           rejected="I don't know." * (1 + i % 2), margin=float(i % 3))
            for i in range(N_ITEMS)]
    return tokenize_records(recs, tokenizer, max_length=64)[0]


def train(kind: str, tiny_dir: str, out: str, batch_size: int, grad_accum: int):
    """Train ``kind`` for STEPS steps; returns (trainer, result, initial weights)."""
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.models.loading import load_tokenizer
    from alignkit.train.loop import Task, Trainer

    tokenizer = load_tokenizer(tiny_dir)
    pad = tokenizer.pad_token_id
    model_cfg = ModelConfig(path=tiny_dir)
    optim = OptimConfig(lr=LR, batch_size=batch_size, grad_accum=grad_accum, max_steps=STEPS, warmup_ratio=0.0,
                        schedule="constant")
    run = RunConfig(output_dir=out, progress=False, report_to="jsonl", seed=3)
    torch.manual_seed(0)
    if kind == "sft":
        from alignkit.models.loading import load_causal_lm
        from alignkit.train.sft import build_sft_task

        model, task = load_causal_lm(model_cfg), build_sft_task(_sft_items(tokenizer), [], pad, padding_free=False)
    elif kind == "rm":
        from alignkit.data import collate_pairs
        from alignkit.models.heads import ScalarHead
        from alignkit.models.loading import load_scalar_head_model
        from alignkit.train.rm import pairwise_batch_loss

        model = ScalarHead(load_scalar_head_model(model_cfg))
        task = Task(items=_pair_items(tokenizer), collate=lambda b: collate_pairs(b, pad),
                    loss=pairwise_batch_loss(True), units=lambda b: float(b["weight"].sum()), name="rm")
    elif kind == "dpo":
        from alignkit.models.loading import load_causal_lm
        from alignkit.train.dpo import DPOConfig, build_dpo_task

        cfg = DPOConfig(model=model_cfg, optim=optim, run=run, beta=0.5, reference="copy")
        model = load_causal_lm(model_cfg)
        task, _ = build_dpo_task(cfg, model, _pair_items(tokenizer), [], pad)
    else:
        raise ValueError(kind)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, task, optim, run)
    return trainer, trainer.fit(), initial


def per_prompt_sampling(seed_of=lambda prompt: sum(map(ord, json.dumps(prompt)))):
    """Make sampling a function of each prompt alone (its own seed, its own ``generate`` call).

    Real runs draw each process's samples from that process's random stream, so a 2-process run
    samples *different* (equally distributed) responses than a 1-process run; for a bitwise
    comparison of everything after sampling, both runs sample each prompt the same way here.
    """
    from alignkit.rollout.generate import Generations, HFGenerator, encode_prompts
    from alignkit.train.online import PROCESS_SEED_STRIDE

    def generate(self, prompts, n=1, seed=None):
        rollout_seed = (seed or 0) % PROCESS_SEED_STRIDE  # the same on every process
        parts = [HFGenerator.generate_ids(self, [ids], n=n, seed=seed_of(p) + rollout_seed)
                 for p, ids in zip(prompts, encode_prompts(self.tokenizer, prompts))]
        return Generations(
            [x for g in parts for x in g.prompt_ids], [x for g in parts for x in g.response_ids],
            [x for g in parts for x in g.texts], [x for g in parts for x in g.finished],
            [i for i, g in enumerate(parts) for _ in g.prompt_index])

    return generate


def train_online(kind: str, tiny_dir: str, out: str, batch_size: int, grad_accum: int):
    """GRPO (4 prompts × 4 samples) or PPO (5 prompts: an uneven split over 2 processes) for 2
    rollouts, each rollout one minibatch (so the minibatch is the same set of episodes however
    it is split); returns the run's history. The policy is saved in ``out``."""
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.online import RewardConfig, RolloutConfig

    def digits(prompt, response):
        return sum(c.isdigit() for c in response) / max(1, len(response))

    common = dict(model=ModelConfig(path=tiny_dir),
                  optim=OptimConfig(lr=LR, batch_size=batch_size, grad_accum=grad_accum, schedule="constant",
                                    warmup_ratio=0.0),
                  run=RunConfig(output_dir=out, progress=False, report_to="jsonl", seed=3),
                  sampling=SamplingConfig(max_new_tokens=8), reward=RewardConfig(unfinished_penalty=0.5))
    prompts = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(10)]
    if kind == "grpo":
        from alignkit.train.grpo import GRPOConfig, run_grpo

        cfg = GRPOConfig(**common, rollout=RolloutConfig(prompts_per_rollout=4, samples_per_prompt=4, num_rollouts=2,
                                                         ppo_epochs=2))
        return run_grpo(cfg, prompts, FunctionReward(digits)).history
    from alignkit.train.ppo import PPOConfig, run_ppo

    # Advantage whitening on (the default): a whole-rollout statistic over all processes' shares.
    cfg = PPOConfig(**common, rollout=RolloutConfig(prompts_per_rollout=5, num_rollouts=2, ppo_epochs=2),
                    value_model="shared", whiten_advantages=True)
    return run_ppo(cfg, prompts, FunctionReward(digits)).history


def _worker(tiny_dir: str, out: str) -> None:
    """Entry point of each launched process: train every kind with 2 × 2 and save the results."""
    torch.set_num_threads(1)
    for kind in KINDS:
        trainer, result, _ = train(kind, tiny_dir, str(Path(out) / kind), batch_size=2, grad_accum=2)
        assert trainer.acc.num_processes == 2, "expected 2 processes"
        if trainer.acc.is_main_process:
            state = {k: v.detach().cpu() for k, v in trainer.unwrapped().state_dict().items()}
            torch.save(state, Path(out) / f"{kind}.pt")
            (Path(out) / f"{kind}.json").write_text(json.dumps(result.history))
        trainer.acc.wait_for_everyone()
    from alignkit.rollout.generate import HFGenerator

    HFGenerator.generate = per_prompt_sampling()
    for kind in ONLINE:
        history = train_online(kind, tiny_dir, str(Path(out) / kind), batch_size=4 if kind == "grpo" else 2, grad_accum=2)
        if int(os.environ.get("RANK", "0")) == 0:
            (Path(out) / f"{kind}.json").write_text(json.dumps(history))
    # The whole-rollout whitening PPO needs (OnlineLoop.whiten), each process holding every other row.
    from alignkit.train.online import OnlineLoop

    rank = int(os.environ["RANK"])
    x, mask = _whiten_inputs()
    torch.save(OnlineLoop.whiten(None, x[rank::2], mask[rank::2]), Path(out) / f"whiten-{rank}.pt")


def _whiten_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(7, 5, generator=gen) * 3 + 1, (torch.rand(7, 5, generator=gen) > 0.3).float()


# ---- the tests ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    def launch():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), __file__, str(tiny_dir), str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    proc = launch()
    # The free port can be taken between choosing it and the launch binding it (other jobs share
    # the machine): one retry on a new port for that case only, any other failure fails the test.
    if proc.returncode != 0 and re.search(r"address already in use|EADDRINUSE", proc.stderr, re.IGNORECASE):
        proc = launch()
    assert proc.returncode == 0, f"2-process run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "processes=2" in proc.stdout, proc.stdout[-2000:]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_equal_one(kind, two_process_run, tiny_dir, tmp_path):
    single, result, initial = train(kind, str(tiny_dir), str(tmp_path / kind), batch_size=8, grad_accum=1)
    assert single.acc.num_processes == 1
    one = single.unwrapped().state_dict()
    two = torch.load(two_process_run / f"{kind}.pt")
    history = json.loads((two_process_run / f"{kind}.json").read_text())

    # The same loss at every step (each step's loss is over the whole global batch) ...
    assert [round(h["loss"], 5) for h in history] == [round(h["loss"], 5) for h in result.history]
    # ... and the same weights. The parameters moved by ~STEPS × LR; float32 summation order
    # differs (DDP's all-reduce, padding to different widths), and Adam's g/√v turns that noise on
    # near-zero gradients into up to one LR-sized step, so the bound is a fraction of LR.
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    print(f"{kind}: max |1-process − 2-process| = {diff:.2e}, max change from the start = {moved:.2e}")
    assert moved > LR  # the runs did train
    assert diff < 0.05 * LR, diff


@pytest.mark.parametrize("kind", ONLINE)
def test_two_processes_equal_one_online(kind, two_process_run, tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from alignkit.rollout.generate import HFGenerator

    monkeypatch.setattr(HFGenerator, "generate", per_prompt_sampling())
    # The same global minibatch: 1 process × batch 8 (grpo: 16) vs 2 processes × batch 2 (4) × 2.
    history = train_online(kind, str(tiny_dir), str(tmp_path / kind), batch_size=16 if kind == "grpo" else 5, grad_accum=1)
    two_history = json.loads((two_process_run / f"{kind}.json").read_text())
    for key in ("reward", "loss", "kl"):
        assert [round(h[key], 5) for h in two_history] == [round(h[key], 5) for h in history], key
    one = load_file(tmp_path / kind / "model.safetensors")
    two = load_file(two_process_run / kind / "model.safetensors")
    initial = load_file(tiny_dir / "model.safetensors")
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    print(f"{kind}: max |1-process − 2-process| = {diff:.2e}, max change from the start = {moved:.2e}")
    assert moved > LR
    assert diff < 0.05 * LR, diff


def test_whitening_over_all_processes_equals_whitening_the_whole_rollout(two_process_run):
    from alignkit.ops import masked_whiten

    x, mask = _whiten_inputs()
    expected = masked_whiten(x, mask)
    for rank in (0, 1):
        got = torch.load(two_process_run / f"whiten-{rank}.pt")
        assert torch.allclose(got, expected[rank::2], atol=1e-5)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
