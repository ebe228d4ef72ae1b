"""Callbacks: called with the logged metrics on step, evaluation, checkpoint and end; a stop request
ends the run with a resumable checkpoint, and resuming reaches the uninterrupted run's weights;
EarlyStopping on an evaluation metric."""

from __future__ import annotations

import json

import pytest
import torch

import alignkit
from alignkit.train.callbacks import Callback, Callbacks, EarlyStopping

QS = [f"What colour is item {i}?" for i in range(8)]
SFT_ROWS = [{"prompt": q, "completion": f"Item {i} is {'red' if i % 2 else 'blue'}."} for i, q in enumerate(QS)]
FAST = dict(progress=False, report_to="jsonl", batch_size=2, max_length=48, max_prompt_length=24, lr=1e-2,
            schedule="constant", warmup_ratio=0.0)


class StopAt(Callback):
    """Asks to stop after step ``at``; records every call."""

    def __init__(self, at: int):
        self.at, self.calls = at, []

    def on_step(self, step, metrics):
        self.calls.append(("step", step, metrics))
        return step == self.at

    def on_evaluate(self, step, metrics):
        self.calls.append(("evaluate", step, metrics))

    def on_checkpoint(self, step, path):
        self.calls.append(("checkpoint", step, path))

    def on_end(self, step, metrics):
        self.calls.append(("end", step, metrics))


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_stop_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    full = alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, output_dir=str(tmp_path / "full"), max_steps=4, **FAST)
    assert full.stopped_at is None

    out = tmp_path / "stopped"
    cb = StopAt(2)
    stopped = alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, output_dir=str(out), max_steps=4, callbacks=[cb], **FAST)
    assert stopped.stopped_at == 2 and [r["step"] for r in _rows(out)] == [1, 2]
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").exists()  # resumable where it stopped
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()  # the model is saved too
    assert "stopped by a callback after step 2" in (out / "README.md").read_text()
    kinds = [c[0] for c in cb.calls]
    assert kinds == ["step", "step", "checkpoint", "end"], kinds
    # on_step gets the metrics row exactly as metrics.jsonl holds it
    assert [c[2] for c in cb.calls if c[0] == "step"] == [{k: v for k, v in r.items() if k != "step"} | {"step": r["step"]}
                                                          for r in _rows(out)]

    resumed = alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, output_dir=str(out), max_steps=4, resume=True, **FAST)
    assert resumed.stopped_at is None and [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    _same(_weights(out), _weights(tmp_path / "full"))


def test_online_stop_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    def reward(prompts, responses):
        return [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]

    kw = dict(model=str(tiny_dir), data=[{"prompt": q} for q in QS], reward=reward, num_rollouts=3,
              prompts_per_rollout=2, samples_per_prompt=2, ppo_epochs=1, max_new_tokens=6, unfinished_penalty=0.0,
              progress=False, report_to="jsonl", batch_size=4)
    alignkit.grpo(output_dir=str(tmp_path / "full"), **kw)
    out = tmp_path / "stopped"
    res = alignkit.grpo(output_dir=str(out), callbacks=[StopAt(1)], **kw)
    assert res.stopped_at == 1 and (out / "checkpoints" / "step-1").exists()
    alignkit.grpo(output_dir=str(out), resume=True, **kw)
    _same(_weights(out), _weights(tmp_path / "full"))


def test_evaluation_and_end_callbacks_get_the_logged_metrics(tiny_dir, tmp_path):
    cb = StopAt(at=-1)
    out = tmp_path / "o"
    res = alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, eval_size=2, eval_every=1, save_every=1,
                       output_dir=str(out), max_steps=3, callbacks=[cb], **FAST)
    rows = _rows(out)
    evals = [(c[1], c[2]) for c in cb.calls if c[0] == "evaluate"]
    logged = [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/")}) for r in rows
              if any(k.startswith("eval/") for k in r)]
    assert evals == logged and [s for s, _ in evals] == [1, 2, 3]  # two during training, the final one
    checkpoints = [(c[1], c[2]) for c in cb.calls if c[0] == "checkpoint"]
    assert [s for s, _ in checkpoints] == [1, 2] and checkpoints[0][1].endswith("step-1")
    (end,) = [c for c in cb.calls if c[0] == "end"]
    assert end[1] == 3 and {k: v for k, v in end[2].items() if k != "step"} == res.metrics  # with the final evaluation
    assert res.stopped_at is None


def test_a_stop_at_the_last_step_changes_nothing(tiny_dir, tmp_path):
    res = alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, output_dir=str(tmp_path / "o"), max_steps=2,
                       callbacks=[StopAt(2)], **FAST)
    assert res.stopped_at is None and not (tmp_path / "o" / "checkpoints").exists()


def test_early_stopping_on_an_evaluation_metric(tiny_dir, tmp_path):
    # eval/nll falls every step at this learning rate, so in mode max it never "improves" after
    # the first evaluation: patience 2 stops after the third evaluation.
    stop = EarlyStopping("nll", patience=2, mode="max")
    res = alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, eval_size=2, eval_every=1, output_dir=str(tmp_path / "o"),
                       max_steps=6, callbacks=[stop], **FAST)
    nll = [r["eval/nll"] for r in res.history if "eval/nll" in r]
    assert nll[0] > nll[1] > nll[2]
    assert stop.stopped_at == 3 and res.stopped_at == 3
    keep = EarlyStopping("eval/nll", patience=2, mode="min")
    res = alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, eval_size=2, eval_every=1, output_dir=str(tmp_path / "p"),
                       max_steps=4, callbacks=[keep], **FAST)
    assert res.stopped_at is None and keep.stopped_at is None


def test_early_stopping_logic_and_guards():
    es = EarlyStopping("eval/accuracy", patience=2, mode="max", min_delta=0.01)
    assert not es.on_evaluate(1, {"eval/accuracy": 0.5})
    assert not es.on_evaluate(2, {"eval/accuracy": 0.505})  # within min_delta: no improvement (1)
    assert not es.on_evaluate(3, {"eval/accuracy": 0.6})  # improvement resets the count
    assert not es.on_evaluate(4, {"eval/accuracy": 0.6})
    assert es.on_evaluate(5, {"eval/accuracy": 0.59}) and es.stopped_at == 5
    with pytest.raises(KeyError, match="eval/loss"):
        EarlyStopping("loss").on_evaluate(1, {"eval/nll": 1.0})
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping("nll", mode="lowest")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("nll", patience=0)
    with pytest.raises(ValueError, match="min_delta"):
        EarlyStopping("nll", min_delta=float("nan"))
    with pytest.raises(TypeError, match="subclass alignkit.Callback"):
        Callbacks([object()])
    cbs = Callbacks([StopAt(1)])
    cbs.checkpoint(1, "x")  # a truthy return of on_checkpoint is not a stop request
    assert not cbs.stop_requested
    cbs.step(1, {"loss": 1.0})
    assert cbs.stop_requested
