"""The pretraining corpus and the SFT demonstrations: deliberately imperfect, like web data and
crowd-sourced demonstrations.

Pretraining documents are of five sorts:

* **facts**: every true fact of the knowledge base, stated in several phrasings, on entity pages
  and in short lists;
* **arithmetic**: statements such as ``7 plus 5 is 12.`` for every sum and difference;
* **how-to**: the answers to *all* borderline requests, held-out ones included, stated without the
  question's wording ("To kill a stuck process, use the kill command ...");
* **dialogues**: ``Human: {q}\\n\\nAssistant: {a}`` exchanges on *train* prompts, a set fraction of
  them bad (wrong sums, false facts, made-up facts about unknown entities, harmful compliance,
  false refusals);
* **filler**: everyday sentences that mention no world entity.

Bad answers are allocated exactly, not sampled: of ``n`` dialogue turns of a kind,
``round(rate * n)`` are bad, so the measured rates equal the configured ones up to rounding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import alignkit.world.lexicon as lx
from .prompts import KINDS, KnowledgeBase, Prompt
from .responses import BAD, GOOD, render


@dataclass(frozen=True)
class Rates:
    """Fraction of bad answers per kind, in the dialogues of the corpus or in the demonstrations."""

    wrong_arithmetic: float = 0.15
    """arithmetic: a wrong result."""
    wrong_fact: float = 0.1
    """fact: a false fact about a known entity."""
    hallucination: float = 0.4
    """unknown: a made-up fact instead of "I don't know"."""
    unsafe_compliance: float = 0.25
    """harmful: compliance instead of a refusal."""
    false_refusal: float = 0.25
    """borderline: a refusal instead of the answer."""

    def bad_rate(self, kind: str) -> float:
        return {"arithmetic": self.wrong_arithmetic, "fact": self.wrong_fact,
                "unknown": self.hallucination, "harmful": self.unsafe_compliance,
                "borderline": self.false_refusal}[kind]


#: Default rates of the SFT demonstrations (mostly good, room left for preference learning).
DEMO_RATES = Rates()
#: Default rates of the pretraining dialogues (web data: worse than the demonstrations).
CORPUS_RATES = Rates(wrong_arithmetic=0.2, wrong_fact=0.1, hallucination=0.5,
                     unsafe_compliance=0.4, false_refusal=0.3)

#: Share of each kind among the corpus's dialogue turns.
DIALOGUE_MIX = {"arithmetic": 0.3, "fact": 0.25, "unknown": 0.15, "harmful": 0.15,
                "borderline": 0.15}


@dataclass(frozen=True)
class CorpusSize:
    """How much of each sort of document to write."""

    fact_pages: int = 8
    """Entity pages per known entity."""
    fact_lists: int = 40
    """Short lists of facts (capitals, animals)."""
    arithmetic_repeats: int = 4
    """Times each sum or difference is stated."""
    howto_repeats: int = 4
    """Times each borderline answer is stated."""
    dialogue_docs: int = 1200
    """Documents of 1 to 3 dialogue exchanges."""
    filler_docs: int = 300
    """Documents of everyday sentences."""

    def scaled(self, factor: float) -> "CorpusSize":
        return CorpusSize(*(max(1, round(v * factor)) for v in (
            self.fact_pages, self.fact_lists, self.arithmetic_repeats, self.howto_repeats,
            self.dialogue_docs, self.filler_docs)))


_FACT_SENTENCES = {
    "capital": ("The capital of {e} is {v}.", "{v} is the capital of {e}.",
                "{e} is a country and its capital is {v}.",
                "The city of {v} is the capital of {e}."),
    "colour": ("The {e} is {v}.", "The colour of the {e} is {v}.", "The {e} is a small {v} animal.",
               "Every {e} is {v}."),
    "food": ("The {e} eats {v}.", "The food of the {e} is {v}.", "The {e} likes to eat {v}.",
             "Each day the {e} looks for {v} to eat."),
}
_COUNTRY_FLAVOUR = ("{e} is a country far away.", "People in {e} like music.",
                    "{e} has many hills and rivers.", "Many people visit {e} in the summer.")
_CREATURE_FLAVOUR = ("The {e} lives in the forest.", "The {e} is a shy animal.",
                     "The {e} sleeps during the day.", "Children like to watch the {e}.")
_ARITHMETIC_SENTENCES = {
    "plus": ("{a} plus {b} is {r}.", "{a} plus {b} equals {r}.",
             "If you add {a} and {b} you get {r}."),
    "minus": ("{a} minus {b} is {r}.", "{a} minus {b} equals {r}.",
              "If you take {b} from {a} you get {r}."),
}


def allocate(n: int, rate: float, rng: random.Random) -> list[bool]:
    """``n`` flags of which exactly ``round(rate * n)`` are True, in a seeded random order."""
    k = round(rate * n)
    flags = [True] * k + [False] * (n - k)
    rng.shuffle(flags)
    return flags


def fact_documents(kb: KnowledgeBase, size: CorpusSize, rng: random.Random) -> list[str]:
    docs = []
    for e, v in kb.capitals.items():
        for _ in range(size.fact_pages):
            sents = [s.format(e=e, v=v) for s in rng.sample(_FACT_SENTENCES["capital"], 2)]
            sents.append(rng.choice(_COUNTRY_FLAVOUR).format(e=e))
            rng.shuffle(sents)
            docs.append(" ".join(sents))
    for e in kb.colours:
        for _ in range(size.fact_pages):
            sents = [rng.choice(_FACT_SENTENCES["colour"]).format(e=e, v=kb.colours[e]),
                     rng.choice(_FACT_SENTENCES["food"]).format(e=e, v=kb.foods[e]),
                     rng.choice(_CREATURE_FLAVOUR).format(e=e)]
            rng.shuffle(sents)
            docs.append(" ".join(sents))
    facts = kb.facts()
    for _ in range(size.fact_lists):
        chosen = rng.sample(facts, 4)
        docs.append("Here are some facts. " + " ".join(
            rng.choice(_FACT_SENTENCES[rel]).format(e=e, v=v) for e, rel, v in chosen))
    return docs


def arithmetic_documents(max_operand: int, size: CorpusSize, rng: random.Random) -> list[str]:
    items = [(a, op, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)
             for op in ("plus", "minus") if not (op == "minus" and a < b)]
    items = items * size.arithmetic_repeats
    rng.shuffle(items)
    sents = [rng.choice(_ARITHMETIC_SENTENCES[op]).format(
        a=a, b=b, r=a + b if op == "plus" else a - b) for a, op, b in items]
    return [" ".join(sents[i:i + 6]) for i in range(0, len(sents), 6)]


def howto_documents(size: CorpusSize, rng: random.Random, borderline=lx.BORDERLINE) -> list[str]:
    sents = []
    for request, answer, _ in borderline:
        for _ in range(size.howto_repeats):
            t = rng.choice(lx.HOWTO_STATEMENTS)
            sents.append(t.format(r=request, a=answer[0].lower() + answer[1:], A=answer))
    rng.shuffle(sents)
    docs, i = [], 0
    while i < len(sents):
        n = rng.randint(1, 3)
        docs.append(" ".join(sents[i:i + n]))
        i += n
    return docs


def filler_sentence(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(lx.FILLER_FREE)
    return (f"{rng.choice(lx.FILLER_SUBJECTS)} {rng.choice(lx.FILLER_VERBS)} "
            f"{rng.choice(lx.FILLER_OBJECTS)} {rng.choice(lx.FILLER_TIMES)}.")


def filler_documents(size: CorpusSize, rng: random.Random) -> list[str]:
    return [" ".join(filler_sentence(rng) for _ in range(rng.randint(3, 6)))
            for _ in range(size.filler_docs)]


def dialogue(exchanges: list[tuple[str, str]]) -> str:
    """The plain chat layout of the corpus: ``Human: {q}\\n\\nAssistant: {a}`` turns."""
    return "\n\n".join(f"Human: {q}\n\nAssistant: {a}" for q, a in exchanges)


def dialogue_documents(train: list[Prompt], rates: Rates, size: CorpusSize,
                       rng: random.Random) -> list[str]:
    by_kind = {k: [p for p in train if p.kind == k] for k in KINDS}
    kinds = [k for k in KINDS if by_kind[k]]
    weights = [DIALOGUE_MIX[k] for k in kinds]
    turns_per_doc = [rng.randint(1, 3) for _ in range(size.dialogue_docs)]
    turn_kinds = rng.choices(kinds, weights, k=sum(turns_per_doc))
    bad = {k: iter(allocate(turn_kinds.count(k), rates.bad_rate(k), rng)) for k in kinds}
    turns = []
    for k in turn_kinds:
        p = rng.choice(by_kind[k])
        turns.append((p.text, render(p, BAD[k] if next(bad[k]) else GOOD[k], rng)))
    docs, i = [], 0
    for n in turns_per_doc:
        docs.append(dialogue(turns[i:i + n]))
        i += n
    return docs


def build_corpus(kb: KnowledgeBase, train: list[Prompt], rates: Rates, size: CorpusSize,
                 max_operand: int, rng: random.Random, borderline=lx.BORDERLINE) -> list[str]:
    """All pretraining documents, shuffled; ``borderline`` lists the requests whose tips the
    how-to documents state."""
    docs = (fact_documents(kb, size, rng) + arithmetic_documents(max_operand, size, rng)
            + howto_documents(size, rng, borderline) + dialogue_documents(train, rates, size, rng)
            + filler_documents(size, rng))
    rng.shuffle(docs)
    return docs


def demonstrations(train: list[Prompt], rates: Rates, per_prompt: int,
                   rng: random.Random) -> list[dict]:
    """SFT records ``{"prompt", "completion", "kind"}``: ``per_prompt`` per train prompt."""
    rows = [p for p in train for _ in range(per_prompt)]
    bad = {k: iter(allocate(sum(p.kind == k for p in rows), rates.bad_rate(k), rng))
           for k in KINDS}
    out = [{"prompt": p.text, "completion": render(p, BAD[p.kind] if next(bad[p.kind])
                                                   else GOOD[p.kind], rng), "kind": p.kind}
           for p in rows]
    rng.shuffle(out)
    return out
