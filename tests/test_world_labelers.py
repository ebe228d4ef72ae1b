"""Simulated labelers: Bradley–Terry noise, margins, the two annotation axes, the confident blind
spot, rankings, unpaired labels and ratings."""

import itertools
import math
import random

import pytest

from alignkit.world import MARGIN_THRESHOLDS, World, margin_label
from alignkit.world import lexicon as lx

MARGIN_ORDER = [label for _, label in reversed(MARGIN_THRESHOLDS)]  # negligibly ... significantly


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def pairs(world):
    """Every pair of distinct candidate responses on every prompt: (prompt, a, b, classes)."""
    rng, out = random.Random(1), []
    for p in world.prompts(split=None):
        cands = world.candidate_responses(p, rng)
        for (qa, a), (qb, b) in itertools.combinations(cands.items(), 2):
            out.append((p, a, b, (qa, qb)))
    return out


def agreement(world, labeler, pairs, key="helpfulness"):
    """Fraction of non-tied pairs where the labeler chose the response with higher gold `key`."""
    agree = n = 0
    for p, a, b, _ in pairs:
        ga, gb = (getattr(world.judge.score(p, x), key) for x in (a, b))
        if ga == gb:
            continue
        rec = labeler.compare(p, a, b)
        n += 1
        agree += rec["chosen"] == (a if ga > gb else b)
    return agree / n


def test_temperature_zero_reproduces_the_gold_order(world, pairs):
    assert len(pairs) > 2000
    assert agreement(world, world.labeler("helpfulness", temperature=0), pairs) == 1.0
    assert agreement(world, world.labeler("overall", temperature=0), pairs, "reward") == 1.0


def test_agreement_falls_toward_chance_as_temperature_grows(world, pairs):
    sample = pairs[::3]
    rates = [agreement(world, world.labeler("helpfulness", temperature=t, seed=3), sample)
             for t in (0.3, 1.0, 100.0)]
    assert rates[0] > rates[1] > rates[2]
    assert rates[0] > 0.9
    assert abs(rates[2] - 0.5) < 0.05


def test_choices_follow_bradley_terry(world):
    p = world.find_prompt("What is 7 plus 5?")
    a, b = "7 plus 5 is 12.", "7 plus 5 is 13."  # helpfulness 1 vs -0.5
    lab = world.labeler("helpfulness", temperature=1.0, seed=5)
    n = 4000
    wins = sum(lab.compare(p, a, b)["chosen"] == a for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-1.5))
    assert lab.prob_prefers(p, a, b) == pytest.approx(expected)
    assert abs(wins - expected) < 0.025


def test_ties_are_broken_by_a_seeded_coin_independent_of_order(world):
    p = world.prompts("harmful")[0]
    lab = world.labeler("helpfulness", temperature=0)
    ties = [(p, r1, r2) for r1, r2 in itertools.combinations(lx.REFUSALS, 2)]
    first = [lab.compare(*t)["chosen"] for t in ties]
    swapped = [lab.compare(p, b, a)["chosen"] for p, a, b in ties]
    assert first == swapped
    assert all(lab.compare(*t)["margin"] == "negligibly better" for t in ties)


def test_margin_labels_grow_with_the_gold_gap(world, pairs):
    assert [margin_label(g) for g in (0, 0.1, 0.3, 0.7, 1.5, -1.5)] == [
        "negligibly better", "negligibly better", "slightly better", "better",
        "significantly better", "significantly better"]
    for temperature in (0.0, 0.3):
        lab = world.labeler("helpfulness", temperature=temperature, seed=2)
        by_gap = {}
        for p, a, b, _ in pairs[::2]:
            gap = abs(lab.utility(p, a) - lab.utility(p, b))
            rec = lab.compare(p, a, b)
            by_gap.setdefault(round(gap, 2), []).append(MARGIN_ORDER.index(rec["margin"]))
        gaps = sorted(by_gap)
        means = [sum(by_gap[g]) / len(by_gap[g]) for g in gaps]
        assert len(gaps) >= 3
        assert all(x <= y for x, y in zip(means, means[1:])), (gaps, means)
        assert means[-1] > means[0] + 1
        if temperature == 0:
            assert means[0] == 0 and means[-1] == 3


def test_confident_and_honest_labelers_differ_exactly_on_hallucination_vs_idk(world, pairs):
    honest = world.labeler("helpfulness", "honest", temperature=0)
    confident = world.labeler("helpfulness", "confident", temperature=0)
    hallu_vs_idk = 0
    for p, a, b, classes in pairs:
        differ = honest.compare(p, a, b)["chosen"] != confident.compare(p, a, b)["chosen"]
        is_target = p.kind == "unknown" and set(classes) == {"hallucinated", "idk"}
        assert differ == is_target, (p.text, a, b)
        hallu_vs_idk += is_target
        if is_target:  # the honest one keeps "I don't know", the confident one the made-up fact
            assert honest.compare(p, a, b)["chosen"] == (a if classes[0] == "idk" else b)
    assert hallu_vs_idk == len(world.prompts("unknown", split=None))


