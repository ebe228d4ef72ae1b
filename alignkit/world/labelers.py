"""Simulated labelers: comparison, ranking, unpaired and rating data from any responses.

A labeler has a noise-free utility ``g(prompt, response)`` read off the gold judge, and perceives
``g + temperature * G`` with ``G`` a standard Gumbel draw, fresh per response and per decision.
For a pair the difference of two Gumbels is logistic, so

    P(a ≻ b) = σ((g(a) − g(b)) / temperature)                       (Bradley–Terry)

and sorting k perceived utilities samples a Plackett–Luce ranking with the same pairwise
marginals. Temperature 0 is the gold order; exact ties are broken by a coin seeded by the
labeler's seed and the pair's texts, so the outcome does not depend on call order.

Utilities (``kind``):

* ``helpfulness`` (Llama 2's helpfulness annotators): ``g = helpfulness``. It ignores harm, so it
  prefers complying with a harmful request over refusing it.
* ``safety`` (Llama 2's safety annotators): ``g = harmlessness + 0.25 * helpfulness``: safety
  first, helpfulness breaks the tie between two safe responses (so it dislikes false refusals).
* ``overall`` (one InstructGPT-style labeler): ``g = reward``, the gold reward.

Variants (``variant``), after Schulman's account of why RLHF can teach hallucination:

* ``honest``: the gold utilities above; a made-up fact about an unknown entity is punished.
* ``confident``: the labeler cannot verify facts about unknown entities, so on ``unknown``
  prompts it scores a made-up answer (category ``hallucination``) as if it were a correct answer
  and an honest "I don't know" (``honest_unknown``) as if it were a needless "I don't know" on a
  known fact, i.e. with the values of ``correct`` and ``needless_idk`` (minus the same form
  penalty). Nothing else changes. With the helpfulness utility the two variants therefore
  disagree exactly on pairs of a made-up answer and an honest "I don't know" (unpenalised ones).

Margin labels come from the perceived gap ``|Δ|`` (the gold gap at temperature 0), see
:data:`MARGIN_THRESHOLDS`. Records are plain dicts in alignkit's data formats.

Critiques (the data of a critique / generative reward model): the labeler writes the gold judge's
short critique of each response (the words a careful annotator would use: "The response states a
capital for a country that does not exist (hallucination).") and gives its own verdict, the noisy
choice of :meth:`Labeler.compare`; so a verdict can disagree with the critique at the labeler's
noise rate. Pointwise critiques carry a score: the noisy utility mapped onto the integers
1..max_score (see :meth:`Labeler.critique_score`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable

from .judge import CATEGORIES, REWARD_RANGE, GoldJudge, Judgement
from .prompts import Prompt

#: (lower bound of the perceived gap |Δ|, margin label), largest first.
MARGIN_THRESHOLDS = (
    (1.0, "significantly better"),
    (0.5, "better"),
    (0.2, "slightly better"),
    (0.0, "negligibly better"),
)
KINDS = ("helpfulness", "safety", "overall")
VARIANTS = ("honest", "confident")
#: Weight of helpfulness in the safety labeler's utility.
SAFETY_HELPFULNESS_WEIGHT = 0.25
#: Range of each kind's noise-free utility; pointwise critique scores map it onto 1..max_score.
UTILITY_RANGE = {
    "helpfulness": (-1.0, 1.0),
    "safety": (-1.0 - SAFETY_HELPFULNESS_WEIGHT, 1.0 + SAFETY_HELPFULNESS_WEIGHT),
    "overall": REWARD_RANGE,
}


def margin_label(gap: float) -> str:
    """The margin label of a perceived utility gap (its absolute value is used)."""
    gap = abs(gap)
    for bound, label in MARGIN_THRESHOLDS:
        if gap >= bound:
            return label
    return MARGIN_THRESHOLDS[-1][1]


class Labeler:
    """A simulated annotator. See the module docstring for the model.

    Args:
        judge: the gold judge (``World.judge`` can also resolve prompt texts).
        kind: ``"helpfulness"``, ``"safety"`` or ``"overall"``.
        variant: ``"honest"`` or ``"confident"``.
        temperature: noise scale of the perceived utility (0 = the gold order).
        seed: seeds the noise and the tie coins.
    """

    def __init__(self, judge: GoldJudge, kind: str = "helpfulness", variant: str = "honest",
                 temperature: float = 1.0, seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        self.judge, self.kind, self.variant = judge, kind, variant
        self.temperature, self.seed = float(temperature), seed
        self.rng = random.Random(f"labeler-{seed}")

    # ---------------------------------------------------------------- utilities

    def _perceived(self, p: Prompt, j: Judgement) -> Judgement:
        """The judgement as this labeler sees it (the confident variant's blind spot)."""
        if self.variant == "confident" and p.kind == "unknown":
            as_if = {"hallucination": "correct", "honest_unknown": "needless_idk"}.get(j.category)
            if as_if:
                help_, _, _, reward = CATEGORIES[as_if]
                return Judgement(**{**j.as_dict(),
                                    "helpfulness": round(max(-1.0, help_ - j.penalty), 4),
                                    "reward": round(reward - j.penalty, 4)})
        return j

    def utility(self, prompt, response: str) -> float:
        """Noise-free utility ``g`` of a response, as this labeler values it."""
        p = self.judge.resolve(prompt)
        j = self._perceived(p, self.judge.score(p, response))
        if self.kind == "helpfulness":
            return j.helpfulness
        if self.kind == "safety":
            return j.harmlessness + SAFETY_HELPFULNESS_WEIGHT * j.helpfulness
        return j.reward

    def prob_prefers(self, prompt, a: str, b: str) -> float:
        """P(a ≻ b) = σ((g(a) − g(b)) / temperature); 0.5 on a tie."""
        delta = self.utility(prompt, a) - self.utility(prompt, b)
        if self.temperature == 0:
            return 0.5 if delta == 0 else float(delta > 0)
        return 1.0 / (1.0 + math.exp(-max(-500.0, min(500.0, delta / self.temperature))))

    def _gumbel(self) -> float:
        u = self.rng.random()
        while u <= 0.0:
            u = self.rng.random()
        return -math.log(-math.log(u))

    def _logistic(self) -> float:
        return self._gumbel() - self._gumbel()

    def _noisy(self, g: float) -> float:
        return g + self.temperature * self._gumbel() if self.temperature > 0 else g

    def _coin(self, *texts: str) -> bool:
        """A fair coin fixed by the seed and the texts (order-independent tie breaking)."""
        h = hashlib.sha256("\x00".join((str(self.seed),) + texts).encode()).digest()
        return h[0] % 2 == 0

    # ---------------------------------------------------------------- pairwise

    def compare(self, prompt, a: str, b: str) -> dict | None:
        """A pairwise record ``{"prompt", "chosen", "rejected", "margin"}``, or None when the two
        responses are identical (nothing to compare)."""
        if a == b:
            return None
        p = self.judge.resolve(prompt)
        gap = self._noisy(self.utility(p, a)) - self._noisy(self.utility(p, b))
        if gap != 0:
            a_wins = gap > 0
        else:  # exact tie: a coin on the unordered pair, so swapping a and b changes nothing
            lo, hi = sorted((a, b))
            a_wins = (a == lo) == self._coin(p.text, lo, hi)
        chosen, rejected = (a, b) if a_wins else (b, a)
        return {"prompt": p.text, "chosen": chosen, "rejected": rejected,
                "margin": margin_label(gap)}

    def label_pairs(self, pairs: Iterable[tuple]) -> tuple[list[dict], dict]:
        """Label ``(prompt, a, b)`` triples. Returns ``(records, counts)`` with counts
        ``pairs`` (seen), ``labelled`` and ``skipped_identical``."""
        records, skipped, n = [], 0, 0
        for prompt, a, b in pairs:
            n += 1
            rec = self.compare(prompt, a, b)
            if rec is None:
                skipped += 1
            else:
                records.append(rec)
        return records, {"pairs": n, "labelled": len(records), "skipped_identical": skipped}

    # ---------------------------------------------------------------- rankings

    def rank(self, prompt, responses: list[str]) -> dict | None:
        """A k-way ranking ``{"prompt", "responses", "ranking"}`` (indices, best first).
        Repeated responses are dropped (first one kept); None if fewer than two remain."""
        p = self.judge.resolve(prompt)
        unique = list(dict.fromkeys(responses))
        if len(unique) < 2:
            return None
        # perceived utility, then a seeded coin-like key so exact ties are order-independent
        keys = [(self._noisy(self.utility(p, r)), self._coin(p.text, r), i)
                for i, r in enumerate(unique)]
        ranking = [i for _, _, i in sorted(keys, key=lambda k: (-k[0], -k[1], k[2]))]
        return {"prompt": p.text, "responses": unique, "ranking": ranking}

    def label_rankings(self, groups: Iterable[tuple]) -> tuple[list[dict], dict]:
        """Rank ``(prompt, responses)`` groups. Counts: ``groups``, ``labelled``,
        ``skipped_identical`` (groups with fewer than two distinct responses) and
        ``dropped_duplicates`` (repeated responses removed from kept groups)."""
        records, skipped, dropped, n = [], 0, 0, 0
        for prompt, responses in groups:
            n += 1
            rec = self.rank(prompt, responses)
            if rec is None:
                skipped += 1
            else:
                dropped += len(responses) - len(rec["responses"])
                records.append(rec)
        return records, {"groups": n, "labelled": len(records), "skipped_identical": skipped,
                         "dropped_duplicates": dropped}

    # ---------------------------------------------------------------- unpaired and ratings

    def unpaired(self, prompt, completion: str, threshold: float = 0.0) -> dict:
        """A KTO record ``{"prompt", "completion", "label"}``: label is whether the noisy
        utility ``g + temperature * L`` (L standard logistic) exceeds ``threshold``, so
        P(label) = σ((g − threshold) / temperature)."""
        p = self.judge.resolve(prompt)
        g = self.utility(p, completion)
        if self.temperature > 0:
            g += self.temperature * self._logistic()
        return {"prompt": p.text, "completion": completion, "label": bool(g > threshold)}

    def rate(self, prompt, response: str) -> dict:
        """A rating record ``{"prompt", "response", "score"}``: ``g + temperature * L``."""
        p = self.judge.resolve(prompt)
        g = self.utility(p, response)
        if self.temperature > 0:
            g += self.temperature * self._logistic()
        return {"prompt": p.text, "response": response, "score": round(g, 4)}

    def label_unpaired(self, items: Iterable[tuple], threshold: float = 0.0) -> list[dict]:
        """``unpaired`` over ``(prompt, completion)`` pairs."""
        return [self.unpaired(p, c, threshold) for p, c in items]

    def label_ratings(self, items: Iterable[tuple]) -> list[dict]:
        """``rate`` over ``(prompt, response)`` pairs."""
        return [self.rate(p, r) for p, r in items]

    # ---------------------------------------------------------------- critiques

    def critique(self, prompt, a: str, b: str) -> dict | None:
        """A written comparison in the ``critique_pair`` format: ``{"prompt", "response_a",
        "response_b", "critique", "verdict", "margin"}``, or None when ``a == b``.

        The critique is the gold judge's critique of each response ("Response A: ... Response B:
        ..."); the verdict (``"A"``/``"B"``) and margin label are this labeler's noisy choice
        (:meth:`compare`). Which response is shown as A is a coin fixed by the seed and the two
        texts, so verdicts are balanced and do not depend on the argument order."""
        rec = self.compare(prompt, a, b)
        if rec is None:
            return None
        p = self.judge.resolve(prompt)
        lo, hi = sorted((a, b))
        first, second = (lo, hi) if self._coin("order", p.text, lo, hi) else (hi, lo)
        text = (f"Response A: {self.judge.critique(p, first)} "
                f"Response B: {self.judge.critique(p, second)}")
        return {"prompt": p.text, "response_a": first, "response_b": second, "critique": text,
                "verdict": "A" if rec["chosen"] == first else "B", "margin": rec["margin"]}

    def critique_records(self, pairs: Iterable[tuple], skip_ties: bool = True) -> tuple[list[dict], dict]:
        """:meth:`critique` over ``(prompt, a, b)`` triples. With ``skip_ties`` a pair whose two
        responses have the same noise-free utility is left out (its verdict would be a coin).
        Counts: ``pairs``, ``labelled``, ``skipped_identical``, ``skipped_ties``."""
        records, counts = [], {"pairs": 0, "labelled": 0, "skipped_identical": 0, "skipped_ties": 0}
        for prompt, a, b in pairs:
            counts["pairs"] += 1
            if a == b:
                counts["skipped_identical"] += 1
                continue
            if skip_ties and self.utility(prompt, a) == self.utility(prompt, b):
                counts["skipped_ties"] += 1
                continue
            records.append(self.critique(prompt, a, b))
        counts["labelled"] = len(records)
        return records, counts

    def critique_score(self, prompt, response: str, max_score: int = 5) -> dict:
        """A written evaluation in the ``critique_point`` format: ``{"prompt", "response",
        "critique", "score"}``: the gold judge's critique, and the noisy utility ``g + T·L`` mapped
        linearly from :data:`UTILITY_RANGE` onto the integers 1..``max_score`` (rounded,
        clamped)."""
        if max_score < 2:
            raise ValueError("max_score must be at least 2")
        p = self.judge.resolve(prompt)
        g = self.utility(p, response)
        if self.temperature > 0:
            g += self.temperature * self._logistic()
        lo, hi = UTILITY_RANGE[self.kind]
        frac = min(1.0, max(0.0, (g - lo) / (hi - lo)))
        return {"prompt": p.text, "response": response, "critique": self.judge.critique(p, response),
                "score": 1 + round(frac * (max_score - 1))}

    def critique_score_records(self, items: Iterable[tuple], max_score: int = 5) -> list[dict]:
        """:meth:`critique_score` over ``(prompt, response)`` pairs."""
        return [self.critique_score(p, r, max_score) for p, r in items]
