"""The ``World`` facade: one seeded alignment world, its data, its judge, labelers and metrics."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from functools import cached_property

import alignkit.world.corpus as cp
import alignkit.world.lexicon as lx
from .judge import CATEGORIES, GoldJudge
from .labelers import Labeler
from .prompts import KINDS, SPLITS, KnowledgeBase, Prompt, build_prompts
from .responses import candidate_responses


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a world. Equal configs give identical worlds."""

    seed: int = 0
    """Seeds the knowledge base, the splits, the corpus and the demonstrations."""
    heldout_fraction: float = 0.2
    """Fraction of items (sums, facts, unknown entities, requests) held out per kind."""
    max_operand: int = 9
    """Arithmetic uses operands 1..max_operand (plus, and minus with a non-negative result)."""
    corpus_rates: cp.Rates = field(default_factory=lambda: cp.CORPUS_RATES)
    """Bad-answer rates of the corpus's dialogues."""
    demo_rates: cp.Rates = field(default_factory=lambda: cp.DEMO_RATES)
    """Bad-answer rates of the SFT demonstrations."""
    corpus_size: cp.CorpusSize = field(default_factory=cp.CorpusSize)
    """How many documents of each sort the pretraining corpus has."""
    heldout_scale: float = 0.1
    """Size of the held-out pretraining documents relative to the corpus."""
    demos_per_prompt: int = 1
    """Demonstrations per train prompt."""
    eval_items: bool = True
    """Add the evaluation-only items to the held-out split (the lexicon's ``EVAL_*`` catalogues:
    25 more unknown entities, 36 harmful and 35 borderline requests; never in a train prompt, a
    dialogue or a demonstration; the borderline tips are stated in the corpus, as every tip is), so
    that each held-out rate has a 95% interval of about ±7 points or less. False gives the core
    world alone (15 unknown-entity, 24 harmful and 27 borderline held-out prompts at seed 0)."""


def _user_text(prompt) -> str:
    """The user text of a prompt given as text, a Prompt or chat messages (last user turn)."""
    if isinstance(prompt, Prompt):
        return prompt.text
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        if users:
            return users[-1]
    raise TypeError(f"cannot read a prompt from {type(prompt).__name__}")


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _rate(flags) -> float | None:
    return _mean(float(f) for f in flags)


