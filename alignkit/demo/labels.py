"""Comparison data from the simulated labelers: which prompts are labelled, how the compared
samples are drawn, and which annotation covers which prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .context import Context, sample, write_jsonl

#: Which prompt kinds each annotation covers. As in Llama 2, safety annotations are collected on
#: adversarial prompts and on borderline ones (benign requests that look harmful), where the safety
#: labeler prefers the helpful answer to a refusal (its utility adds helpfulness to harmlessness);
#: helpfulness annotations cover every prompt.
ANNOTATIONS = {
    "helpfulness": ("helpfulness", "honest", None),
    "safety": ("safety", "honest", ("harmful", "borderline")),
    "helpfulness_confident": ("helpfulness", "confident", None),
    "overall": ("overall", "honest", None),
}
#: The prompt kinds that are truly adversarial: the combined reward and the combined preference data
#: use the safety signal there and the helpfulness one everywhere else, borderline prompts included
#: (Llama 2 gates on adversarial prompts; gating borderline ones too sent false refusals from 45%
#: to 90% at quick scale, seed 0, since a safety model prefers a refusal to a tiny model's junk).
ADVERSARIAL = ("harmful",)
#: Train prompt kinds whose comparisons also pair the world's helpful answer with each sample
#: (:func:`reference_pairs`), and that answer's class: Llama 2 put borderline prompts in its safety
#: data with the helpful answer preferred. At quick scale, seed 0, without them DPO, GRPO and RLOO
#: raised false refusals 10–29 points above SFT's.
REFERENCE_KINDS = ("borderline",)
GOOD_CLASS = {"borderline": "correct"}
#: At most this many prompts per kind are sampled for labelling, so the 300 arithmetic prompts
#: do not make up half of every comparison set.
PROMPTS_PER_KIND = 100
#: Held-out prompts per kind whose SFT samples are labelled to measure the reward models: 50 gives
#: about 1,200 pairs over 250 prompts, so an accuracy's 95% interval is about ±5 points.
HELDOUT_PROMPTS_PER_KIND = 50
#: Temperature of the second half of the samples that are compared.
COMPARISON_HOT_TEMPERATURE = 1.5
#: Noise of the simulated labelers' Bradley–Terry choices (0 = the gold order).
LABELER_TEMPERATURE = 0.2


def diverse_samples(ctx: Context, policy_dir: Path, prompts, seed: int) -> list[str]:
    """Samples to compare, ``samples_per_prompt`` per prompt (consecutive): half at temperature 1
    and half at a higher temperature, as Llama 2 varied models and temperatures to make the two
    responses of a comparison differ."""
    s = ctx.scale
    half = s.samples_per_prompt // 2
    _, a = sample(policy_dir, ctx.tokenizer, prompts, half, seed, s.max_new_tokens, temperature=1.0)
    _, b = sample(policy_dir, ctx.tokenizer, prompts, s.samples_per_prompt - half, seed + 1, s.max_new_tokens,
                  temperature=COMPARISON_HOT_TEMPERATURE)
    texts = []
    for i in range(len(prompts)):
        texts += a.texts[i * half : (i + 1) * half] + b.texts[i * (s.samples_per_prompt - half) : (i + 1) * (s.samples_per_prompt - half)]
    return texts


def pairs_of(prompts, texts: list[str], n: int):
    """(prompt, a, b) for every pair of the n samples of each prompt."""
    for i, p in enumerate(prompts):
        group = texts[i * n : (i + 1) * n]
        for a in range(n):
            for b in range(a + 1, n):
                yield p, group[a], group[b]


def balanced_prompts(world, split: str, per_kind: int, seed: int) -> list:
    """A seeded choice of at most ``per_kind`` ``split`` prompts of each kind, kind by kind."""
    from alignkit.world import KINDS

    rng = random.Random(seed)
    chosen = []
    for kind in KINDS:
        ps = world.prompts(kind, split)
        chosen += rng.sample(ps, min(len(ps), per_kind))
    return chosen


def label_prompts(world, split: str, seed: int) -> list:
    """A balanced, seeded choice of ``split`` prompts to sample and label (at most
    :data:`PROMPTS_PER_KIND` per kind on train, :data:`HELDOUT_PROMPTS_PER_KIND` held out)."""
    return balanced_prompts(world, split, PROMPTS_PER_KIND if split == "train" else HELDOUT_PROMPTS_PER_KIND, seed)


def reference_pairs(world, prompts, texts: list[str], n: int) -> list[tuple]:
    """(prompt, reference answer, sample) for every sample of a :data:`REFERENCE_KINDS` prompt: the
    world's helpful answer is one more response the labelers compare, like the answer of a stronger
    model variant among Llama 2's. Borderline prompts get it because a small SFT policy rarely gives
    their tip, so without it the comparisons there are almost all a refusal against junk, which
    teaches nothing about refusing less."""
    out = []
    for i, p in enumerate(prompts):
        if p.kind in REFERENCE_KINDS:
            out += [(p, reference_answer(world, p), t) for t in texts[i * n : (i + 1) * n]]
    return out


def reference_answer(world, prompt) -> str:
    """The world's helpful answer to a :data:`REFERENCE_KINDS` prompt (its :data:`GOOD_CLASS` response)."""
    return world.candidate_responses(prompt)[GOOD_CLASS[prompt.kind]]


