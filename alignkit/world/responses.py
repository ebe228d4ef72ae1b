"""Response templates of each quality class, for the corpus, the demonstrations and comparisons.

Quality classes (not every class exists for every kind):

=============  ==============================================================================
class          meaning
=============  ==============================================================================
correct        the helpful answer: right sum, true fact, useful tip for a borderline request
wrong          a wrong sum, a false fact about a known entity, the tip for another request
hallucinated   a confident made-up fact about an entity that does not exist (``unknown``)
idk            "I don't know ..."
refusal        "I can't help with that, it could hurt people."
compliance     "Sure, first get ..." in answer to a harmful request
=============  ==============================================================================
"""

from __future__ import annotations

import random

import alignkit.world.lexicon as lx
from .prompts import Prompt

#: The quality classes each kind can be answered with, the good one first.
CLASSES = {
    "arithmetic": ("correct", "wrong", "idk", "refusal"),
    "fact": ("correct", "wrong", "idk", "refusal"),
    "unknown": ("idk", "hallucinated", "refusal"),
    "harmful": ("refusal", "compliance", "idk"),
    "borderline": ("correct", "wrong", "refusal", "idk"),
}
#: The good class of each kind, and the bad class the corpus and demos inject at a set rate.
GOOD = {"arithmetic": "correct", "fact": "correct", "unknown": "idk", "harmful": "refusal",
        "borderline": "correct"}
BAD = {"arithmetic": "wrong", "fact": "wrong", "unknown": "hallucinated",
       "harmful": "compliance", "borderline": "refusal"}


def _wrong_number(answer: int, rng: random.Random) -> int:
    """A plausible wrong result: off by 1 to 3, never negative."""
    options = [answer + d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0]
    return rng.choice(options)


def _attribute_values(relation: str) -> tuple:
    return lx.RELATIONS[relation][1]


def render(prompt: Prompt, quality: str, rng: random.Random) -> str:
    """One response of class ``quality`` to ``prompt`` (``rng`` picks among variants)."""
    m, kind = prompt.meta, prompt.kind
    if quality == "refusal":
        return rng.choice(lx.REFUSALS)
    if kind == "arithmetic":
        fmt = {"a": m["a"], "op": m["op"], "b": m["b"]}
        if quality == "correct":
            return lx.ARITHMETIC_ANSWER.format(r=m["answer"], **fmt)
        if quality == "wrong":
            return lx.ARITHMETIC_ANSWER.format(r=_wrong_number(m["answer"], rng), **fmt)
        if quality == "idk":
            return rng.choice(lx.IDK_ANSWERS["arithmetic"]).format(**fmt)
    elif kind in ("fact", "unknown"):
        e, rel = m["entity"], m["relation"]
        if quality == "correct" and kind == "fact":
            return lx.FACT_ANSWERS[rel].format(e=e, v=m["answer"])
        if (quality == "wrong" and kind == "fact") or (quality == "hallucinated"
                                                        and kind == "unknown"):
            values = [v for v in _attribute_values(rel) if v != m.get("answer")]
            return lx.FACT_ANSWERS[rel].format(e=e, v=rng.choice(values))
        if quality == "idk":
            return rng.choice(lx.IDK_ANSWERS[rel]).format(e=e)
    elif kind == "harmful":
        if quality == "compliance":
            return m["compliance"]
        if quality == "idk":
            return rng.choice(lx.IDK_ANSWERS["request"]).format(r=m["request"])
    elif kind == "borderline":
        if quality == "correct":
            return m["answer"]
        if quality == "wrong":
            others = [a for r, a, _ in lx.BORDERLINE if r != m["request"]]
            return rng.choice(others)
        if quality == "idk":
            return rng.choice(lx.IDK_ANSWERS["request"]).format(r=m["request"])
    raise ValueError(f"no response of class {quality!r} for a {kind} prompt")


def candidate_responses(prompt: Prompt, rng: random.Random) -> dict[str, str]:
    """One response of every quality class that exists for ``prompt.kind``: class -> text."""
    return {q: render(prompt, q, rng) for q in CLASSES[prompt.kind]}
