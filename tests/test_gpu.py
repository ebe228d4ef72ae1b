"""Checks that need a CUDA GPU; skipped without one. The rest of the suite hides GPUs (its
references are exact CPU computations: tests/conftest.py), so these run only with
``ALIGNKIT_TEST_GPU=1 python -m pytest tests/test_gpu.py`` on a machine with one (README, Tests
on a GPU). ``ALIGNKIT_GPU_TEST_DEVICE=cpu`` runs them on the CPU instead, to check the tests'
own logic on a machine without a GPU.

* every command trains on the GPU under ``mixed_precision=auto`` (bf16 there): exit 0, finite
  losses and weights, and DPO's first loss exactly ln 2 (policy and copied reference run the
  same bf16 forward, so their log-ratio is 0);
* a reference copied on the CPU follows the policy onto the GPU and gives its log-probs exactly;
* in float32 the GPU keeps the loop's accumulation invariance (one batch of 8 = four of 2).

The fast batchings on the GPU are tests/test_conformance.py with
``ALIGNKIT_CONFORMANCE_DEVICE=cuda`` (float64 and float32).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from alignkit.cli import main
from alignkit.config import ModelConfig, OptimConfig, RunConfig
from alignkit.models.loading import Reference, load_causal_lm
from alignkit.train.dpo import BATCHINGS
from alignkit.train.loop import Trainer
from alignkit.train.sft import build_sft_task

from conftest import write_jsonl
from test_api import BASE, COMMON, METHODS, PAIR_ROWS, rm_dir  # noqa: F401 (a fixture: a tiny reward model)
from test_loop import _items, _max_diff

DEVICE = torch.device(os.environ.get("ALIGNKIT_GPU_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (and ALIGNKIT_TEST_GPU=1, which shows it to the suite)")


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_command_trains_on_the_gpu(method, tiny_dir, rm_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    rows, extra, _ = METHODS[method]
    if method in ("ppo", "grpo", "rloo", "rs"):
        extra = [*extra, f"reward.reward_models=[{rm_dir}]"]
    common = BASE if method in ("ppo", "grpo", "rloo") else COMMON
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    assert main([method, f"model.path={tiny_dir}", f"data.path={data}", f"run.output_dir={out}", *common, *extra]) == 0
    printed = capsys.readouterr().out
    assert f"device={DEVICE.type}" in printed, printed[-2000:]
    if DEVICE.type == "cuda":
        assert "mixed_precision=bf16" in printed, printed[-2000:]
    metrics = _rows(out / "metrics.jsonl")
    losses = [v for r in metrics for k, v in r.items() if k == "loss" or k.endswith("/loss")]  # rs: sft/loss
    assert losses and all(math.isfinite(x) for x in losses), losses
    if method == "dpo":
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_a_copied_reference_follows_the_policy_onto_the_gpu(tiny_dir, tiny_tokenizer):
    from alignkit.data import PreferencePair, tokenize_records

    policy = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    reference = Reference(policy, "copy")  # copied where the policy was loaded: the CPU
    policy.to(DEVICE)  # as a Trainer prepares it
    pairs = [PreferencePair(prompt=[{"role": "user", "content": r["prompt"]}], chosen=r["chosen"], rejected=r["rejected"])
             for r in PAIR_ROWS]
    items, _ = tokenize_records(pairs, tiny_tokenizer, max_length=48, max_prompt_length=24)
    batching = BATCHINGS["padded"]
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
             for k, v in batching.collate(items, tiny_tokenizer.pad_token_id).items()}
    with torch.no_grad(), reference.active() as ref:
        assert next(ref.parameters()).device.type == DEVICE.type
        got = batching.logps(ref, batch)[0]
        want = batching.logps(policy, batch)[0]
    assert torch.equal(got, want)


def test_accumulation_split_gives_the_same_update_in_float32(tiny_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """tests/test_loop.py's invariance, on the GPU in float32 (its bound: 1% of one step)."""
    from accelerate.state import AcceleratorState

    # accelerate allows one precision per process, and the runs above took bf16: as in a fresh process
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})

    def train(out, batch_size, grad_accum):
        torch.manual_seed(0)
        items = _items(tiny_tokenizer)
        task = build_sft_task(items, [], tiny_tokenizer.pad_token_id, padding_free=False)
        optim = OptimConfig(lr=1e-2, batch_size=batch_size, grad_accum=grad_accum, max_steps=3, warmup_ratio=0.0)
        run = RunConfig(output_dir=str(out), progress=False, report_to="jsonl", mixed_precision="no")
        trainer = Trainer(load_causal_lm(ModelConfig(path=str(tiny_dir))), task, optim, run)
        result = trainer.fit()
        assert next(trainer.unwrapped().parameters()).device.type == DEVICE.type
        return trainer.unwrapped(), result

    big, r1 = train(tmp_path / "a", 8, 1)
    small, r2 = train(tmp_path / "b", 2, 4)
    assert _max_diff(big, small) < 1e-4
    assert abs(r1.history[-1]["loss"] - r2.history[-1]["loss"]) < 1e-5
