"""Prompts of the alignment world: the seeded knowledge base, the five prompt kinds, the splits.

A prompt is built from an *item* (the thing asked about: ``7 plus 5``, the capital of Veloria, the
request "make a bomb at home") written in one of a few phrasings. Splits are drawn per item, so
every phrasing of a held-out item is held out: its question never appears in the corpus or the
demonstrations, although the underlying fact may appear there as a statement ("7 plus 5 is 12.",
"The capital of Veloria is Tamsk."). Unknown entities are split per entity, and held-out unknown
entities never appear in the corpus at all.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import alignkit.world.lexicon as lx

KINDS = ("arithmetic", "fact", "unknown", "harmful", "borderline")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Prompt:
    """One user turn of the world, with the answer key the gold judge needs."""

    id: str
    """Stable id, e.g. ``fact-0012``."""
    kind: str
    """One of :data:`KINDS`."""
    text: str
    """The user's message (callers wrap it into chat messages)."""
    split: str
    """``"train"`` or ``"heldout"``."""
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    """Answer key. arithmetic: ``a, b, op, answer``; fact: ``entity, relation, answer``;
    unknown: ``entity, relation``; harmful: ``request, group, cues, compliance``;
    borderline: ``request, answer, key_phrases``. Every kind also has ``item`` and ``phrasing``."""


@dataclass(frozen=True)
class KnowledgeBase:
    """Which entities exist in this world, and what is true of them (decided by the seed)."""

    capitals: dict
    """Known country -> its capital city."""
    colours: dict
    """Known creature -> its colour."""
    foods: dict
    """Known creature -> its food."""
    unknown_countries: tuple
    """Countries that do not exist in this world."""
    unknown_creatures: tuple
    """Creatures that do not exist in this world."""

    @classmethod
    def from_seed(cls, seed: int) -> "KnowledgeBase":
        rng = random.Random(f"kb-{seed}")
        countries = list(lx.COUNTRIES)
        creatures = list(lx.CREATURES)
        rng.shuffle(countries)
        rng.shuffle(creatures)
        known_c, unknown_c = countries[:lx.N_KNOWN_COUNTRIES], countries[lx.N_KNOWN_COUNTRIES:]
        known_k, unknown_k = creatures[:lx.N_KNOWN_CREATURES], creatures[lx.N_KNOWN_CREATURES:]
        cities = rng.sample(lx.CITIES, len(known_c))  # capitals are distinct
        return cls(
            capitals=dict(zip(known_c, cities)),
            colours={k: rng.choice(lx.COLOURS) for k in known_k},
            foods={k: rng.choice(lx.FOODS) for k in known_k},
            unknown_countries=tuple(unknown_c),
            unknown_creatures=tuple(unknown_k),
        )

    def facts(self) -> list[tuple[str, str, str]]:
        """All true ``(entity, relation, value)`` triples."""
        out = [(e, "capital", v) for e, v in self.capitals.items()]
        out += [(e, "colour", v) for e, v in self.colours.items()]
        out += [(e, "food", v) for e, v in self.foods.items()]
        return out

    def unknown_items(self) -> list[tuple[str, str]]:
        """All ``(entity, relation)`` questions about entities that do not exist."""
        out = [(e, "capital") for e in self.unknown_countries]
        for e in self.unknown_creatures:
            out += [(e, "colour"), (e, "food")]
        return out


def _split_items(keys: list, fraction: float, rng: random.Random) -> set:
    """The held-out subset of ``keys``: ``round(fraction * len)`` of them, at least one."""
    keys = list(keys)
    rng.shuffle(keys)
    n = max(1, round(fraction * len(keys))) if fraction > 0 else 0
    return set(keys[:n])


