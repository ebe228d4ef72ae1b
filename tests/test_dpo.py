"""DPO on the shared loop: it learns a learnable preference, the three references and the three
batchings agree at the first step, every loss of the table runs, and every metric is documented."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError, ModelConfig, OptimConfig, RunConfig, build_config, flat_fields
from alignkit.data import PreferencePair, tokenize_records
from alignkit.losses import PREFERENCE_LOSSES
from alignkit.models.loading import load_causal_lm
from alignkit.train.dpo import BATCHINGS, DPOConfig, build_dpo_task, evaluate_pairs
from alignkit.train.loop import Trainer

from conftest import write_jsonl

DOCS = Path(__file__).resolve().parents[1] / "docs" / "dpo.md"


def preference_rows(n: int, start: int = 0) -> list[dict]:
    """A learnable preference: the chosen reply says "red", the rejected one "blue", with varied
    prompts (some multi-turn) and response lengths."""
    rows = []
    for i in range(start, start + n):
        prompt = f"What is the colour of item {i}?"
        if i % 3 == 0:
            prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": prompt}]
        tail = " A good answer is helpful." * (i % 3)
        rows.append({"prompt": prompt, "chosen": f"The colour of item {i} is red.{tail}",
                     "rejected": f"The colour of item {i} is blue." + (" It is blue." if i % 2 else "")})
    return rows


def _records(rows):
    out = []
    for r in rows:
        prompt = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        out.append(PreferencePair(prompt=prompt, chosen=r["chosen"], rejected=r["rejected"]))
    return out


@pytest.fixture(scope="module")
def pair_items(tiny_tokenizer):
    train, _ = tokenize_records(_records(preference_rows(16)), tiny_tokenizer, max_length=64, max_prompt_length=40)
    evals, _ = tokenize_records(_records(preference_rows(8, start=100)), tiny_tokenizer, max_length=64, max_prompt_length=40)
    return train, evals


def _first_step(tiny_dir, tokenizer, items, evals, tmp_path, lora=False, steps=1, batch_size=8, grad_accum=1,
                lr=1e-3, **kw):
    """Train ``steps`` optimizer steps with DPOConfig(**kw); returns (history, final eval, trainer, reference)."""
    torch.manual_seed(0)
    cfg = DPOConfig(model=ModelConfig(path=str(tiny_dir), lora=lora, lora_r=4, lora_alpha=8),
                    optim=OptimConfig(lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_steps=steps, warmup_ratio=0.0),
                    run=RunConfig(output_dir=str(tmp_path), progress=False, report_to="jsonl"), **kw)
    cfg.validate()
    policy = load_causal_lm(cfg.model)
    task, reference = build_dpo_task(cfg, policy, items, evals, tokenizer.pad_token_id)
    trainer = Trainer(policy, task, cfg.optim, cfg.run, config=cfg)
    result = trainer.fit()
    return result.history, result.final_eval, trainer, reference


# ---- it learns ------------------------------------------------------------------------------------


def test_dpo_learns_a_learnable_preference_end_to_end(tiny_dir, tmp_path):
    """Through the CLI: held-out reward accuracy and margin rise from their untrained values."""
    from alignkit.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(40) + preference_rows(16, start=100))
    out = tmp_path / "run"
    args = ["dpo", f"model.path={tiny_dir}", f"data.path={data}", "data.eval_size=16", "data.shuffle=false",
            "data.max_length=64", "data.max_prompt_length=40", "optim.batch_size=8", "optim.max_steps=12",
            "optim.lr=3e-3", "optim.warmup_ratio=0", f"run.output_dir={out}", "run.progress=false",
            "run.report_to=jsonl", "beta=0.1", "batching=prefix_shared"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    final = [r for r in rows if "eval/accuracy" in r][-1]
    # Before training the policy is the reference: every implicit reward is 0, accuracy 0 (ties
    # count as wrong), margin 0. After 12 steps the held-out pairs are ranked right.
    assert train_rows[0]["rewards/margins"] == 0.0 and train_rows[0]["rewards/accuracies"] == 0.0
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert final["eval/accuracy"] >= 0.9 and final["eval/margin"] > 0.2
    assert train_rows[-1]["loss"] < 0.6
    # the saved policy is a plain HF directory
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_heldout_accuracy_and_margin_rise(tiny_dir, tiny_tokenizer, pair_items, tmp_path):
    train, evals = pair_items
    history, final, _, reference = _first_step(tiny_dir, tiny_tokenizer, train, evals, tmp_path, steps=10,
                                               beta=0.1, batching="padding_free")
    # the untrained policy (= the frozen copy) scores every pair 0: accuracy 0, margin 0
    before = evaluate_pairs(reference._copy, evals, DPOConfig(beta=0.1), BATCHINGS["padded"], reference,
                            tiny_tokenizer.pad_token_id)
    assert before["accuracy"] == 0.0 and before["margin"] == 0.0
    assert final["accuracy"] >= 0.9 and final["margin"] > 0.1
    assert history[-1]["loss"] < history[0]["loss"]


# ---- references and batchings agree at the first step ------------------------------------------------


def _assert_rows_equal(a: dict, b: dict, tol: float = 1e-6):
    for key in ("loss", "logps/chosen", "logps/rejected", "nll", "rewards/margins", "kl"):
        assert a[key] == pytest.approx(b[key], abs=tol, rel=3e-7), key  # logps ~ -100: float32 resolves ~1e-5


def test_first_step_loss_equal_for_copy_adapter_and_precomputed(tiny_dir, tiny_tokenizer, pair_items, tmp_path):
    """sft_weight makes the loss depend on the policy's own log-probs, so the comparison also checks
    that the LoRA policy (adapter B = 0) equals the full one at step 0."""
    train, evals = pair_items
    runs = {
        "copy": dict(reference="copy"),
        "precomputed": dict(reference="precomputed"),
        "lora-adapter": dict(reference="adapter", lora=True),
        "lora-precomputed": dict(reference="precomputed", lora=True),
    }
    first = {}
    for name, kw in runs.items():
        history, _, trainer, reference = _first_step(tiny_dir, tiny_tokenizer, train, [], tmp_path / name, steps=3,
                                                     loss_type="ipo", beta=0.5, sft_weight=1.0, lr=1e-2, **kw)
        first[name] = history[0]
        # later steps: π_ref stays the initial model while the policy moves (adapters really off)
        assert abs(history[-1]["kl"]) > 1e-3 and abs(history[-1]["rewards/margins"]) > 1e-4
        if "precomputed" in name:
            assert reference is None  # training holds one model
        if name == "lora-adapter":
            assert reference.mode == "adapter" and reference._copy is None  # no second copy of the weights
    assert first["copy"]["loss"] == pytest.approx(1.0 + first["copy"]["nll"], abs=1e-6)  # (h − 1/(2β))² = 1 at h = 0
    for name in ("precomputed", "lora-adapter", "lora-precomputed"):
        _assert_rows_equal(first[name], first["copy"])
    # copy and adapter compute π_ref in the same forward layout as the policy: exactly equal
    assert first["lora-adapter"]["loss"] == first["copy"]["loss"]


def test_first_step_equal_for_every_batching_and_accumulation(tiny_dir, tiny_tokenizer, pair_items, tmp_path):
    train, evals = pair_items
    rows = {}
    for name in BATCHINGS:
        history, _, _, _ = _first_step(tiny_dir, tiny_tokenizer, train, [], tmp_path / name, steps=2, batching=name, sft_weight=0.5)
        rows[name] = history
    history, _, _, _ = _first_step(tiny_dir, tiny_tokenizer, train, [], tmp_path / "accum", steps=2, batch_size=2, grad_accum=4,
                                   batching="prefix_shared", sft_weight=0.5)
    rows["accum"] = history
    for name in ("padding_free", "prefix_shared", "accum"):
        _assert_rows_equal(rows[name][0], rows["padded"][0], tol=1e-5)
        # and the second step, after one identical update, too (float-rounding tolerance)
        assert rows[name][1]["loss"] == pytest.approx(rows["padded"][1]["loss"], abs=1e-4)


# ---- every loss of the table -------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", list(PREFERENCE_LOSSES))
def test_every_loss_type_trains(tiny_dir, tiny_tokenizer, pair_items, tmp_path, loss_type):
    train, evals = pair_items
    beta = 0.5
    options = {"cdpo": dict(label_smoothing=0.2), "robust": dict(label_smoothing=0.2)}.get(loss_type, {})
    history, final, _, reference = _first_step(tiny_dir, tiny_tokenizer, train, evals[:4], tmp_path, steps=2,
                                               loss_type=loss_type, beta=beta, batching="prefix_shared", **options)
    first = history[0]
    # At step 0 the policy is the reference (h = 0), which fixes the first loss:
    expected = {"sigmoid": math.log(2), "cdpo": math.log(2), "robust": math.log(2), "ipo": 1 / (2 * beta) ** 2, "hinge": 1.0}
    if loss_type in expected:
        assert first["loss"] == pytest.approx(expected[loss_type], abs=1e-6)
        assert "kl" in first and first["kl"] == 0.0
    else:  # reference-free: no reference model at all
        assert reference is None and "kl" not in first
    assert all(math.isfinite(h["loss"]) for h in history)
    assert math.isfinite(final["accuracy"]) and math.isfinite(final["margin"])


def test_simpo_first_loss_from_mean_logps(tiny_dir, tiny_tokenizer, pair_items, tmp_path):
    """SimPO on mean log-probs: with one pair, loss = −log σ(β(ḡ_w − ḡ_l) − γ) from the logged ḡ."""
    train, _ = pair_items
    history, _, _, _ = _first_step(tiny_dir, tiny_tokenizer, train[:1], [], tmp_path, batch_size=1,
                                   loss_type="simpo", beta=2.0, simpo_gamma=0.3)
    h = history[0]
    g_w, g_l = h["logps/chosen"], h["logps/rejected"]  # means per token for simpo
    it = train[0]
    assert g_w > -10 and g_w * len(it["chosen_ids"]) < g_w  # per-token scale, not summed
    want = -math.log(1 / (1 + math.exp(-(2.0 * (g_w - g_l) - 0.3))))
    assert h["loss"] == pytest.approx(want, abs=1e-5)


# ---- config and docs ---------------------------------------------------------------------------------


def test_every_field_documented_and_bad_values_explained():
    from alignkit.train.kto import KTOConfig

    for cls in (DPOConfig, KTOConfig):
        for key, (_, _, doc) in flat_fields(cls).items():
            assert doc, f"{cls.__name__}.{key} has no docstring"
    with pytest.raises(ValueError, match="loss_type must be one of"):
        build_config(DPOConfig, overrides=["loss_type=dpo2"])
    with pytest.raises(ValueError, match="label_smoothing applies to cdpo and robust"):
        build_config(DPOConfig, overrides=["label_smoothing=0.1"])
    with pytest.raises(ValueError, match="needs model.lora=true"):
        build_config(DPOConfig, overrides=["reference=adapter"])
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config(DPOConfig, overrides=["betta=0.1"])
    cfg = build_config(DPOConfig, overrides=["loss_type=cdpo", "label_smoothing=0.1", "run.padding_free=true"])
    assert cfg.loss_options() == {"label_smoothing": 0.1} and cfg.batching_name() == "padding_free"


def test_every_logged_metric_is_documented(tiny_dir, tiny_tokenizer, pair_items, tmp_path):
    train, evals = pair_items
    history, final, _, _ = _first_step(tiny_dir, tiny_tokenizer, train, evals[:4], tmp_path, sft_weight=0.1)
    documented = set(re.findall(r"`([a-z_/]+)`", DOCS.read_text(encoding="utf-8")))
    logged = set(history[0]) | {f"eval/{k}" for k in final}
    missing = {k for k in logged if k not in documented and k.removeprefix("eval/") not in documented}
    assert not missing, f"metrics not defined in docs/dpo.md: {sorted(missing)}"
