"""The world's prompts, corpus and demonstrations: splits, leakage, rates, determinism, purity."""

import re
import subprocess
import sys

import pytest

from alignkit.world import KINDS, Rates, World
from alignkit.world import lexicon as lx

DIALOGUE_TURN = re.compile(r"Human: (.*?)\n\nAssistant: (.*?)(?=\n\nHuman: |\Z)", re.S)


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_prompt_counts_and_splits(world):
    core = World(seed=0, eval_items=False)
    for kind in KINDS:
        train, held = world.prompts(kind, "train"), world.prompts(kind, "heldout")
        assert len(train) >= 40 and len(held) >= 10, kind
        # the core catalogues hold out about 20% of their items ...
        core_held = core.prompts(kind, "heldout")
        assert 0.12 < len(core_held) / (len(train) + len(core_held)) < 0.28, kind
        # ... the evaluation-only items add to the held-out split only: train is the same world
        assert [p.text for p in core.prompts(kind, "train")] == [p.text for p in train]
        assert [p.id for p in core_held] == [p.id for p in held[: len(core_held)]]
        if kind in ("unknown", "harmful", "borderline"):
            assert len(held) >= 120, kind  # a rate over them has a 95% interval of about ±7 points or less
        items_train = {p.meta["item"] for p in train}
        assert not items_train & {p.meta["item"] for p in held}  # every phrasing held out together
        assert all(p.kind == kind for p in train + held)
    everything = world.prompts(split=None)
    assert len({p.id for p in everything}) == len({p.text for p in everything}) == len(everything)
    assert len(world.kb.facts()) == 40
    assert world.prompts("fact")[0].meta["answer"] in lx.CITIES + lx.COLOURS + lx.FOODS


def test_names_never_contain_one_another():
    names = [n.lower() for n in lx.COUNTRIES + lx.CITIES + lx.CREATURES + lx.COLOURS + lx.FOODS
             + lx.EVAL_COUNTRIES + lx.EVAL_CREATURES]
    assert len(set(names)) == len(names)
    for a in names:
        for b in names:
            if a != b:
                assert not re.search(rf"\b{a}\b", b), (a, b)


def test_heldout_prompts_never_appear_in_corpus_or_demos(world):
    text = "\n".join(world.pretraining_corpus() + world.pretraining_heldout())
    demos = world.sft_demonstrations()
    demo_prompts = {d["prompt"] for d in demos}
    for p in world.prompts(split="heldout"):
        assert p.text not in text, p.text
        assert p.text not in demo_prompts
    # held-out unknown entities are never mentioned anywhere, not even as a made-up fact
    demo_text = "\n".join(d["prompt"] + " " + d["completion"] for d in demos)
    for e in {p.meta["entity"] for p in world.prompts("unknown", "heldout")}:
        assert not re.search(rf"\b{e}\b", text + demo_text), e
    # ... while train prompts do appear, and held-out facts are stated as plain statements
    assert sum(p.text in text for p in world.prompts(split="train")) > 0.9 * len(
        world.prompts(split="train"))
    for p in world.prompts("fact", "heldout"):
        m = p.meta
        assert lx.FACT_ANSWERS[m["relation"]].format(e=m["entity"], v=m["answer"]) in text
    for p in world.prompts("arithmetic", "heldout"):
        assert f"{p.meta['a']} {p.meta['op']} {p.meta['b']} " in text
    for p in world.prompts("borderline", "heldout"):
        assert p.meta["answer"][1:] in text


def test_every_fact_is_stated_and_no_unknown_fact_outside_dialogues(world):
    corpus = world.pretraining_corpus()
    statements = [d for d in corpus if not d.startswith("Human: ")]
    joined = "\n".join(statements)
    for e, rel, v in world.kb.facts():
        assert re.search(rf"\b{e}\b[^.]*\b{v}\b|\b{v}\b[^.]*\b{e}\b", joined), (e, v)
    for e in world.kb.unknown_countries + world.kb.unknown_creatures:
        assert not re.search(rf"\b{e}\b", joined), e


def dialogue_turns(docs):
    return [t for d in docs if d.startswith("Human: ") for t in DIALOGUE_TURN.findall(d)]


BAD_CATEGORY = {"arithmetic": "wrong_answer", "fact": "wrong_answer", "unknown": "hallucination",
                "harmful": "unsafe_compliance", "borderline": "false_refusal"}


def measured_bad_rates(world, turns):
    counts = {k: [0, 0] for k in KINDS}
    for q, a in turns:
        p = world.find_prompt(q)
        assert p.split == "train"
        j = world.judge.score(p, a)
        assert j.category in (BAD_CATEGORY[p.kind], {"arithmetic": "correct", "fact": "correct",
                                                     "unknown": "honest_unknown",
                                                     "harmful": "safe_refusal",
                                                     "borderline": "helpful_compliance"}[p.kind])
        counts[p.kind][0] += j.category == BAD_CATEGORY[p.kind]
        counts[p.kind][1] += 1
    return {k: (bad / n, n) for k, (bad, n) in counts.items()}


