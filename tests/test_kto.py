"""KTO on the shared loop: it learns unpaired labels, z₀ comes from mismatched pairs without
gradient, the λ weights apply per label, and the three references agree at the first step."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from alignkit.config import ModelConfig, OptimConfig, RunConfig
from alignkit.data import UnpairedExample, tokenize_records
from alignkit.models.loading import load_causal_lm
from alignkit.train.kto import KTOConfig, assign_mismatched, build_kto_task, collate_kto, evaluate_unpaired, unpaired_items
from alignkit.train.loop import Trainer

from conftest import write_jsonl

DOCS = Path(__file__).resolve().parents[1] / "docs" / "dpo.md"


def unpaired_rows(n: int, start: int = 0) -> list[dict]:
    """Desirable completions say "red", undesirable ones "blue" (3 desirable : 2 undesirable)."""
    rows = []
    for i in range(start, start + n):
        good = i % 5 < 3
        colour = "red" if good else "blue"
        rows.append({"prompt": f"What is the colour of item {i}?",
                     "completion": f"The colour of item {i} is {colour}." + " A good answer is helpful." * (i % 2),
                     "label": good})
    return rows


@pytest.fixture(scope="module")
def items(tiny_tokenizer):
    def tok(rows):
        recs = [UnpairedExample(prompt=[{"role": "user", "content": r["prompt"]}], completion=r["completion"], label=r["label"])
                for r in rows]
        return tokenize_records(recs, tiny_tokenizer, max_length=64, max_prompt_length=40)[0]

    return tok(unpaired_rows(20)), tok(unpaired_rows(10, start=100))


def _run(tiny_dir, tokenizer, train, evals, out, steps=1, lora=False, batch_size=10, lr=1e-3, **kw):
    torch.manual_seed(0)
    cfg = KTOConfig(model=ModelConfig(path=str(tiny_dir), lora=lora, lora_r=4, lora_alpha=8),
                    optim=OptimConfig(lr=lr, batch_size=batch_size, max_steps=steps, warmup_ratio=0.0),
                    run=RunConfig(output_dir=str(out), progress=False, report_to="jsonl"), **kw)
    cfg.validate()
    policy = load_causal_lm(cfg.model)
    task, reference = build_kto_task(cfg, policy, train, evals, tokenizer.pad_token_id)
    result = Trainer(policy, task, cfg.optim, cfg.run, config=cfg).fit()
    return result, reference, cfg


def test_kto_learns_unpaired_labels(tiny_dir, tiny_tokenizer, items, tmp_path):
    train, evals = items
    result, reference, cfg = _run(tiny_dir, tiny_tokenizer, train, evals, tmp_path, steps=12, lr=3e-3)
    # untrained (= the reference): every reward 0, AUC 0.5 (ties count half), margin 0
    before = evaluate_unpaired(reference._copy, assign_mismatched(evals, 1, 64), cfg, reference, tiny_tokenizer.pad_token_id)
    assert before["accuracy"] == 0.5 and before["margin"] == 0.0
    after = result.final_eval
    assert after["accuracy"] >= 0.9 and after["margin"] > 0.1
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_first_step_value_and_lambda_weights(tiny_dir, tiny_tokenizer, items, tmp_path):
    """At step 0, r = 0 and z₀ = 0, so each example costs λ_y·(1 − σ(0)) = λ_y / 2."""
    train, _ = items
    result, _, _ = _run(tiny_dir, tiny_tokenizer, train, [], tmp_path, desirable_weight=1.0, undesirable_weight=3.0)
    first = result.history[0]
    n_d = sum(it["label"] for it in train[:10])
    n_u = 10 - n_d
    assert first["loss"] == pytest.approx((n_d * 0.5 + n_u * 1.5) / 10, abs=1e-6)
    assert first["kl_ref_point"] == 0.0 and first["kl"] == 0.0


def test_first_step_equal_for_copy_adapter_and_precomputed(tiny_dir, tiny_tokenizer, items, tmp_path):
    train, _ = items
    runs = {"copy": dict(reference="copy"), "precomputed": dict(reference="precomputed"),
            "lora-adapter": dict(reference="adapter", lora=True), "lora-precomputed": dict(reference="precomputed", lora=True)}
    first = {}
    for name, kw in runs.items():
        result, reference, _ = _run(tiny_dir, tiny_tokenizer, train, [], tmp_path / name, steps=2, **kw)
        first[name] = result.history
        assert (reference is None) == ("precomputed" in name)
    for name in ("precomputed", "lora-adapter", "lora-precomputed"):
        for key in ("loss", "logps/chosen", "logps/rejected", "kl", "kl_ref_point"):
            assert first[name][0][key] == pytest.approx(first["copy"][0][key], abs=1e-6, rel=3e-7), (name, key)
    # after one update the reference point becomes positive or stays clamped at 0, never negative
    assert all(h[1]["kl_ref_point"] >= 0 for h in first.values())


def test_mismatched_pairs_and_no_gradient_through_z0(tiny_dir, tiny_tokenizer, items):
    train, _ = items
    assigned = assign_mismatched(train, seed=0, max_length=64)
    assert assigned == assign_mismatched(train, seed=0, max_length=64)  # seeded
    own = [it["completion_ids"] for it in train]
    kl = [it["kl_completion_ids"] for it in assigned]
    assert sorted(map(tuple, kl)) == sorted(map(tuple, own))  # a permutation of the completions
    assert all(k != o for k, o in zip(kl, own))  # ... never an example's own one
    # a micro-batch of ONE still has a mismatched pair: rows (x, y) and (x, y')
    batch = collate_kto(assigned[:1], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    # z₀ is detached: the gradient is the same whatever the mismatched completions are
    from alignkit.train.kto import kto_batch_loss
    from alignkit.models.loading import Reference

    from alignkit.models.heads import forward_logps

    policy = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    reference = Reference(policy, "copy")
    batch = collate_kto(assigned[:6], tiny_tokenizer.pad_token_id)
    # A few likelihood steps on the completions make the policy prefer them to π_ref, so z₀ > 0.
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(3):
        logps, mask = forward_logps(policy, batch)
        (-(logps * mask).sum()).backward()
        opt.step()
        opt.zero_grad()
    loss_fn = kto_batch_loss(KTOConfig(beta=0.5), reference)
    loss, metrics = loss_fn(policy, batch)
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    assert torch.isfinite(loss)
    from alignkit.train import kto as kto_module

    z0 = metrics["kl_ref_point"]
    assert z0 > 0  # the check below is only meaningful when z₀ is not clamped
    policy.zero_grad()
    original = kto_module.kl_reference_point
    kto_module.kl_reference_point = lambda a, b, **k: torch.tensor(z0)  # a constant with the same value
    try:
        loss2, _ = loss_fn(policy, batch)
        loss2.backward()
    finally:
        kto_module.kl_reference_point = original
    for g, p in zip(grads, policy.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_kto_from_pairs_through_the_cli(tiny_dir, tmp_path):
    """Pairwise data: each pair gives a desirable (chosen) and an undesirable (rejected) example."""
    from alignkit.cli import main

    rows = [{"prompt": f"What is the colour of item {i}?", "chosen": f"The colour of item {i} is red.",
             "rejected": f"The colour of item {i} is blue."} for i in range(24)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert main(["kto", f"model.path={tiny_dir}", f"data.path={data}", "data.eval_size=6", "data.max_length=64",
                 "data.max_prompt_length=40", "optim.batch_size=8", "optim.max_steps=8", "optim.lr=3e-3",
                 f"run.output_dir={out}", "run.progress=false", "run.report_to=jsonl"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval/accuracy" in r][-1]
    assert final["eval/accuracy"] > 0.8
    assert (out / "config.json").exists()
    assert len(unpaired_items([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}])) == 2


def test_every_logged_metric_is_documented(tiny_dir, tiny_tokenizer, items, tmp_path):
    train, evals = items
    result, _, _ = _run(tiny_dir, tiny_tokenizer, train, evals, tmp_path)
    text = DOCS.read_text(encoding="utf-8")
    kto_section = text[text.index("## KTO"):]
    documented = set(re.findall(r"`([a-z_/]+)`", kto_section)) | set(re.findall(r"`([a-z_/]+)`", text))
    logged = set(result.history[0]) | set(result.final_eval)
    assert not {k for k in logged if k not in documented}, sorted(logged - documented)
    assert math.isfinite(result.final_eval["loss"])


def test_mismatched_completion_comes_from_another_prompt():
    """The two examples made from one pair share a prompt; the mismatched completion avoids it."""
    pairs = [{"prompt_ids": [10 + i], "chosen_ids": [100 + i], "rejected_ids": [200 + i]} for i in range(6)]
    items = assign_mismatched(unpaired_items(pairs), seed=3, max_length=64)
    for it in items:
        source = next(o for o in items if o["completion_ids"] == it["kl_completion_ids"])
        assert source["prompt_ids"] != it["prompt_ids"]
    single = assign_mismatched(unpaired_items(pairs[:1])[:1], seed=0, max_length=64)  # one example: itself
    assert single[0]["kl_completion_ids"] == single[0]["completion_ids"]
