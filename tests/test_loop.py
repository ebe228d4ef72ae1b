"""The shared loop's invariances: accumulation split, resume, seeds; and the sampler."""

from __future__ import annotations

import torch

from alignkit.config import OptimConfig, RunConfig
from alignkit.data import SFTExample, tokenize_records
from alignkit.train.loop import Trainer, latest_checkpoint
from alignkit.train.sampler import epoch_batches, make_units, split_batch
from alignkit.train.sft import build_sft_task


def _items(tokenizer, n=24):
    recs = [SFTExample(prompt=[{"role": "user", "content": f"Item {i}?"}],
                       completion=("The colour of item %d is %s." % (i, "red" if i % 2 else "blue")) * (1 + i % 3))
            for i in range(n)]
    items, _ = tokenize_records(recs, tokenizer, max_length=64)
    return items


def _model(tiny_dir):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    return load_causal_lm(ModelConfig(path=str(tiny_dir)))


def _train(tiny_dir, tokenizer, out, batch_size, grad_accum, steps=3, stop_after=None, resume=False, save_every=0, padding_free=False,
           checkpointing=False):
    torch.manual_seed(0)
    items = _items(tokenizer)
    task = build_sft_task(items, [], tokenizer.pad_token_id, padding_free=padding_free)
    optim = OptimConfig(lr=1e-2, batch_size=batch_size, grad_accum=grad_accum, max_steps=steps, warmup_ratio=0.0)
    run = RunConfig(output_dir=str(out), progress=False, report_to="jsonl", resume=resume, save_every=save_every,
                    gradient_checkpointing=checkpointing)
    trainer = Trainer(_model(tiny_dir), task, optim, run)
    result = trainer.fit(stop_after=stop_after)
    return trainer.unwrapped(), result


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_accumulation_split_gives_the_same_update(tiny_dir, tiny_tokenizer, tmp_path):
    big, r1 = _train(tiny_dir, tiny_tokenizer, tmp_path / "a", batch_size=8, grad_accum=1)
    small, r2 = _train(tiny_dir, tiny_tokenizer, tmp_path / "b", batch_size=2, grad_accum=4)
    # float32 summation order differs; Adam amplifies that noise on tiny gradients, so the bound
    # is 1% of one step's size (lr = 1e-2), far below any real difference in the update.
    assert _max_diff(big, small) < 1e-4
    assert abs(r1.history[-1]["loss"] - r2.history[-1]["loss"]) < 1e-5
    # and the parameters did move
    fresh = _model(tiny_dir)
    assert _max_diff(big, fresh) > 1e-3


def test_gradient_checkpointing_gives_the_same_update(tiny_dir, tiny_tokenizer, tmp_path):
    plain, _ = _train(tiny_dir, tiny_tokenizer, tmp_path / "a", batch_size=4, grad_accum=1)
    recomputed, _ = _train(tiny_dir, tiny_tokenizer, tmp_path / "b", batch_size=4, grad_accum=1, checkpointing=True)
    assert all(getattr(layer, "gradient_checkpointing", False) for layer in recomputed.model.layers)  # it is on
    assert _max_diff(plain, recomputed) < 1e-5


def test_padding_free_gives_the_same_update(tiny_dir, tiny_tokenizer, tmp_path):
    padded, _ = _train(tiny_dir, tiny_tokenizer, tmp_path / "a", batch_size=4, grad_accum=1)
    packed, _ = _train(tiny_dir, tiny_tokenizer, tmp_path / "b", batch_size=4, grad_accum=1, padding_free=True)
    assert _max_diff(padded, packed) < 1e-4


def test_resume_after_interruption_matches_uninterrupted(tiny_dir, tiny_tokenizer, tmp_path):
    straight, _ = _train(tiny_dir, tiny_tokenizer, tmp_path / "s", batch_size=4, grad_accum=1, steps=6)
    out = tmp_path / "r"
    _train(tiny_dir, tiny_tokenizer, out, batch_size=4, grad_accum=1, steps=6, stop_after=4, save_every=3)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step-3"
    assert not list((out / "checkpoints").glob(".tmp-*")), "temporary checkpoint left behind"
    resumed, result = _train(tiny_dir, tiny_tokenizer, out, batch_size=4, grad_accum=1, steps=6, resume=True)
    assert result.steps == 6 and len(result.history) == 3
    assert _max_diff(straight, resumed) < 1e-6


