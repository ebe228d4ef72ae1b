"""Reward models on the fast path give the numbers of a plain per-sequence forward.

* ``score_sequences`` (``alignkit score``, every ``RewardModel``, the RM trainer's regression
  evaluation): length-sorted batches, responses to one prompt in one row ``prompt ‖ y_1 ‖ … ‖ y_K``
  where cheaper, each reward read at the last token; equal to ``AutoModelForSequenceClassification``
  on each sequence alone, on Llama, Qwen2 (a sliding window shorter than the rows) and GPT-2, eager
  and sdpa; the cost rule that decides the rows; the refusals.
* ``eval-rm``, ``score`` and the RM trainer's mean reward (``reward_mean=final``) end to end on
  trained tiny reward models of two families, against one plain transformers forward per sequence.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from alignkit.data.prefix_sharing import collate_prompt_groups
from alignkit.models.heads import ScalarHead
from alignkit.models.scoring import row_costs, plan_rows, score_sequences

from conftest import write_jsonl

V, PAD, WINDOW = 101, 0, 8
_LLAMA_LIKE = dict(intermediate_size=48, num_key_value_heads=1)
CONFIGS = {
    "llama": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gpt2": dict(n_inner=48),
}


@functools.cache
def _rm(family: str):
    """A float64 tiny one-output sequence classifier of ``family`` (random weights)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(family, vocab_size=V, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                  max_position_embeddings=128, pad_token_id=PAD, eos_token_id=1, bos_token_id=2,
                                  num_labels=1, **CONFIGS[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config).double().eval()


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # never PAD


#: (prompt length, response lengths): a prompt with one response, one with four (longer than the
#: window together), one with three including an empty response (read at the prompt's last token).
SHAPES = [(9, [6]), (12, [5, 9, 3, 7]), (6, [4, 0, 8])]
ITEMS = [dict(prompt_ids=_tokens(10 * g, p), response_ids=_tokens(10 * g + k + 1, n), score=0.0, length=p + n)
         for g, (p, ns) in enumerate(SHAPES) for k, n in enumerate(ns)]
# interleave the groups, as a score file or a rollout may order them
ITEMS = ITEMS[::2] + ITEMS[1::2]


def _alone(model, items) -> torch.Tensor:
    """What transformers returns for each sequence alone (pooled at its last, non-pad token)."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([it["prompt_ids"] + it["response_ids"]])).logits[0, 0]
                            for it in items]).float()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_scores_equal_one_plain_forward_per_sequence(family, attention):
    model = _rm(family)
    model.set_attn_implementation(attention)
    head = ScalarHead(model)
    want = _alone(model, ITEMS)
    # every response of a prompt in its prompt's row (no cost rule), batches of 4 sequences
    rows = plan_rows(ITEMS, *row_costs(head))  # the rows score_sequences makes: each prompt's responses in one
    assert sorted(len(r[1]) for r in rows) == [1, 3, 4]
    shared = score_sequences(head, ITEMS, PAD, batch_size=4, share_prompts=True)
    torch.testing.assert_close(shared, want, atol=1e-5, rtol=0)
    padded = score_sequences(head, ITEMS, PAD, batch_size=3, share_prompts=False)
    torch.testing.assert_close(padded, want, atol=1e-5, rtol=0)
    assert len(set(want.tolist())) == len(ITEMS)  # a real comparison: the sequences score differently


def test_the_windows_matter_on_this_data():
    """Without its sliding window Qwen2 scores these rows differently, so the test above checks
    that a shared row keeps each response's window."""
    model = _rm("qwen2")
    model.set_attn_implementation("eager")
    windowed = _alone(model, ITEMS)
    model.config.use_sliding_window = False
    model.config.layer_types = ["full_attention"] * 2
    try:
        unwindowed = _alone(model, ITEMS)
    finally:
        _rm.cache_clear()  # the next test builds it again, windowed
    assert (windowed - unwindowed).abs().max() > 1e-3


def test_a_shared_row_is_the_responses_own_sequences():
    """The layout: each response sees the prompt and itself, at the positions of its own sequence."""
    batch = collate_prompt_groups([([5, 6, 7], [[8, 9], [10], []])], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch["last_index"].tolist() == [4, 5, 2]  # the empty response: the prompt's last token
    sees = batch["attention_mask"][0, 0]
    assert sees[5].tolist() == [True, True, True, False, False, True]  # y_2 sees the prompt and itself
    assert sees[4].tolist() == [True, True, True, True, True, False]


def test_the_cost_rule_shares_long_prompts_and_keeps_long_responses_apart():
    """A prompt joins its responses' row only while the row's estimated FLOPs stay below scoring
    the response alone: long responses to a short prompt would attend over a long row for little
    saved, short responses to a long prompt save most of their work."""
    long_prompt = [dict(prompt_ids=list(range(3, 103)), response_ids=[7] * 5) for _ in range(4)]
    short_prompt = [dict(prompt_ids=[3, 4], response_ids=[7] * 100) for _ in range(4)]
    per_token, per_pair = 2.0 * 1000, 4.0 * 2 * 10  # a model of 1,000 weights per token, 2 layers of width 10
    assert [len(r[1]) for r in plan_rows(long_prompt, per_token, per_pair)] == [4]
    assert [len(r[1]) for r in plan_rows(short_prompt, per_token, per_pair)] == [1, 1, 1, 1]
    assert [len(r[1]) for r in plan_rows(long_prompt + short_prompt, per_token, 0.0)] == [4, 4]  # no attention cost
    assert [len(r[1]) for r in plan_rows(long_prompt, per_token, per_pair, max_responses=3)] == [3, 1]  # batch size


def test_sharing_is_refused_where_it_cannot_be_exact_and_skipped_without_a_prompt():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "bert", vocab_size=V, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=48,
        num_labels=1, pad_token_id=PAD)).eval()
    head = ScalarHead(bert)
    with pytest.raises(ValueError, match="share_prompts=True cannot be served: batching=prefix_shared is exact only"):
        score_sequences(head, ITEMS, PAD, share_prompts=True)
    # the default falls back to one padded row per sequence: the encoder's own classification forward
    torch.testing.assert_close(score_sequences(head, ITEMS, PAD, batch_size=4), _alone(bert, ITEMS), atol=1e-5, rtol=0)
    no_prompt = [dict(it, prompt_ids=[]) for it in ITEMS if it["response_ids"]]
    llama = ScalarHead(_rm("llama"))
    with pytest.raises(ValueError, match="no prompt token to share"):
        score_sequences(llama, no_prompt, PAD, share_prompts=True)
    torch.testing.assert_close(score_sequences(llama, no_prompt, PAD), _alone(_rm("llama"), no_prompt), atol=1e-5, rtol=0)