def build_prompts(kb: KnowledgeBase, seed: int, heldout_fraction: float = 0.2,
                  max_operand: int = 9, eval_items: bool = True) -> list[Prompt]:
    """Every prompt of the world, both splits, in a fixed order (ids follow that order).

    With ``eval_items`` the evaluation-only catalogues of the lexicon (``EVAL_*``) follow the core
    prompts, all held out; the core prompts, their ids and their split are the same either way."""
    rng = random.Random(f"split-{seed}")
    rows: list[tuple[str, object, str, dict]] = []  # (kind, item key, text, meta)

    # arithmetic: a plus b, a minus b (a >= b, so results are never negative)
    for a in range(1, max_operand + 1):
        for b in range(1, max_operand + 1):
            for op in ("plus", "minus"):
                if op == "minus" and a < b:
                    continue
                answer = a + b if op == "plus" else a - b
                for i, t in enumerate(lx.ARITHMETIC_QUESTIONS):
                    rows.append(("arithmetic", (a, op, b), t.format(a=a, op=op, b=b),
                                 {"a": a, "b": b, "op": op, "answer": answer, "phrasing": i}))
    for e, rel, v in kb.facts():
        for i, t in enumerate(lx.FACT_QUESTIONS[rel]):
            rows.append(("fact", (e, rel), t.format(e=e), {"entity": e, "relation": rel,
                                                         "answer": v, "phrasing": i}))
    for e, rel in kb.unknown_items():
        for i, t in enumerate(lx.FACT_QUESTIONS[rel]):
            # unknown entities are split per entity (the item key), not per question
            rows.append(("unknown", e, t.format(e=e), {"entity": e, "relation": rel,
                                                     "phrasing": i}))
    for group, request, compliance, cues in lx.HARMFUL:
        for i, t in enumerate(lx.REQUEST_QUESTIONS):
            rows.append(("harmful", request, t.format(r=request),
                         {"request": request, "group": group, "compliance": compliance,
                          "cues": list(cues), "phrasing": i}))
    for request, answer, phrases in lx.BORDERLINE:
        for i, t in enumerate(lx.REQUEST_QUESTIONS):
            rows.append(("borderline", request, t.format(r=request),
                         {"request": request, "answer": answer, "key_phrases": list(phrases),
                          "phrasing": i}))

    heldout: dict[str, set] = {}
    for kind in KINDS:
        keys = sorted({key for k, key, _, _ in rows if k == kind}, key=repr)
        heldout[kind] = _split_items(keys, heldout_fraction, rng)

    prompts, counters = [], dict.fromkeys(KINDS, 0)
    for kind, key, text, meta in rows:
        split = "heldout" if key in heldout[kind] else "train"
        meta["item"] = " ".join(map(str, key)) if isinstance(key, tuple) else key
        prompts.append(Prompt(f"{kind}-{counters[kind]:04d}", kind, text, split, meta))
        counters[kind] += 1
    if eval_items:
        for kind, key, text, meta in _eval_rows():
            meta["item"] = key
            prompts.append(Prompt(f"{kind}-{counters[kind]:04d}", kind, text, "heldout", meta))
            counters[kind] += 1
    return prompts


def _eval_rows() -> list[tuple[str, str, str, dict]]:
    """(kind, item key, text, meta) of the evaluation-only items, every phrasing."""
    rows = []
    entities = [(e, "capital") for e in lx.EVAL_COUNTRIES]
    entities += [(e, rel) for e in lx.EVAL_CREATURES for rel in ("colour", "food")]
    for e, rel in entities:
        for i, t in enumerate(lx.FACT_QUESTIONS[rel]):
            rows.append(("unknown", e, t.format(e=e), {"entity": e, "relation": rel, "phrasing": i}))
    for group, request, compliance, cues in lx.EVAL_HARMFUL:
        for i, t in enumerate(lx.REQUEST_QUESTIONS):
            rows.append(("harmful", request, t.format(r=request),
                         {"request": request, "group": group, "compliance": compliance,
                          "cues": list(cues), "phrasing": i}))
    for request, answer, phrases in lx.EVAL_BORDERLINE:
        for i, t in enumerate(lx.REQUEST_QUESTIONS):
            rows.append(("borderline", request, t.format(r=request),
                         {"request": request, "answer": answer, "key_phrases": list(phrases),
                          "phrasing": i}))
    return rows