def test_same_seed_repeats_a_run(tiny_dir, tiny_tokenizer, tmp_path):
    a, _ = _train(tiny_dir, tiny_tokenizer, tmp_path / "a", batch_size=4, grad_accum=1)
    b, _ = _train(tiny_dir, tiny_tokenizer, tmp_path / "b", batch_size=4, grad_accum=1)
    assert _max_diff(a, b) == 0.0


def test_sampler_sees_each_example_once_per_epoch_across_processes():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    units = make_units(len(lengths), None)
    batches = epoch_batches(units, lengths, global_batch=4, seed=1, epoch=0)
    seen = []
    for b in batches:
        for rank in range(2):
            for micro in split_batch(b, grad_accum=2, rank=rank, world_size=2):
                seen += micro
    assert sorted(seen) == list(range(len(lengths)))
    # a different epoch reorders; the same epoch repeats
    assert epoch_batches(units, lengths, 4, 1, 0) == batches
    assert epoch_batches(units, lengths, 4, 1, 1) != batches


def test_sampler_keeps_groups_together():
    groups = [0, 0, 0, -1, 1, 1, -1, 2, 2, 2]
    units = make_units(len(groups), groups)
    assert [0, 1, 2] in units and [4, 5] in units and [3] in units
    for b in epoch_batches(units, [1] * len(groups), global_batch=2, seed=0, epoch=0):
        flat = [i for u in b for i in u]
        for g in (0, 1, 2):
            members = [i for i, x in enumerate(groups) if x == g]
            assert all(m in flat for m in members) or not any(m in flat for m in members)


def test_length_buckets_reduce_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(512)]
    units = make_units(len(lengths), None)

    def padding(bucket):
        total = 0
        for b in epoch_batches(units, lengths, 8, 0, 0, bucket=bucket):
            ls = [lengths[u[0]] for u in b]
            total += max(ls) * len(ls) - sum(ls)
        return total

    assert padding(True) < 0.2 * padding(False)


def test_mixed_precision_auto_picks_bf16_only_where_it_is_fast(monkeypatch):
    from types import SimpleNamespace

    from accelerate.state import AcceleratorState

    from alignkit.train import engine as loop  # the precision choice is the engine's

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # as in a fresh process

    def model(hidden):
        m = torch.nn.Linear(2, 2)
        m.config = SimpleNamespace(hidden_size=hidden)
        return m

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loop.choose_mixed_precision("no", model(4096)) == ("no", "as configured")
    assert loop.choose_mixed_precision("bf16", model(8)) == ("bf16", "as configured")
    monkeypatch.setattr(loop, "cpu_bf16_instructions", lambda: None)
    mp, why = loop.choose_mixed_precision("auto", model(4096))
    assert mp == "no" and "without native bf16" in why
    monkeypatch.setattr(loop, "cpu_bf16_instructions", lambda: "avx512_bf16")
    mp, why = loop.choose_mixed_precision("auto", model(64))
    assert mp == "no" and "hidden size 64" in why
    mp, why = loop.choose_mixed_precision("auto", model(loop.CPU_BF16_MIN_HIDDEN))
    assert mp == "bf16" and "avx512_bf16" in why
    assert loop.choose_mixed_precision("auto", None)[0] == "no"  # size unknown: the safe choice
    # accelerate allows one precision per process: a later "auto" follows the first choice
    monkeypatch.setattr(AcceleratorState, "_shared_state", {"mixed_precision": "no"})
    monkeypatch.setattr(AcceleratorState, "mixed_precision", property(lambda self: "no"))
    mp, why = loop.choose_mixed_precision("auto", model(4096))
    assert mp == "no" and "already runs" in why


def test_progress_in_a_log_prints_plain_lines_not_a_redrawn_bar(capsys):
    from alignkit.train.progress import Progress

    p = Progress("sft", total=5, interval=0.0)  # captured stdout is not a terminal
    for step in range(1, 6):
        p.update(step, 1.0 / step, 100.0)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("[alignkit] sft 5/5 loss 0.2000 100 tok/s") and "ETA 0:00:00" in lines[-1]
    assert not any("\r" in line or "\x1b" in line for line in lines)  # no carriage returns or escape codes
    p = Progress("sft", total=100, interval=3600.0)
    for step in range(1, 101):
        p.update(step, 1.0, 100.0)
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()] == ["1/100", "100/100"]  # first and last