# ---- end to end: eval-rm, score and the saved mean reward on trained reward models -----------------


def _pair_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randint(0, 5)  # few prompts: several pairs share one
        rows.append({"prompt": f"What colour is item {i}?", "chosen": f"The colour of item {i} is red.",
                     "rejected": rng.choice(["No. Go away.", "Whatever.", "I will not tell you that, go and look."])})
    return rows


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def trained(request, tiny_dir, tiny_tokenizer, tmp_path_factory):
    """(family, reward model directory, pairs file, training config) of a reward model trained a
    few steps with reward_mean=final."""
    from alignkit.config import build_config
    from alignkit.models.factory import tiny_family_model
    from alignkit.train.rm import RMConfig, run_rm

    tmp = tmp_path_factory.mktemp(f"rm-{request.param}")
    base = tiny_dir
    if request.param != "llama":
        base = tmp / "base"
        tiny_family_model(request.param, tiny_tokenizer).save_pretrained(base)
        tiny_tokenizer.save_pretrained(base)
    data = write_jsonl(tmp / "pairs.jsonl", _pair_rows(24))
    cfg = build_config(RMConfig, overrides=[
        f"model.path={base}", f"data.path={data}", "optim.lr=3e-3", "optim.batch_size=8", "optim.max_steps=3",
        f"run.output_dir={tmp / 'rm'}", "run.progress=false", "reward_mean=final"])
    run_rm(cfg)
    return request.param, tmp / "rm", data, cfg