class World:
    """A seeded alignment world.

    ``World(seed=0)`` or ``World(config)``; keyword arguments override config fields, e.g.
    ``World(seed=1, demo_rates=Rates(hallucination=0.6))``.
    """

    def __init__(self, config: WorldConfig | None = None, **overrides):
        self.config = replace(config or WorldConfig(), **overrides)
        c = self.config
        self.kb = KnowledgeBase.from_seed(c.seed)
        self._prompts = build_prompts(self.kb, c.seed, c.heldout_fraction, c.max_operand, c.eval_items)
        self._by_text = {p.text: p for p in self._prompts}
        self.judge = GoldJudge(lookup=self.find_prompt)

    # ---------------------------------------------------------------- prompts

    def prompts(self, kind: str | None = None, split: str | None = "train") -> list[Prompt]:
        """Prompts of one kind (or all kinds) and one split (``None`` for both)."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [p for p in self._prompts
                if (kind is None or p.kind == kind) and (split is None or p.split == split)]

    def find_prompt(self, prompt) -> Prompt:
        """The world's Prompt for a text, a Prompt or a list of chat messages."""
        text = _user_text(prompt).strip()
        try:
            return self._by_text[text]
        except KeyError:
            raise KeyError(f"not a prompt of this world: {text!r}") from None

    def candidate_responses(self, prompt, rng: random.Random | None = None) -> dict[str, str]:
        """One response of each quality class for ``prompt`` (class -> text)."""
        return candidate_responses(self.find_prompt(prompt), rng or random.Random(0))

    # ---------------------------------------------------------------- data

    @cached_property
    def _corpus(self) -> list[str]:
        c = self.config
        return cp.build_corpus(self.kb, self.prompts(split="train"), c.corpus_rates,
                               c.corpus_size, c.max_operand, random.Random(f"corpus-{c.seed}"),
                               self._tips)

    @cached_property
    def _corpus_heldout(self) -> list[str]:
        c = self.config
        return cp.build_corpus(self.kb, self.prompts(split="train"), c.corpus_rates,
                               c.corpus_size.scaled(c.heldout_scale), c.max_operand,
                               random.Random(f"corpus-heldout-{c.seed}"), self._tips)

    @property
    def _tips(self) -> tuple:
        """The borderline requests whose tips the corpus states: every one in the world."""
        return lx.ALL_BORDERLINE if self.config.eval_items else lx.BORDERLINE

    @cached_property
    def _demos(self) -> list[dict]:
        c = self.config
        return cp.demonstrations(self.prompts(split="train"), c.demo_rates, c.demos_per_prompt,
                                 random.Random(f"demos-{c.seed}"))

    def pretraining_corpus(self) -> list[str]:
        """Pretraining documents (facts, sums, how-to tips, dialogues, filler), shuffled."""
        return list(self._corpus)

    def pretraining_heldout(self) -> list[str]:
        """Fresh documents of the same distribution, to measure LM loss (the alignment tax)."""
        return list(self._corpus_heldout)

    def sft_demonstrations(self) -> list[dict]:
        """SFT records ``{"prompt", "completion", "kind"}`` on train prompts, imperfect at
        ``config.demo_rates``."""
        return [dict(d) for d in self._demos]

    # ---------------------------------------------------------------- judging and labelling

    def labeler(self, kind: str = "helpfulness", variant: str = "honest",
                temperature: float = 1.0, seed: int | None = None) -> Labeler:
        """A simulated labeler (see :mod:`alignkit.world.labelers`); ``seed`` defaults to the
        world's seed."""
        return Labeler(self.judge, kind, variant, temperature,
                       self.config.seed if seed is None else seed)

    def reward(self, prompt, response: str) -> float:
        """Gold reward of one response: a reward function ``(prompt, response) -> float``."""
        return self.judge.reward(prompt, response)

    def evaluate(self, prompts, responses) -> dict:
        """Aggregate gold metrics of ``responses[i]`` to ``prompts[i]``.

        Returns ``n``, ``gold_reward``, ``helpfulness``, ``harmlessness``, ``honesty`` (means over
        all), ``accuracy`` (fraction correct over arithmetic and fact prompts),
        ``safety_violation_rate`` (over harmful), ``hallucination_rate`` (over unknown),
        ``false_refusal_rate`` (over borderline), ``refusal_rate`` (over all), ``penalty`` (mean
        form penalty), ``counts`` (prompts per kind), ``categories`` (category -> count) and
        ``per_kind`` (kind -> the same means and rates over that kind). A rate over no prompts
        is None.
        """
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = []
        for prompt, response in zip(prompts, responses):
            p = self.find_prompt(prompt)
            rows.append((p, self.judge.score(p, response)))
        out = self._summary(rows)
        out["per_kind"] = {k: self._summary([r for r in rows if r[0].kind == k])
                           for k in KINDS if any(r[0].kind == k for r in rows)}
        for v in out["per_kind"].values():
            v.pop("counts")
        return out

    @staticmethod
    def _summary(rows) -> dict:
        def over(kinds):
            return [j for p, j in rows if p.kind in kinds]

        js = [j for _, j in rows]
        cats = {c: 0 for c in CATEGORIES}
        for j in js:
            cats[j.category] += 1
        return {
            "n": len(js),
            "gold_reward": _mean(j.reward for j in js),
            "helpfulness": _mean(j.helpfulness for j in js),
            "harmlessness": _mean(j.harmlessness for j in js),
            "honesty": _mean(j.honesty for j in js),
            "accuracy": _rate(j.correct for j in over(("arithmetic", "fact"))),
            "safety_violation_rate": _rate(j.safety_violation for j in over(("harmful",))),
            "hallucination_rate": _rate(j.hallucination for j in over(("unknown",))),
            "false_refusal_rate": _rate(j.false_refusal for j in over(("borderline",))),
            "refusal_rate": _rate(j.refusal for j in js),
            "penalty": _mean(j.penalty for j in js),
            "counts": {k: sum(p.kind == k for p, _ in rows) for k in KINDS},
            "categories": {c: n for c, n in cats.items() if n},
        }

    def summary(self) -> dict:
        """Sizes: prompts per kind and split, corpus documents and characters, demonstrations."""
        corpus, held = self._corpus, self._corpus_heldout
        return {
            "prompts": {k: {s: len(self.prompts(k, s)) for s in SPLITS} for k in KINDS},
            "facts": len(self.kb.facts()),
            "corpus_documents": len(corpus),
            "corpus_characters": sum(map(len, corpus)),
            "heldout_documents": len(held),
            "heldout_characters": sum(map(len, held)),
            "demonstrations": len(self._demos),
        }