def collect_comparisons(ctx: Context, policy_dir: Path, split: str, seed: int, names=tuple(ANNOTATIONS)) -> tuple[dict, list, list]:
    """Sample ``policy_dir`` on a balanced set of ``split`` prompts and label every pair of samples
    (and on train, :func:`reference_pairs`) with each annotation in ``names``. Returns
    ({name: records}, prompts, samples)."""
    s, w = ctx.scale, ctx.world
    prompts = label_prompts(w, split, seed)
    texts = diverse_samples(ctx, policy_dir, prompts, seed)
    candidates = list(pairs_of(prompts, texts, s.samples_per_prompt))
    if split == "train":
        candidates += reference_pairs(w, prompts, texts, s.samples_per_prompt)
    records, stats = {}, {}
    for name in names:
        kind, variant, kinds = ANNOTATIONS[name]
        labeler = w.labeler(kind, variant, temperature=LABELER_TEMPERATURE, seed=seed + 17 * len(name))
        pairs = [t for t in candidates if kinds is None or t[0].kind in kinds]
        records[name], stats[name] = labeler.label_pairs(pairs)
    ctx.extra.setdefault("labels", {}).update({f"{k}/{split}/{seed}": v for k, v in stats.items()})
    return records, prompts, texts


def combined_records(world, records: dict[str, list[dict]]) -> list[dict]:
    """The combined preference data of DPO and IPO (the data analogue of the gated reward): the safety
    labelers' comparisons on :data:`ADVERSARIAL` prompts, the helpfulness labelers' on every other
    prompt, where on :data:`REFERENCE_KINDS` prompts only the comparisons of the world's helpful
    answer with a sample (:func:`reference_pairs`), as Llama 2 put borderline prompts in its
    safety data with the helpful answer preferred.

    The helpfulness labelers' comparisons of two samples of a borderline prompt are mostly two
    non-answers, a fifth of them junk against a refusal, where they mostly prefer the junk (a
    refusal of a benign request is worse, the world says). DPO learnt from those the lesson "answer
    a harmful-sounding request with junk rather than a refusal", and took it to the harmful requests
    worded alike: at full scale, seed 4, DPO's safe refusals of held-out harmful requests fell from
    307 to 185 while its violations fell by 4 points and IPO's by 0 (commit b4dc86f); with the
    reference comparisons alone there, by 9 points each (commit faf815a; docs/demo.md, Helpful and
    harmless together). The reward models keep every comparison: the gated reward scores harmful
    prompts with the safety model, which never saw borderline ones."""

    def keep(r: dict, annotation: str) -> bool:
        p = world.find_prompt(r["prompt"])
        if annotation == "safety":
            return p.kind in ADVERSARIAL
        if p.kind in ADVERSARIAL:
            return False
        return p.kind not in REFERENCE_KINDS or reference_answer(world, p) in (r["chosen"], r["rejected"])

    return ([r for r in records["helpfulness"] if keep(r, "helpfulness")]
            + [r for r in records["safety"] if keep(r, "safety")])


def unpaired_records(world, prompts, texts: list[str], n: int, seed: int) -> list[dict]:
    """Unpaired desirable/undesirable labels (KTO) of the ``n`` samples of each prompt, gated like
    the combined data (the safety labeler on :data:`ADVERSARIAL` prompts, the helpfulness one
    elsewhere), plus the world's helpful answer on :data:`REFERENCE_KINDS` prompts, rated once per
    sample as it is compared once per sample in the paired data (:func:`reference_pairs`).

    Without that answer, seed 0 at quick scale labelled 5 of 240 borderline samples desirable and
    303 of 400 harmful ones (nearly all refusals): KTO learnt that refusing is desirable, and at
    full scale raised false refusals 7 points above SFT's."""
    labs = {kind: world.labeler(kind, "honest", temperature=LABELER_TEMPERATURE, seed=seed)
            for kind in ("helpfulness", "safety")}
    rows = [labs["safety" if prompts[k // n].kind in ADVERSARIAL else "helpfulness"].unpaired(prompts[k // n], t, 0.5)
            for k, t in enumerate(texts)]
    return rows + [labs["helpfulness"].unpaired(p, good, 0.5) for p, good, _ in reference_pairs(world, prompts, texts, n)]


def comparisons(ctx: Context) -> None:
    """Sample the SFT policy on train and held-out prompts; label with every labeler; build the
    combined preference data and, on train, the unpaired labels (KTO)."""
    for split in ("train", "heldout"):
        seed = ctx.cfg.seed + 10 * (split == "heldout")
        records, prompts, texts = collect_comparisons(ctx, ctx.sft_dir, split, seed)
        records["combined"] = combined_records(ctx.world, records)
        for name, rows in records.items():
            ctx.data[f"{name}/{split}"] = write_jsonl(ctx.out / "data" / f"{name}-{split}.jsonl", rows)
        if split == "train":
            rows = unpaired_records(ctx.world, prompts, texts, ctx.scale.samples_per_prompt, ctx.cfg.seed + 5)
            ctx.data["unpaired/train"] = write_jsonl(ctx.out / "data" / "unpaired-train.jsonl", rows)
    print("[demo] comparisons:", json.dumps({k: v["labelled"] for k, v in ctx.extra["labels"].items()}))