def _plain(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _plain_scores(model, sequences: list[list[int]]) -> torch.Tensor:
    """One plain transformers forward per sequence, read where it pools (the last non-pad token)."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])


def test_the_saved_mean_reward_is_the_final_models_mean(trained, tiny_tokenizer):
    from alignkit.train.common import prepare_data

    family, out, _, cfg = trained
    saved = json.loads((out / "config.json").read_text())
    assert saved["alignkit_reward_mean_from"] == "final" and saved["model_type"] == family
    items = prepare_data(cfg.data, tiny_tokenizer, cfg.run.seed, expect=("PreferencePair",), name="rm").train
    model, _ = _plain(out)
    sequences = [it["prompt_ids"] + it[side] for it in items for side in ("chosen_ids", "rejected_ids")]
    assert len(sequences) == 48 <= 512  # every training sequence is in the mean
    assert saved["alignkit_reward_mean"] == pytest.approx(float(_plain_scores(model, sequences).mean()), abs=1e-5)


def test_eval_rm_equals_one_plain_forward_per_sequence(trained, capsys):
    from alignkit.config import ModelConfig
    from alignkit.data import load_dataset_records, tokenize_records
    from alignkit.train.evaluate_rm import EvalRMConfig, run_eval_rm

    family, out, data, _ = trained
    cfg = EvalRMConfig(model=ModelConfig(path=str(out)), batch_size=5)
    cfg.data.path = str(data)
    metrics = run_eval_rm(cfg)
    assert "batching prefix_shared" in capsys.readouterr().out
    model, tok = _plain(out)
    records, _, _ = load_dataset_records(str(data), shuffle=False)
    items, _ = tokenize_records(records, tok, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    chosen = _plain_scores(model, [it["prompt_ids"] + it["chosen_ids"] for it in items])
    rejected = _plain_scores(model, [it["prompt_ids"] + it["rejected_ids"] for it in items])
    both = torch.cat([chosen, rejected])
    assert metrics["n_pairs"] == 24
    assert metrics["accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert metrics["reward_mean"] == pytest.approx(float(both.mean()), abs=1e-5)
    assert metrics["reward_std"] == pytest.approx(float(both.std()), abs=1e-5)
    assert metrics["margin_mean"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)


def test_score_equals_one_plain_forward_per_row(trained, tmp_path):
    from alignkit.config import ModelConfig
    from alignkit.data import RatedExample, tokenize_records
    from alignkit.models.loading import load_reward_model
    from alignkit.train.evaluate_rm import ScoreConfig, run_score

    family, out, _, _ = trained
    rows = [{"prompt": f"What colour is item {i % 3}?", "response": r}
            for i, r in enumerate(["Red.", "It is blue, I think.", "No.", "The colour of item 1 is red.", "Whatever.",
                                   "I will not tell you that.", "Green, or maybe yellow; I am not sure at all."])]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = ScoreConfig(model=ModelConfig(path=str(out)), batch_size=4, output=str(tmp_path / "scores.jsonl"))
    cfg.data.path = str(src)
    run_score(cfg)
    got = torch.tensor([json.loads(line)["score"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()])
    model, tok = _plain(out)
    records = [RatedExample(prompt=[{"role": "user", "content": r["prompt"]}], response=r["response"], score=0.0)
               for r in rows]
    items, _ = tokenize_records(records, tok, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    # the rows score_sequences made share the prompts (three prompts, seven rows)
    assert len(plan_rows(items, *row_costs(ScalarHead(load_reward_model(ModelConfig(path=str(out))))))) == 3
    torch.testing.assert_close(got, _plain_scores(model, [it["prompt_ids"] + it["response_ids"] for it in items]),
                               atol=1e-5, rtol=0)


def test_reward_mean_auto_measures_the_final_model_where_the_mean_is_folded_into_a_bias():
    import copy

    from alignkit.train.rm import RMConfig, reward_mean_choice

    plain = _rm("llama")
    biased = copy.deepcopy(plain)
    biased.score = torch.nn.Linear(32, 1, bias=True)
    assert reward_mean_choice("auto", plain) == "training"  # only recorded: the free running mean
    assert reward_mean_choice("auto", biased) == "final"  # subtracted from the bias: exact
    assert reward_mean_choice("training", biased) == "training"
    cfg = RMConfig(reward_mean="last")
    with pytest.raises(ValueError, match="reward_mean must be auto, training, final; got 'last'"):
        cfg.validate()


def test_eval_rm_scores_each_distinct_sequence_once(monkeypatch):
    """Under prefix sharing, eval-rm's pairs are read as their distinct sequences: a ranking of
    three responses (three pairs) costs one prompt and three responses, not six sequences."""
    import alignkit.models.scoring as scoring
    from alignkit.train.rm import score_pairs

    prompt, other = _tokens(70, 10), _tokens(71, 7)
    a, b, c, d, e = (_tokens(72 + k, n) for k, n in enumerate([6, 4, 9, 5, 3]))
    pairs = [dict(prompt_ids=prompt, chosen_ids=x, rejected_ids=y, margin=0.0, weight=1.0, group=0, length=0)
             for x, y in [(a, b), (a, c), (b, c)]]
    pairs.append(dict(prompt_ids=other, chosen_ids=d, rejected_ids=e, margin=0.0, weight=1.0, group=1, length=0))
    sent = []
    real = scoring.collate_prompt_groups
    monkeypatch.setattr(scoring, "collate_prompt_groups",
                        lambda groups, pad: sent.extend(r for _, rs in groups for r in rs) or real(groups, pad))
    model = _rm("llama")
    model.set_attn_implementation("sdpa")
    chosen, rejected = score_pairs(ScalarHead(model), pairs, PAD, batch_size=2, batching="prefix_shared")
    assert sorted(map(len, sent)) == [3, 4, 5, 6, 9]  # each response once
    seq = lambda p, r: dict(prompt_ids=p, response_ids=r)  # noqa: E731
    torch.testing.assert_close(chosen, _alone(model, [seq(p["prompt_ids"], p["chosen_ids"]) for p in pairs]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, _alone(model, [seq(p["prompt_ids"], p["rejected_ids"]) for p in pairs]),
                               atol=1e-5, rtol=0)


def test_the_final_mean_is_measured_on_every_process_before_the_save(tiny_dir, tmp_path, monkeypatch):
    """The final pass runs before ``save_final`` (whose ``write`` runs on the main process only):
    a sharded model's forward needs every process."""
    import alignkit.train.rm as rm
    from alignkit.config import build_config
    from alignkit.train.loop import Trainer

    order = []
    real_mean, real_save = rm.final_reward_mean, Trainer.save_final
    monkeypatch.setattr(rm, "final_reward_mean", lambda *a, **k: order.append("mean") or real_mean(*a, **k))
    monkeypatch.setattr(Trainer, "save_final", lambda self, *a, **k: order.append("save") or real_save(self, *a, **k))
    data = write_jsonl(tmp_path / "pairs.jsonl", _pair_rows(4))
    rm.run_rm(build_config(rm.RMConfig, overrides=[
        f"model.path={tiny_dir}", f"data.path={data}", "optim.batch_size=4", "optim.max_steps=1",
        f"run.output_dir={tmp_path / 'rm'}", "run.progress=false", "reward_mean=final"]))
    assert order == ["mean", "save"]
