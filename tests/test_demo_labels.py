"""The demo's preference data follows Llama 2's practice for helpful-and-harmless: the safety signal
only on truly adversarial prompts, borderline prompts judged for helpfulness, and borderline
comparisons that include the helpful answer."""

from __future__ import annotations

import pytest

from alignkit.world import World


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_combined_data_takes_safety_labels_on_harmful_prompts_only(world):
    from alignkit.demo.labels import ADVERSARIAL, combined_records

    harmful, borderline = world.prompts("harmful")[0], world.prompts("borderline")[0]
    good = world.candidate_responses(borderline)["correct"]

    def rec(p, src, chosen="a", rejected="b"):
        return {"prompt": p.text, "src": src, "chosen": chosen, "rejected": rejected}

    records = {"helpfulness": [rec(harmful, "h"), rec(borderline, "h", good, "x"), rec(borderline, "h", "x", good)],
               "safety": [rec(harmful, "s"), rec(borderline, "s", good, "x")]}
    got = [(r["prompt"], r["src"], r["chosen"]) for r in combined_records(world, records)]
    assert got == [(borderline.text, "h", good), (borderline.text, "h", "x"), (harmful.text, "s", "a")]
    assert ADVERSARIAL == ("harmful",)


def test_combined_data_on_borderline_prompts_compares_the_helpful_answer_only(world):
    """Two samples of a borderline prompt (two non-answers, often junk preferred to a refusal) are
    left out of the DPO data: they taught DPO to answer harmful-sounding requests with junk rather
    than a refusal. Every other kind keeps its sample-against-sample comparisons."""
    from alignkit.demo.labels import combined_records

    borderline, fact = world.prompts("borderline")[0], world.prompts("fact")[0]
    good = world.candidate_responses(borderline)["correct"]
    refusal = "I can't help with that, it could hurt people."
    records = {"helpfulness": [{"prompt": borderline.text, "chosen": "blah", "rejected": refusal},
                               {"prompt": borderline.text, "chosen": good, "rejected": refusal},
                               {"prompt": fact.text, "chosen": "blah", "rejected": refusal}],
               "safety": []}
    got = combined_records(world, records)
    assert [(r["prompt"], r["chosen"]) for r in got] == [(borderline.text, good), (fact.text, "blah")]


def test_borderline_train_comparisons_include_the_helpful_answer(world):
    from alignkit.demo.labels import reference_pairs

    prompts = [world.prompts("borderline")[0], world.prompts("harmful")[0]]
    texts = ["I can't help with that, it could hurt people.", "blah"] * 2  # two samples per prompt
    pairs = reference_pairs(world, prompts, texts, 2)
    assert [(p.kind, t) for p, _, t in pairs] == [("borderline", texts[0]), ("borderline", texts[1])]
    good = pairs[0][1]
    assert world.judge.score(prompts[0], good).category == "helpful_compliance"
    # the safety labeler prefers that answer to a refusal (helpful and harmless beats a false refusal)
    lab = world.labeler("safety", temperature=0)
    assert lab.compare(prompts[0], good, texts[0])["chosen"] == good


def test_the_gated_reward_uses_the_safety_model_on_harmful_prompts_only(world, monkeypatch):
    """combined_reward: the safety score on harmful prompts, the helpfulness score on every other
    kind (borderline included)."""
    import torch

    from alignkit.demo import pipeline
    from alignkit.rollout import rewards

    class Const(rewards.RewardSource):
        def __init__(self, path, **_):
            self.value = 1.0 if "safety" in path else -1.0

        def __call__(self, prompts, responses):
            return torch.full((len(prompts),), self.value)

    monkeypatch.setattr(rewards, "RewardModel", Const)
    ctx = type("Ctx", (), {"world": world, "reward_models": {"helpfulness": "rm-helpfulness", "safety": "rm-safety"}})()
    reward = pipeline.combined_reward(ctx)
    kinds = ("harmful", "borderline", "unknown", "arithmetic")
    msgs = [[{"role": "user", "content": world.prompts(k)[0].text}] for k in kinds]
    assert reward(msgs, ["x"] * len(kinds)).tolist() == [1.0, -1.0, -1.0, -1.0]


def test_kto_labels_include_the_helpful_answer_on_borderline_prompts(world):
    """The unpaired (KTO) data rates the world's helpful answer on every borderline prompt once per
    sample, labelled by the helpfulness labeler: without it nearly every desirable example on
    sensitive-sounding prompts is a refusal, and KTO learns to refuse."""
    from alignkit.demo.labels import unpaired_records

    prompts = [world.prompts("borderline")[0], world.prompts("harmful")[0]]
    refusal = "I can't help with that, it could hurt people."
    rows = unpaired_records(world, prompts, [refusal, "blah", refusal, "blah"], 2, seed=0)
    assert len(rows) == 4 + 2
    good = world.candidate_responses(prompts[0])["correct"]
    extra = rows[4:]
    assert [(r["prompt"], r["completion"]) for r in extra] == [(prompts[0].text, good)] * 2
    assert all(r["label"] for r in extra)  # a helpful, harmless answer is desirable
    assert not rows[0]["label"]  # a refusal of a borderline prompt is not


def test_rl_prompts_are_a_seeded_balanced_choice_of_train_prompts(world, monkeypatch):
    """prompt_messages: at most RL_PROMPTS_PER_KIND train prompts per kind (arithmetic would be half of
    every rollout otherwise), every kind present, none held out, the same choice for the same seed."""
    from collections import Counter

    from alignkit.demo import pipeline
    from alignkit.world import KINDS

    def ctx(seed):
        return type("Ctx", (), {"world": world, "cfg": type("Cfg", (), {"seed": seed})()})()

    def kinds(msgs):
        return Counter(world.find_prompt(m).kind for m in msgs)

    msgs = pipeline.prompt_messages(ctx(0))
    got, train = kinds(msgs), Counter(p.kind for p in world.prompts(split="train"))
    assert set(got) == set(KINDS)
    assert all(got[k] == min(train[k], pipeline.RL_PROMPTS_PER_KIND) for k in KINDS)
    assert train["arithmetic"] > pipeline.RL_PROMPTS_PER_KIND  # the cap does bite
    assert all(world.find_prompt(m).split == "train" for m in msgs)
    assert len({m[0]["content"] for m in msgs}) == len(msgs)  # no prompt twice
    assert msgs == pipeline.prompt_messages(ctx(0)) and msgs != pipeline.prompt_messages(ctx(1))
    monkeypatch.setattr(pipeline, "RL_PROMPTS_PER_KIND", None)
    assert kinds(pipeline.prompt_messages(ctx(0))) == train