@pytest.mark.parametrize("rates", [None, Rates(0.5, 0.0, 0.9, 0.05, 0.6)])
def test_bad_answer_rates_are_as_configured(rates):
    kw = {} if rates is None else {"corpus_rates": rates, "demo_rates": rates}
    world = World(seed=1, **kw)
    c, d = world.config.corpus_rates, world.config.demo_rates
    turns = dialogue_turns(world.pretraining_corpus())
    for kind, (rate, n) in measured_bad_rates(world, turns).items():
        assert n > 50
        assert abs(rate - c.bad_rate(kind)) <= 0.5 / n + 1e-9, (kind, rate)
    demos = [(r["prompt"], r["completion"]) for r in world.sft_demonstrations()]
    for kind, (rate, n) in measured_bad_rates(world, demos).items():
        assert abs(rate - d.bad_rate(kind)) <= 0.5 / n + 1e-9, (kind, rate)


def test_demonstrations_cover_train_prompts_with_short_answers(world):
    demos = world.sft_demonstrations()
    assert {d["prompt"] for d in demos} == {p.text for p in world.prompts(split="train")}
    assert all(set(d) == {"prompt", "completion", "kind"} for d in demos)
    assert all(len(d["completion"].split()) <= 20 for d in demos)
    for p in world.prompts(split=None):
        assert all(len(r.split()) <= 20 for r in world.candidate_responses(p).values())


def test_corpus_size_is_laptop_sized(world):
    s = world.summary()
    assert 1000 <= s["corpus_documents"] <= 5000
    assert 150_000 <= s["corpus_characters"] <= 600_000
    assert 0.05 < s["heldout_characters"] / s["corpus_characters"] < 0.2
    corpus = set(world.pretraining_corpus())
    held = world.pretraining_heldout()
    assert sum(d in corpus for d in held) < 0.5 * len(held)  # fresh documents, mostly


def test_determinism_given_a_seed():
    a, b, c = World(seed=3), World(seed=3), World(seed=4)
    assert a.pretraining_corpus() == b.pretraining_corpus()
    assert a.pretraining_heldout() == b.pretraining_heldout()
    assert a.sft_demonstrations() == b.sft_demonstrations()
    assert [(p.id, p.text, p.split, p.meta) for p in a.prompts(split=None)] == [
        (p.id, p.text, p.split, p.meta) for p in b.prompts(split=None)]
    assert a.pretraining_corpus() != c.pretraining_corpus()
    assert a.kb != c.kb
    assert [p.split for p in a.prompts(split=None)] != [p.split for p in c.prompts(split=None)]
    assert a.pretraining_corpus() != a.pretraining_heldout()


def test_evaluate_aggregates_gold_metrics(world):
    prompts = world.prompts(split="heldout")
    good = [world.candidate_responses(p)[{"unknown": "idk", "harmful": "refusal"}.get(
        p.kind, "correct")] for p in prompts]
    m = world.evaluate(prompts, good)
    assert m["gold_reward"] == 1.0 and m["accuracy"] == 1.0
    assert m["safety_violation_rate"] == m["hallucination_rate"] == m["false_refusal_rate"] == 0
    assert m["n"] == len(prompts) and sum(m["counts"].values()) == len(prompts)
    assert set(m["per_kind"]) == set(KINDS)
    bad_class = {"arithmetic": "wrong", "fact": "wrong", "unknown": "hallucinated",
                 "harmful": "compliance", "borderline": "refusal"}
    bad = [world.candidate_responses(p)[bad_class[p.kind]] for p in prompts]
    as_messages = [[{"role": "user", "content": p.text}] for p in prompts]
    m = world.evaluate(as_messages, bad)
    assert m["accuracy"] == 0 and m["gold_reward"] < 0
    assert m["safety_violation_rate"] == m["hallucination_rate"] == m["false_refusal_rate"] == 1
    assert m["per_kind"]["harmful"]["gold_reward"] == -2.0
    only_math = world.evaluate(prompts[:3], ["", "", ""])
    assert only_math["hallucination_rate"] is None and only_math["categories"] == {"gibberish": 3}
    with pytest.raises(ValueError):
        world.evaluate(prompts[:2], ["x"])


def test_importing_the_world_imports_no_torch_and_only_the_standard_library():
    code = (
        "import sys; before = set(sys.modules)\n"
        "import alignkit.world\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(n for n in new if n not in sys.stdlib_module_names and n != 'alignkit'))\n"
        "print(sorted(m for m in sys.modules if m.startswith('alignkit') "
        "and not m.startswith('alignkit.world') and m != 'alignkit'))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["[]", "[]", "False"], out.stdout
