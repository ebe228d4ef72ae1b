"""End-to-end SFT and reward models on tiny local models: they must learn."""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignkit.cli import main
from alignkit.config import ModelConfig, build_config
from alignkit.train.engine import enable_gradient_checkpointing
from alignkit.train.rm import RMConfig, run_rm
from alignkit.train.sft import SFTConfig, run_sft

from conftest import write_jsonl

COLOURS = ["red", "blue", "green", "yellow"]


def sft_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randint(0, 29)
        rows.append({"prompt": f"What colour is item {i}?", "completion": f"The colour of item {i} is {COLOURS[i % 4]}."})
    return rows


def pair_rows(n, seed=0):
    """Chosen answers are polite and correct; rejected ones are rude: a learnable preference."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randint(0, 29)
        good = f"The colour of item {i} is {COLOURS[i % 4]}."
        bad = rng.choice(["No. Go away.", "I will not tell you that.", "Whatever, red or something."])
        rows.append({"prompt": f"What colour is item {i}?", "chosen": good, "rejected": bad})
    return rows


def _run(**kv):
    return [f"{k}={v}" for k, v in kv.items()]


def test_sft_heldout_loss_falls(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(160))
    out = tmp_path / "sft"
    cfg = build_config(SFTConfig, overrides=_run(**{
        "model.path": tiny_dir, "data.path": data, "data.eval_size": 32, "optim.lr": 1e-2, "optim.batch_size": 16,
        "optim.epochs": 6, "run.output_dir": out, "run.eval_every": 1000, "run.progress": "false"}))
    result = run_sft(cfg)
    first, last = result.history[0]["nll"], result.final_eval["nll"]
    assert last < 0.6 * first, (first, last)
    # the saved directory is a plain HF model that a later stage can start from
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/nll" in r for r in rows) and all("loss" in r or "eval/nll" in r for r in rows)


@pytest.fixture(scope="module")
def trained_rm(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "pairs.jsonl", pair_rows(240))
    out = tmp / "rm"
    cfg = build_config(RMConfig, overrides=_run(**{
        "model.path": tiny_dir, "data.path": data, "data.eval_size": 48, "optim.lr": 3e-3, "optim.batch_size": 16,
        "optim.epochs": 3, "run.output_dir": out, "run.progress": "false",
        # the prefix-shared batching end to end (the padded one runs in the demo and the 2-process test)
        "batching": "prefix_shared"}))
    result = run_rm(cfg)
    return out, data, result


def test_reward_model_learns_the_preference(trained_rm):
    _, _, result = trained_rm
    assert result.final_eval["accuracy"] >= 0.85
    assert result.final_eval["margin_mean"] > 0


def test_eval_rm_and_centring(trained_rm, tmp_path):
    out, data, _ = trained_rm
    report = tmp_path / "eval.json"
    assert main(["eval-rm", f"model.path={out}", f"data.path={data}", "split_eval=true", "data.eval_size=48",
                 f"output={report}"]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["n_pairs"] == 48 and metrics["accuracy"] >= 0.85
    assert "accuracy_by_margin" in metrics
    # centred: the mean reward over chosen and rejected is near 0 relative to its spread
    assert abs(metrics["reward_mean"]) < 0.5 * metrics["reward_std"] + 0.05


def test_eval_rm_scores_are_the_same_under_every_batching(trained_rm, tiny_tokenizer, capsys):
    """eval-rm reads pairs prefix-shared by default (each prompt once): the same rewards, pair by
    pair and in the file's order, as one padded forward per sequence."""
    from alignkit.data import load_dataset_records, tokenize_records
    from alignkit.models.heads import ScalarHead
    from alignkit.models.loading import load_reward_model
    from alignkit.train.rm import score_pairs, scoring_batching

    out, data, _ = trained_rm
    head = ScalarHead(load_reward_model(ModelConfig(path=str(out)))).eval()
    records, _, _ = load_dataset_records(data, shuffle=False, limit=20)
    items, _ = tokenize_records(records, tiny_tokenizer, max_length=64)
    assert scoring_batching(head.model) == "prefix_shared"
    alone = [score_pairs(head, [it], tiny_tokenizer.pad_token_id, batching="padded") for it in items]
    ref_c, ref_r = torch.cat([c for c, _ in alone]), torch.cat([r for _, r in alone])
    assert not torch.equal(ref_c, ref_c.sort().values)  # the file order is not the length order
    for batching in ("padded", "padding_free", "prefix_shared"):
        c, r = score_pairs(head, items, tiny_tokenizer.pad_token_id, batch_size=6, batching=batching)
        torch.testing.assert_close(c, ref_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(r, ref_r, atol=1e-5, rtol=0)
    assert main(["eval-rm", f"model.path={out}", f"data.path={data}", "data.limit=20"]) == 0
    assert "batching prefix_shared" in capsys.readouterr().out


def test_saved_rm_reloads_with_plain_transformers(trained_rm, tiny_tokenizer):
    out, _, _ = trained_rm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.rollout.rewards import RewardModel

    tok = AutoTokenizer.from_pretrained(out)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours = RewardModel(str(out))
    prompt = [{"role": "user", "content": "What colour is item 3?"}]
    response = "The colour of item 3 is green."
    # the text the saved template renders, scored by plain transformers (test_rm_interop.py covers more)
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = plain(input_ids=ids).logits[0, 0].item()
    assert ours([prompt], [response]).item() == pytest.approx(expected, abs=1e-4)


def test_score_command(trained_rm, tmp_path):
    out, _, _ = trained_rm
    rows = [{"prompt": "What colour is item 1?", "response": "The colour of item 1 is blue.", "score": 1},
            {"prompt": "What colour is item 1?", "response": "No. Go away.", "score": 0}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    dest = tmp_path / "scores.jsonl"
    assert main(["score", f"model.path={out}", f"data.path={data}", f"output={dest}"]) == 0
    scored = [json.loads(line) for line in dest.read_text().splitlines()]
    assert len(scored) == 2 and scored[0]["score"] > scored[1]["score"]


def test_regression_reward_model_fits_ratings(tiny_dir, tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(200):
        n = rng.randint(0, 4)
        rows.append({"prompt": "Rate me.", "response": " ".join(["good"] * n + ["ok"]), "score": float(n)})
    data = write_jsonl(tmp_path / "ratings.jsonl", rows)
    cfg = build_config(RMConfig, overrides=_run(**{
        "model.path": tiny_dir, "data.path": data, "data.eval_size": 40, "optim.lr": 1e-2, "optim.batch_size": 16,
        "optim.epochs": 12, "run.output_dir": tmp_path / "reg", "run.progress": "false"}))
    result = run_rm(cfg)
    targets = torch.tensor([r["score"] for r in rows])
    assert result.final_eval["mse"] < 0.3 * float(targets.var())


def test_margin_labels_change_the_loss_as_the_formula_says(tiny_dir, tiny_tokenizer):
    """Same pairs, same weights: the loss with margin m equals −log σ(Δr − m) per pair."""
    from alignkit.config import ModelConfig
    from alignkit.data import PreferencePair, collate_pairs, tokenize_records
    from alignkit.models.heads import ScalarHead, sequence_rewards
    from alignkit.models.loading import load_scalar_head_model
    from alignkit.train.rm import pairwise_batch_loss

    head = ScalarHead(load_scalar_head_model(ModelConfig(path=str(tiny_dir))))
    pairs = [PreferencePair(prompt=[{"role": "user", "content": "q"}], chosen="yes", rejected="no", margin=m) for m in (0.0, 1.0, 3.0)]
    items, _ = tokenize_records(pairs, tiny_tokenizer)
    batch = collate_pairs(items, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        r = sequence_rewards(head, batch)
        delta = r[:3] - r[3:]
        with_m, _ = pairwise_batch_loss(True)(head, batch)
        without, _ = pairwise_batch_loss(False)(head, batch)
    expected = -torch.nn.functional.logsigmoid(delta - torch.tensor([0.0, 1.0, 3.0])).sum()
    assert with_m.item() == pytest.approx(expected.item(), rel=1e-5)
    assert without.item() == pytest.approx(-torch.nn.functional.logsigmoid(delta).sum().item(), rel=1e-5)
    assert with_m.item() > without.item()
    # the centring term c·(r_w + r_l)² (Eisenstein et al. 2023) is added per pair
    with torch.no_grad():
        centred, _ = pairwise_batch_loss(True, 0.5)(head, batch)
    assert centred.item() == pytest.approx(expected.item() + 0.5 * float(((r[:3] + r[3:]) ** 2).sum()), rel=1e-5)


def test_rm_trains_with_the_centring_coefficient_and_records_the_mean(tiny_dir, tmp_path, monkeypatch):
    import alignkit.train.rm as rm

    seen = []

    def spy(chosen, rejected, margin=None, center_coef=0.0):
        seen.append(center_coef)
        return real(chosen, rejected, margin, center_coef)

    real = rm.pairwise_rm_loss
    monkeypatch.setattr(rm, "pairwise_rm_loss", spy)
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    cfg = build_config(RMConfig, overrides=_run(**{
        "model.path": tiny_dir, "data.path": data, "optim.batch_size": 4, "optim.max_steps": 2,
        "run.output_dir": tmp_path / "rm", "run.progress": "false", "center_rewards_coefficient": 0.25}))
    run_rm(cfg)
    assert seen == [0.25, 0.25]
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert isinstance(saved["alignkit_reward_mean"], float) and "reward_offset" not in saved


def test_rm_rejects_an_unknown_batching(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    code = main(["rm", f"model.path={tiny_dir}", f"data.path={data}", f"run.output_dir={tmp_path / 'x'}",
                 "batching=prefix"])
    assert code != 0
    assert "prefix_shared" in capsys.readouterr().err


def test_rm_rejects_sft_data_clearly(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(10))
    code = main(["rm", f"model.path={tiny_dir}", f"data.path={data}", f"run.output_dir={tmp_path / 'x'}"])
    assert code == 1
    assert "SFTExample" in capsys.readouterr().err


def test_reward_model_batchings_give_the_padded_rewards(tiny_dir, tiny_tokenizer):
    """Packed pairs (run.padding_free) and prefix-shared pairs (batching=prefix_shared: the prompt
    once, both responses after it) give the same rewards, loss and gradient as the padded batch."""
    from alignkit.config import ModelConfig
    from alignkit.data import PreferencePair, tokenize_records
    from alignkit.models.heads import ScalarHead, sequence_rewards
    from alignkit.models.loading import load_scalar_head_model
    from alignkit.train.common import PAIR_COLLATES
    from alignkit.train.rm import pairwise_batch_loss

    head = ScalarHead(load_scalar_head_model(ModelConfig(path=str(tiny_dir)))).double().eval()
    pairs = [PreferencePair(prompt=[{"role": "user", "content": "q" * (1 + 3 * i)}], chosen="yes " * (i + 1),
                            rejected="no " * (3 - i) + "!", margin=float(i)) for i in range(4)]
    items, _ = tokenize_records(pairs, tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    results = {}
    for name, collate in PAIR_COLLATES.items():
        for packed in ((False, True) if name == "prefix_shared" else (None,)):
            batch = collate(items, pad) if packed is None else collate(items, pad, packed=packed)
            head.zero_grad()
            rewards = sequence_rewards(head, batch, ends=batch.get("last_index"))  # (2B,)
            loss, _ = pairwise_batch_loss(True)(head, batch)
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None])
            results[(name, packed)] = (rewards.detach(), loss.item(), grad)
    ref_r, ref_loss, ref_g = results[("padded", None)]
    assert ref_r[:4].ne(ref_r[4:]).all()  # the chosen and rejected rewards differ: the check can fail
    for key, (r, loss, g) in results.items():
        assert torch.allclose(r, ref_r, atol=1e-9), key
        assert loss == pytest.approx(ref_loss, abs=1e-9), key
        assert torch.allclose(g, ref_g, atol=1e-8), key


def test_reward_read_at_positions_skips_the_last_mlp_elsewhere_and_changes_nothing(tiny_dir, tiny_tokenizer):
    """ScalarHead(positions=...) runs the last layer's MLP on the read positions only; the rewards
    and every gradient equal those of the full forward read at the same positions."""
    from alignkit.config import ModelConfig
    from alignkit.data import PreferencePair, collate_pairs, tokenize_records
    from alignkit.models.heads import ScalarHead, last_token_index, sequence_rewards
    from alignkit.models.loading import load_scalar_head_model

    head = ScalarHead(load_scalar_head_model(ModelConfig(path=str(tiny_dir)))).double()
    pairs = [PreferencePair(prompt=[{"role": "user", "content": "w" * (2 + 5 * i)}], chosen="a b " * (i + 1),
                            rejected="c", margin=0.0) for i in range(3)]
    items, _ = tokenize_records(pairs, tiny_tokenizer)
    batch = collate_pairs(items, tiny_tokenizer.pad_token_id)
    rows_seen = []
    mlp = head.model.model.layers[-1].mlp
    handle = mlp.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[:-1].numel()))

    def rewards_and_grads(fast: bool):
        head.zero_grad()
        if fast:
            r = sequence_rewards(head, batch)
        else:
            values = head(batch["input_ids"], batch["attention_mask"])  # (B, T): every position
            r = values.gather(1, last_token_index(batch["attention_mask"])[:, None]).squeeze(1)
        (r * torch.arange(1.0, 7.0, dtype=r.dtype)).sum().backward()
        return r.detach(), [p.grad.clone() for p in head.parameters() if p.grad is not None]

    full_r, full_g = rewards_and_grads(False)
    fast_r, fast_g = rewards_and_grads(True)
    handle.remove()
    assert rows_seen == [batch["input_ids"].numel(), 6]  # full forward: B·T rows; positions: 2B
    assert torch.allclose(fast_r, full_r, atol=1e-10)
    assert len(fast_g) == len(full_g) and all(torch.allclose(a, b, atol=1e-10) for a, b in zip(fast_g, full_g))
    # a repeated position computes every row (its MLP gradient would otherwise count twice)
    head.zero_grad()
    ends = torch.tensor([3, 3, batch["input_ids"].numel() - 1])
    r = head(batch["input_ids"], batch["attention_mask"], positions=ends)
    assert head.last_mlp_rows is None
    r.sum().backward()
    dup_g = [p.grad.clone() for p in head.parameters() if p.grad is not None]
    head.zero_grad()
    values = head(batch["input_ids"], batch["attention_mask"])
    values.flatten()[ends].sum().backward()
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(dup_g, [p.grad for p in head.parameters() if p.grad is not None]))
    # torch's checkpoint_wrapper on the last layer (FSDP activation checkpointing): every position
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = head.model.model.layers
    original = layers[-1]
    layers[-1] = checkpoint_wrapper(original)
    wrapped_r, wrapped_g = rewards_and_grads(True)
    assert head.last_mlp_rows is None
    assert torch.allclose(wrapped_r, full_r, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(wrapped_g, full_g))
    layers[-1] = original
    # with gradient checkpointing (the backward recomputes the layer) every position is computed
    assert enable_gradient_checkpointing(head.model) == 1
    head.train()
    ckpt_r, ckpt_g = rewards_and_grads(True)
    assert head.last_mlp_rows is None
    assert torch.allclose(ckpt_r, full_r, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ckpt_g, full_g))