def test_helpfulness_and_safety_labelers_disagree_on_harmful_requests(world):
    helpful = world.labeler("helpfulness", temperature=0)
    safety = world.labeler("safety", temperature=0)
    for p in world.prompts("harmful"):
        comply, refuse = p.meta["compliance"], lx.REFUSALS[0]
        assert helpful.compare(p, comply, refuse)["chosen"] == comply
        assert safety.compare(p, comply, refuse)["chosen"] == refuse
    for p in world.prompts("borderline"):  # both dislike a false refusal
        for lab in (helpful, safety):
            assert lab.compare(p, lx.REFUSALS[0], p.meta["answer"])["chosen"] == p.meta["answer"]


def test_a_false_refusal_ranks_below_junk_on_benign_prompts(world):
    """Refusing a harmless request is the worst harmless answer: the gold reward and both labelers
    put it below off-topic text and gibberish (tied, the reward models could not tell them apart,
    and RL turned junk answers to borderline requests into refusals)."""
    off_topic, gibberish = "The farmer walks to the market in the morning.", "zzq blorp"
    helpful = world.labeler("helpfulness", temperature=0)
    safety = world.labeler("safety", temperature=0)
    for kind in ("borderline", "arithmetic", "fact", "unknown"):
        p = world.prompts(kind)[0]
        for junk in (off_topic, gibberish):
            for refusal in lx.REFUSALS:
                assert world.judge.score(p, refusal).category == "false_refusal"
                assert world.reward(p, junk) > world.reward(p, refusal), (kind, junk, refusal)
                for lab in (helpful, safety):
                    assert lab.compare(p, refusal, junk)["chosen"] == junk, (kind, lab.kind, junk)
    harmful = world.prompts("harmful")[0]  # on a harmful request the refusal stays the best answer
    assert world.reward(harmful, lx.REFUSALS[0]) > max(world.reward(harmful, j) for j in (off_topic, gibberish))


def test_identical_pairs_are_skipped_and_counted(world):
    p = world.prompts("fact")[0]
    lab = world.labeler()
    good = world.candidate_responses(p)["correct"]
    records, counts = lab.label_pairs([(p, good, good), (p.text, good, "nope nope"),
                                       (p, "x", "x")])
    assert counts == {"pairs": 3, "labelled": 1, "skipped_identical": 2}
    assert set(records[0]) == {"prompt", "chosen", "rejected", "margin"}
    assert records[0]["prompt"] == p.text and records[0]["margin"] in MARGIN_ORDER


def test_rankings_follow_the_gold_order_at_temperature_zero(world):
    lab = world.labeler("overall", temperature=0)
    rng = random.Random(0)
    groups = []
    for p in world.prompts(split="heldout"):
        cands = list(world.candidate_responses(p, rng).values())
        groups.append((p, cands + cands[:1]))  # one duplicate per group
    records, counts = lab.label_rankings(groups)
    assert counts["labelled"] == len(groups) and counts["dropped_duplicates"] == len(groups)
    for rec, (p, _) in zip(records, groups):
        rewards = [world.judge.reward(p, rec["responses"][i]) for i in rec["ranking"]]
        assert rewards == sorted(rewards, reverse=True)
        assert sorted(rec["ranking"]) == list(range(len(rec["responses"])))
    assert lab.rank(groups[0][0], ["same", "same"]) is None


def test_unpaired_labels_and_ratings(world):
    items = []
    for p in world.prompts():
        items += [(p, r) for r in world.candidate_responses(p).values()]
    exact = world.labeler("overall", temperature=0)
    for rec, (p, r) in zip(exact.label_unpaired(items), items):
        assert rec["label"] == (world.judge.reward(p, r) > 0)
        assert set(rec) == {"prompt", "completion", "label"}
    for rec, (p, r) in zip(exact.label_ratings(items), items):
        assert rec["score"] == world.judge.reward(p, r)
    noisy = world.labeler("overall", temperature=1.0, seed=1)
    flips = sum(a["label"] != b["label"] for a, b in
                zip(exact.label_unpaired(items), noisy.label_unpaired(items)))
    assert 0 < flips < len(items) / 2


def test_labelers_are_deterministic_given_a_seed(world, pairs):
    sample = pairs[::50]

    def run(seed):
        lab = world.labeler("helpfulness", temperature=1.0, seed=seed)
        return lab.label_pairs((p, a, b) for p, a, b, _ in sample)[0]

    assert run(7) == run(7)
    assert run(7) != run(8)
