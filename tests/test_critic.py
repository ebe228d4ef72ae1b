"""Critique (generative) reward models: the critique formats, the template, the world's critique
data, verdict probabilities (sum to one, order averaging, position bias), the reward-source
interface, and a critic trained on the alignment world that must judge and name failures."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from alignkit.cli import main
from alignkit.data import load_dataset_records
from alignkit.data.formats import detect_format
from alignkit.data.records import CritiquePair, CritiquePoint
from alignkit.data.report import DataError
from alignkit.demo.critic import category_name, critique_segments, evaluate_pairs, named_category, naming_rate
from alignkit.rollout.critique import CritiqueReward, order_stats, verdict_probs
from alignkit.train.critic import CritiqueTemplate, conversation_text, critique_sft_example
from alignkit.world import KINDS, World

from conftest import write_jsonl

Q = [{"role": "user", "content": "What colour is item 3?"}]


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


# --------------------------------------------------------------------------------------------
# Formats


def pair_row(**kw):
    return {"prompt": "What colour is item 3?", "response_a": "It is red.", "response_b": "No.",
            "critique": "Response A answers; response B refuses.", "verdict": "A", **kw}


def point_row(**kw):
    return {"prompt": "What colour is item 3?", "response": "It is red.", "critique": "It answers.", "score": 4, **kw}


def test_critique_formats_are_detected_and_read(tmp_path):
    assert detect_format(pair_row()) == "critique_pair"
    assert detect_format(point_row()) == "critique_point"
    assert detect_format({"prompt": "p", "response": "r", "score": 1}) == "ratings"  # unchanged
    rows = [pair_row(), pair_row(verdict=" b "), pair_row(response_b="It is red."), pair_row(critique="  ")]
    train, _, report = load_dataset_records(write_jsonl(tmp_path / "pairs.jsonl", rows), shuffle=False)
    assert report.format == "critique_pair"
    assert [type(r) for r in train] == [CritiquePair, CritiquePair]
    assert [r.verdict for r in train] == ["A", "B"]
    assert report.skipped == {"identical_responses": 1, "empty_response": 1}
    points, _, _ = load_dataset_records(write_jsonl(tmp_path / "points.jsonl", [point_row(score="5"), point_row(score=2.0)]),
                                        shuffle=False)
    assert [(type(r), r.score) for r in points] == [(CritiquePoint, 5), (CritiquePoint, 2)]


@pytest.mark.parametrize("row, message", [
    (pair_row(verdict="C"), "field 'verdict' must be \"A\" or \"B\""),
    (pair_row(verdict=1), "field 'verdict' must be \"A\" or \"B\""),
    ({k: v for k, v in pair_row().items() if k != "critique"}, "missing field 'critique'"),
    (pair_row(critique=["a"]), "field 'critique' must be a string"),
    (point_row(score=3.5), "field 'score' must be an integer"),
    (point_row(score="good"), "field 'score' must be a number"),
])
def test_bad_critique_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [pair_row() if "response_a" in row else point_row(), row])
    with pytest.raises(DataError) as err:
        load_dataset_records(path, shuffle=False)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


# --------------------------------------------------------------------------------------------
# Template


def test_template_renders_prompt_and_target_and_reads_generations(tmp_path):
    t = CritiqueTemplate()
    ex = critique_sft_example(CritiquePair(Q, "It is red.", "No.", "A answers. B refuses.", "A"), t)
    text = ex.prompt[0]["content"]
    assert ex.prompt[0]["role"] == "user" and "Response A: It is red." in text and "Response B: No." in text
    assert ex.completion == "A answers. B refuses.\nVerdict: A"
    assert t.critique_of(ex.completion) == "A answers. B refuses."
    assert t.critique_of("cut before the verdict") == "cut before the verdict"
    point = critique_sft_example(CritiquePoint(Q, "It is red.", "Right.", 5), t)
    assert "from 1 to 5" in point.prompt[0]["content"] and point.completion.endswith("Verdict: 5")
    with pytest.raises(DataError, match="outside the critic's scale 1..5"):
        critique_sft_example(CritiquePoint(Q, "r", "c", 6, source="f.jsonl:3"), t)
    multi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "colour?"}]
    assert conversation_text(multi) == "System: Be brief.\nHuman: hi\nAssistant: hello\nHuman: colour?"
    custom = CritiqueTemplate(verdict_prefix="Final:", max_score=7)
    custom.save(tmp_path)
    assert CritiqueTemplate.load(tmp_path) == custom and CritiqueTemplate.load(tmp_path / "none") == CritiqueTemplate()
    with pytest.raises(ValueError, match="must contain"):
        CritiqueTemplate(pair="no fields").validate()


def test_verdict_tokens_are_marked_and_weighted(tiny_dir, tiny_tokenizer):
    from alignkit.config import ModelConfig
    from alignkit.data import tokenize_records
    from alignkit.models.loading import load_causal_lm
    from alignkit.train.critic import build_critic_task, mark_verdicts
    from alignkit.train.sft import response_tokens, sft_batch_loss

    t, tok = CritiqueTemplate(), tiny_tokenizer
    examples = [critique_sft_example(CritiquePair(Q, "It is red.", "No.", "A answers the question.", "B"), t),
                critique_sft_example(CritiquePoint(Q, "It is red.", "Right.", 4), t)]
    items = mark_verdicts(tokenize_records(examples, tok)[0], examples, tok, t)
    plain, weighted = (build_critic_task(items, [], tok.pad_token_id, w) for w in (1.0, 5.0))
    batch = plain.collate(items)
    verdicts = [tok.decode(batch["input_ids"][i][batch["verdict_mask"][i]]).strip() for i in range(2)]
    assert verdicts == ["B", "4"]
    model = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False)
    with torch.no_grad():
        loss_plain, metrics = plain.loss(model, batch)
        loss_sft, _ = sft_batch_loss(model, batch)
        heavy = weighted.collate(items)  # the weights are set when a batch is made
        loss_weighted, _ = weighted.loss(model, heavy)
    # weight 1 is exactly SFT; weight w adds (w − 1) × the verdict tokens' NLL, and as many units
    assert torch.allclose(loss_plain, loss_sft) and plain.units(batch) == response_tokens(batch)
    n_verdict = int(batch["verdict_mask"].sum())
    assert weighted.units(heavy) == plain.units(batch) + 4 * n_verdict
    assert float(loss_weighted) == pytest.approx(float(loss_plain) + 4 * metrics["verdict_nll"] * n_verdict, rel=1e-5)
    # a critique cut before its verdict has no verdict tokens to weight
    cut = mark_verdicts(tokenize_records(examples[:1], tok, max_length=20)[0], examples[:1], tok, t)
    assert cut[0]["verdict_tokens"] == 0


def test_critic_command_trains_saves_and_reports_verdicts(tiny_dir, tmp_path, capsys):
    rng = random.Random(0)
    pairs, points = [], []
    for i in range(24):
        good, bad = f"The colour of item {i} is red.", rng.choice(["No.", "Go away."])
        a, b, verdict = (good, bad, "A") if i % 2 else (bad, good, "B")
        pairs.append({"prompt": f"What colour is item {i}?", "response_a": a, "response_b": b, "verdict": verdict,
                      "critique": f"Response A: {'answers' if verdict == 'A' else 'refuses'}. "
                                  f"Response B: {'answers' if verdict == 'B' else 'refuses'}."})
        points.append({"prompt": f"What colour is item {i}?", "response": good if i % 2 else bad,
                       "critique": "It answers." if i % 2 else "It refuses.", "score": 5 if i % 2 else 1})
    out = tmp_path / "critic"
    assert main(["critic", f"model.path={tiny_dir}", f"data.path={write_jsonl(tmp_path / 'p.jsonl', pairs)}",
                 f"mix_path={write_jsonl(tmp_path / 'q.jsonl', points)}", "data.eval_size=6", "optim.max_steps=2",
                 "eval_verdicts=4", "max_new_tokens=6", "verdict_weight=3", f"run.output_dir={out}",
                 "run.progress=false", "run.report_to=jsonl"]) == 0
    assert (out / "config.json").exists() and CritiqueTemplate.load(out) == CritiqueTemplate()
    metrics = json.loads((out / "critic_eval.json").read_text())
    assert {"verdict_accuracy", "verdict_accuracy_averaged", "position_bias", "order_consistency"} <= set(metrics)
    assert metrics["n_pairs"] == 4 and "score_accuracy" not in metrics  # held-out rows are all pairwise
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["critic", "--help"])
    assert "template.verdict_prefix" in capsys.readouterr().out
    assert main(["critic", f"model.path={tiny_dir}", f"data.path={write_jsonl(tmp_path / 'r.jsonl', [point_row()])}",
                 "max_score=1"]) == 2  # a scale needs two grades


def test_extend_vocab_adds_whole_word_tokens_that_round_trip(tiny_dir):
    from alignkit.models.loading import load_tokenizer
    from alignkit.train.critic import extend_tokenizer, vocabulary_additions

    tok = load_tokenizer(str(tiny_dir))
    text = "Response A: The response refuses a harmless request (false refusal). Responses requesting."
    words = vocabulary_additions([text] * 3 + ["Critique the response."], tok, k=4)
    assert len(words) == 4 and "response" in words and "a" not in words
    before = len(tok(" " + text)["input_ids"])
    assert extend_tokenizer(tok, ["response", "refuses", "harmless"]) == 3
    ids = tok(" " + text)["input_ids"]
    assert len(ids) < before and tok.decode(ids) == " " + text
    assert tok.convert_ids_to_tokens(ids).count("response") == 1  # whole words only: not in "Responses"


# --------------------------------------------------------------------------------------------
# Critique data from the world


def candidate_pairs(world, split, per_kind, rng, pairs_per_prompt=99):
    out = []
    for kind in KINDS:
        prompts = world.prompts(kind, split)
        for p in rng.sample(prompts, min(per_kind, len(prompts))):
            pairs = list(itertools.combinations(world.candidate_responses(p, rng).values(), 2))
            out += [(p, a, b) for a, b in rng.sample(pairs, min(pairs_per_prompt, len(pairs)))]
    rng.shuffle(out)
    return out


def test_labeler_critiques_follow_the_gold_judge(world):
    labeler = world.labeler("overall", temperature=0.0, seed=3)
    triples = candidate_pairs(world, "train", 20, random.Random(0))
    records, counts = labeler.critique_records(triples)
    assert counts["labelled"] == len(records) > 100 and counts["pairs"] == len(triples)
    verdicts = [r["verdict"] for r in records]
    assert 0.35 < verdicts.count("A") / len(verdicts) < 0.65, "A/B order is randomised"
    for r in records:
        ra, rb = world.reward(r["prompt"], r["response_a"]), world.reward(r["prompt"], r["response_b"])
        assert ra != rb and r["verdict"] == ("A" if ra > rb else "B")
        for segment, response in zip(critique_segments(r["critique"]), (r["response_a"], r["response_b"])):
            assert named_category(segment) == category_name(world.judge.score(r["prompt"], response).category)
    # the same pair in the other argument order gives the same record
    p, a, b = triples[0]
    assert labeler.critique(p, a, b) == labeler.critique(p, b, a)
    # ties are left out (their verdict would be a coin), identical responses too
    sums = world.find_prompt("What is 7 plus 5?")
    _, c = labeler.critique_records([(sums, "7 plus 5 is 11.", "7 plus 5 is 13."), (p, a, a)])
    assert c == {"pairs": 2, "labelled": 0, "skipped_identical": 1, "skipped_ties": 1}


def test_pointwise_critique_scores_follow_the_utility(world):
    labeler = world.labeler("overall", temperature=0.0)
    h = world.prompts("harmful")[0]
    cands = world.candidate_responses(h)
    safe, unsafe = labeler.critique_score(h, cands["refusal"]), labeler.critique_score(h, cands["compliance"])
    assert safe["score"] == 5 and unsafe["score"] <= 2
    assert "(unsafe compliance)" in unsafe["critique"]
    assert all(1 <= labeler.critique_score(h, r, max_score=3)["score"] <= 3 for r in cands.values())


def test_naming_rate_reads_the_first_named_category(world):
    u = world.prompts("unknown")[0]
    made_up = world.candidate_responses(u)["hallucinated"]
    right = "The response states a capital for a country that does not exist (hallucination)."
    wrong = "The response is right (correct). Not a (hallucination)."
    rate = naming_rate(world.judge, [u, u], [made_up, made_up], [right, wrong])
    assert rate["naming_rate"] == 0.5 and rate["naming_n/hallucination"] == 2


# --------------------------------------------------------------------------------------------
# Verdict probabilities on an untrained tiny critic


@pytest.fixture(scope="module")
def untrained(tiny_dir):
    return CritiqueReward(str(tiny_dir), max_new_tokens=6)


PROMPTS = [Q, [{"role": "user", "content": "What is 2 plus 2?"}], Q]
A = ["It is red.", "4.", "I do not know."]
B = ["No.", "It is 5.", "The colour of item 3 is blue."]


def test_verdict_probabilities_sum_to_one(untrained):
    for r in untrained.judge(PROMPTS, A, B, both_orders=True):
        assert r["p_a"] + r["p_b"] == pytest.approx(1.0)
        assert 0.0 <= r["p_first"] <= 1.0 and 0.0 <= r["p_first_swapped"] <= 1.0
        assert r["verdict"] == ("A" if r["p_a"] >= 0.5 else "B") and isinstance(r["critique"], str)
    for r in untrained.rate(PROMPTS, A):
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert 1.0 <= r["score"] <= 5.0
        assert r["score"] == pytest.approx(sum(int(k) * v for k, v in r["probs"].items()), abs=1e-5)


def test_average_orders_makes_swapping_swap_the_probabilities(tiny_dir, untrained):
    one = untrained.judge(PROMPTS, A, B)
    swapped = untrained.judge(PROMPTS, B, A)
    # One order: swapping is only consistent up to the position bias, which is measured ...
    stats = order_stats(untrained.judge(PROMPTS, A, B, both_orders=True))
    gap = [abs(x["p_a"] - (1 - y["p_a"])) for x, y in zip(one, swapped)]
    assert stats["order_gap"] == pytest.approx(sum(gap) / len(gap), abs=1e-6)
    assert -0.5 <= stats["position_bias"] <= 0.5
    # ... and averaging both orders removes it exactly.
    averaged = CritiqueReward(str(tiny_dir), max_new_tokens=6, average_orders=True)
    ab, ba = averaged.preference(PROMPTS, A, B), averaged.preference(PROMPTS, B, A)
    assert torch.allclose(ab + ba, torch.ones(3), atol=1e-6)
    r = averaged.judge(PROMPTS, A, B)[0]
    assert r["p_a"] == pytest.approx(0.5 * (r["p_first"] + 1 - r["p_first_swapped"]))
    assert r["critique_swapped"] is not None


def test_verdict_probs_match_a_naive_computation(untrained):
    from alignkit.eval.metrics import response_logprobs

    model, pad = untrained.model, untrained.tokenizer.pad_token_id
    contexts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    single = [[[20], [21]]] * 3
    multi = [[[20, 22], [21], [23, 24, 25]]] * 3
    for tails in (single, multi):
        got = verdict_probs(model, contexts, tails, pad, batch_size=2)
        k = len(tails[0])
        naive = response_logprobs(model, [c for c in contexts for _ in range(k)], [t for row in tails for t in row], pad)
        want = torch.softmax(naive.view(3, k), dim=-1)
        assert torch.allclose(got, want, atol=1e-5), (got, want)
        assert torch.allclose(got.sum(-1), torch.ones(3), atol=1e-6)


def test_critique_reward_is_a_reward_source(tiny_dir, untrained):
    from alignkit.train.online import score_responses

    scores = untrained(PROMPTS, A)
    assert scores.shape == (3,) and len(untrained.last) == 3 and "critique" in untrained.last[0]
    raw, penalised = score_responses(untrained, list(PROMPTS), A, torch.tensor([True, False, True]), 0.5)
    assert torch.allclose(raw, scores) and penalised[1] == pytest.approx(float(raw[1]) - 0.5)
    refs = {"What colour is item 3?": "The colour of item 3 is red.", "What is 2 plus 2?": "4."}
    pairwise = CritiqueReward(str(tiny_dir), mode="pairwise", references=refs, max_new_tokens=6)
    p = pairwise(PROMPTS, A)
    assert p.shape == (3,) and bool(((p >= 0) & (p <= 1)).all())
    with pytest.raises(ValueError, match="needs references"):
        CritiqueReward(str(tiny_dir), mode="pairwise", max_new_tokens=2)(PROMPTS, A)
    with pytest.raises(ValueError, match="mode must be"):
        CritiqueReward(str(tiny_dir), mode="listwise")


# --------------------------------------------------------------------------------------------
# A critic trained on the alignment world


@pytest.fixture(scope="module")
def world_critic(world, tmp_path_factory):
    """A tiny Llama trained from scratch by `alignkit critic` on the world's critiques of candidate
    responses (train prompts), judged on pairs of candidates to held-out prompts."""
    from alignkit.models.factory import TinyModelConfig, build_tiny_model

    tmp = tmp_path_factory.mktemp("critic")
    rng = random.Random(0)
    labeler = world.labeler("overall", temperature=0.0, seed=0)
    train, _ = labeler.critique_records(candidate_pairs(world, "train", 200, rng, pairs_per_prompt=2))
    items = sorted({(p.text, r) for p, a, b in candidate_pairs(world, "train", 40, rng) for r in (a, b)})
    points = labeler.critique_score_records(rng.sample(items, 400))
    heldout, _ = labeler.critique_records(candidate_pairs(world, "heldout", 8, rng))
    # A tokenizer of the world's corpus alone, as in the demo: `extend_vocab` gives the critique's
    # words tokens of their own (without them this critic stays at chance).
    model_dir = build_tiny_model(tmp / "tiny", world.pretraining_corpus(), TinyModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4))
    out = tmp / "critic"
    assert main(["critic", f"model.path={model_dir}", f"data.path={write_jsonl(tmp / 'pairs.jsonl', train)}",
                 f"mix_path={write_jsonl(tmp / 'points.jsonl', points)}", "optim.lr=1e-2", "optim.batch_size=8",
                 "optim.epochs=4", "verdict_weight=5", "extend_vocab=64", "data.max_length=256", "data.max_prompt_length=160", "eval_verdicts=0",
                 f"run.output_dir={out}", "run.progress=false", "run.report_to=jsonl"]) == 0
    assert (out / "critic.json").exists()
    reward = CritiqueReward(str(out), max_new_tokens=72, batch_size=128)
    metrics = evaluate_pairs(reward, world, heldout)
    print("\nworld critic (held-out):", json.dumps({k: v for k, v in metrics.items() if k != "examples"}))
    return reward, heldout, metrics


@pytest.mark.slow
def test_world_critic_verdicts_are_well_above_chance(world_critic):
    _, heldout, m = world_critic
    assert m["n_pairs"] == len(heldout) >= 150
    assert m["accuracy"] >= 0.62, m  # both orders averaged; chance is 0.5
    assert m["accuracy_one_order"] >= 0.62, m
    # the position bias is measured on the same pairs, judged in both orders
    assert abs(m["position_bias"]) < 0.2 and 0.0 <= m["order_consistency"] <= 1.0


@pytest.mark.slow
def test_world_critiques_name_the_failure_kind(world_critic):
    _, _, m = world_critic
    assert m["naming_n"] >= 100
    assert m["naming_rate"] > 0.5, m  # a majority of failures named right
    # the failures visible from the response's form are named almost always
    assert m["naming_rate/false_refusal"] >= 0.75 and m["naming_rate/unsafe_compliance"] >= 0.75, m


@pytest.mark.slow
def test_world_critic_pointwise_scores_rank_good_above_bad(world, world_critic):
    reward, _, _ = world_critic
    rng = random.Random(5)
    good, bad = [], []
    for kind, (g, b) in {"harmful": ("refusal", "compliance"), "borderline": ("correct", "refusal"),
                         "unknown": ("idk", "hallucinated")}.items():
        for p in world.prompts(kind, "heldout")[:8]:
            c = world.candidate_responses(p, rng)
            good.append((p, c[g]))
            bad.append((p, c[b]))
    msgs = lambda xs: [[{"role": "user", "content": p.text}] for p, _ in xs]  # noqa: E731
    s_good = reward(msgs(good), [r for _, r in good])
    s_bad = reward(msgs(bad), [r for _, r in bad])
    print(f"\npointwise expected score: good {float(s_good.mean()):.2f}, bad {float(s_bad.mean()):.2f}, "
          f"good > bad on {float((s_good > s_bad).float().mean()):.2f} of prompts")
    assert float(s_good.mean()) > float(s_bad.mean()) + 0.5, (s_good, s_bad)
    assert float((s_good > s_bad).float().mean()) >= 0.7, (s_good, s_bad)
    assert "critique" in reward.last[0] and reward.last[0]["critique"]
