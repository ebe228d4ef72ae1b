"""The demo's critique-model stage: critique data from the simulated labelers, a critic trained
from the SFT policy, its held-out verdict accuracy, position bias and failure-naming rate, and
best-of-N under the critique reward.

Called from :mod:`alignkit.demo.run` as its last method, ``critic_stage(ctx)`` (last, so that its
training does not shift the random streams of the other methods); it reads the comparison files
the ``comparisons`` stage wrote.

- **Data.** The ``overall`` labeler critiques pairs (the gold judge's critique of each response,
  its own noisy verdict, A/B order a seeded coin; pairs of equal utility are left out, their
  verdict would be a coin): :data:`MAX_TRAIN_PAIRS` pairs of SFT samples the labelers compared
  (``data/overall-train.jsonl``, else ``helpfulness-train.jsonl``), plus
  :data:`CANDIDATE_PAIRS` pairs of the world's reference responses of each quality class on train
  prompts (as Llama 2 had annotators compare responses of several model variants: the SFT
  samples of a tiny model are mostly junk, so clean examples of every failure kind teach the
  critique's words). Pointwise critiques with a 1..5 score: :data:`MAX_TRAIN_POINTS` distinct
  SFT samples and :data:`CANDIDATE_POINTS` reference responses. Held out:
  :data:`MAX_EVAL_PAIRS` pairs of SFT samples to held-out prompts (reported beside the scalar reward
  models, on the same kind of pairs) and :data:`CANDIDATE_EVAL_PAIRS` pairs of reference responses
  to held-out prompts (reported as ``critic["clean"]``). Every training pair is also shown with A
  and B swapped (:data:`SWAP_PAIRS`; the critique's parts and the verdict swap with them), so the
  verdict cannot lean on position.
- **Critic.** ``alignkit critic`` from the SFT policy, with :data:`EXTEND_VOCAB` whole-word
  tokens for the critique vocabulary (the demo's tokenizer, trained on the corpus alone, spells
  "response" in six pieces; without them the critic stays at chance) and the verdict token
  weighted :data:`VERDICT_WEIGHT`.
- **Evaluation** on the held-out pairs, judged in both orders (see :func:`evaluate_pairs`).
- **Best-of-N.** The ``best_of_n`` stage's SFT samples (the same ones, kept); the first
  :data:`CRITIC_DRAWS` draws of N per held-out prompt are critiqued, each sample alone (pointwise),
  and the one with the highest expected score is kept. Pointwise costs N critiques per prompt,
  like any reward; pairwise would need N − 1 comparisons against a reference (or a knockout),
  each a longer critique.

Tuning (quick scale, seeds 0 and 1; the 120 held-out SFT-sample pairs have a standard error of
about ±0.045, so each setting was also scored on all ~300 labelled held-out pairs): the first
version (350 SFT-sample pairs, 3 epochs, one order) sat at chance on SFT-sample pairs (0.50 / 0.63
on all held-out pairs); every SFT-sample pair in both orders for 1.2 epochs gave 0.63 / 0.69,
with order consistency 0.34 → 0.5, and kept the reference-response accuracy (0.68 / 0.73).
With the 64-wide model (the demo's time budget) 1.0 epoch was too little: held-out accuracy on
reference pairs fell to 0.53 (full scale, seed 1; 1.2 epochs, seed 0: 0.75).
Dropping "negligibly better" pairs, a higher learning rate, or more pairs without the swap did
worse (the last lost reference-response accuracy).

Runtime on this project's 2-core AVX-512 CPU: about 65 s of CPU at full scale (mean of seeds 0–4,
commit b4dc86f, two draws of N critiqued; see :data:`CRITIC_EPOCHS` for the training's share).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from .context import read_jsonl, sft_samples, write_jsonl
from .labels import LABELER_TEMPERATURE

#: Gold categories that are failures the critique should name, and the name the judge writes.
FAILURE_KINDS = {
    "hallucination": "hallucination",
    "unsafe_compliance": "unsafe compliance",
    "false_refusal": "false refusal",
    "wrong_answer": "wrong answer",
}
#: Training data: pairs of SFT samples, pairs of the world's reference responses, pointwise critiques.
MAX_TRAIN_PAIRS = 1300
CANDIDATE_PAIRS = 350
MAX_TRAIN_POINTS = 200
CANDIDATE_POINTS = 200
#: Held-out pairs of SFT samples the critic is evaluated on (each judged in both orders).
MAX_EVAL_PAIRS = 120
#: Held-out pairs of the world's reference responses (two quality classes, held-out prompts): the
#: failures are clean there, so this measures what the critic learnt apart from the SFT samples' noise.
CANDIDATE_EVAL_PAIRS = 120
#: Critic training: peak learning rate, passes over the critiques, verdict loss weight.
CRITIC_LR = 1e-2
CRITIC_EPOCHS = 1.2
VERDICT_WEIGHT = 5.0
#: Train on every pair in both orders (A/B swapped, critique parts and verdict with them): the
#: verdict then cannot lean on position, and the critique's words are seen twice as often.
SWAP_PAIRS = True
#: Whole-word tokens added for the critique vocabulary (the demo's tokenizer is trained on the corpus alone).
EXTEND_VOCAB = 64
#: Longest generated critique: pairwise, pointwise (the world's critiques are one or two sentences).
CRITIC_MAX_NEW_TOKENS = 72
POINT_MAX_NEW_TOKENS = 36
#: Draws of N samples per held-out prompt that best-of-N under the critic judges at most (each
#: costs N generated critiques per prompt). Two, as many as the other best-of-N policies use at
#: quick and full scale: with one, its rates' 95% intervals reached ±8.8 points (full, seeds 0–4),
#: beyond the ±7 the report aims for (the second doubles the critiques of this step).
CRITIC_DRAWS = 2
#: Sequences generated and scored together (tiny models: larger batches amortise per-step overhead).
CRITIC_BATCH = 128
#: The critic's longest prompt and sequence (tokens).
CRITIC_MAX_PROMPT, CRITIC_MAX_LENGTH = 160, 256

_NAME = re.compile(r"\(([a-z' ]+)\)")


def category_name(category: str) -> str:
    """The words the gold judge's critiques use for a category ("needless I don't know" ...)."""
    return "needless i don't know" if category == "needless_idk" else category.replace("_", " ")


def named_category(critique: str) -> str | None:
    """The first category a critique names: the first parenthesised category name in it."""
    m = _NAME.search(critique.lower())
    return m.group(1).strip() if m else None


def critique_segments(critique: str) -> tuple[str, str]:
    """The parts of a pairwise critique about response A and about response B."""
    text = critique.split("Response B:", 1)
    a = text[0].split("Response A:", 1)[-1]
    return a.strip(), (text[1].strip() if len(text) > 1 else "")


def naming_rate(judge, prompts: Sequence, responses: Sequence[str], critiques: Sequence[str]) -> dict:
    """Of the responses whose gold category is a failure kind, the fraction whose critique names
    that kind first; overall (``naming_rate``) and per kind (``naming_rate/<kind>``), with counts."""
    hits: dict[str, list[bool]] = {k: [] for k in FAILURE_KINDS}
    for p, r, c in zip(prompts, responses, critiques):
        category = judge.score(p, r).category
        if category in FAILURE_KINDS:
            hits[category].append(named_category(c) == FAILURE_KINDS[category])
    flat = [h for v in hits.values() for h in v]
    out = {"naming_rate": sum(flat) / len(flat) if flat else None, "naming_n": len(flat)}
    for k, v in hits.items():
        if v:
            out[f"naming_rate/{k}"] = sum(v) / len(v)
            out[f"naming_n/{k}"] = len(v)
    return out


def evaluate_pairs(reward, world, records: list[dict]) -> dict:
    """Held-out metrics of a critic on ``critique_pair`` dicts, every pair judged in both orders:

    - ``accuracy``: the verdict with both orders averaged equals the label (the labeler's verdict);
      ``accuracy_by_margin`` / ``count_by_margin`` split it by the labeler's margin label;
    - ``accuracy_one_order``: the verdict in the order given equals the label;
    - ``accuracy_vs_gold``: the averaged verdict picks the higher gold reward (pairs without a
      gold tie);
    - ``position_bias``, ``order_consistency``, ``order_gap``: see
      :func:`alignkit.rollout.critique.order_stats`;
    - ``naming_rate`` (and per kind): :func:`naming_rate` over each response's part of the
      critique written in the given order;
    - ``examples``: three critiques to read.
    """
    from alignkit.rollout.critique import order_stats

    prompts = [[{"role": "user", "content": r["prompt"]}] for r in records]
    a, b = [r["response_a"] for r in records], [r["response_b"] for r in records]
    results = reward.judge(prompts, a, b, both_orders=True)
    first = ["A" if x["p_first"] >= 0.5 else "B" for x in results]  # one order, as given
    averaged = [x["verdict"] for x in results]  # both orders averaged
    label = [r["verdict"] for r in records]
    out = {"accuracy": _mean(v == y for v, y in zip(averaged, label)),
           "accuracy_one_order": _mean(f == y for f, y in zip(first, label)),
           "n_pairs": len(records), "n_prompts": len({r["prompt"] for r in records})}
    gold = [(r["prompt"], v, "A" if world.reward(r["prompt"], r["response_a"]) > world.reward(r["prompt"], r["response_b"]) else "B")
            for v, r in zip(averaged, records)
            if world.reward(r["prompt"], r["response_a"]) != world.reward(r["prompt"], r["response_b"])]
    out["accuracy_vs_gold"] = _mean(v == g for _, v, g in gold)
    prompts_of = [r["prompt"] for r in records]
    out["ci"] = {"accuracy": _ci(prompts_of, [v == y for v, y in zip(averaged, label)]),
                 "accuracy_one_order": _ci(prompts_of, [f == y for f, y in zip(first, label)]),
                 "accuracy_vs_gold": _ci([p for p, _, _ in gold], [v == g for _, v, g in gold])}
    by, count = {}, {}
    for v, y, r in zip(averaged, label, records):
        key = r.get("margin", "?")
        by.setdefault(key, []).append(v == y)
    for k, v in by.items():
        by[k], count[k] = _mean(v), len(v)
    out["accuracy_by_margin"], out["count_by_margin"] = by, count
    out.update(order_stats(results))
    # Naming: each response's part of the critique written in the given order.
    seg_p, seg_r, seg_c = [], [], []
    for r, x in zip(records, results):
        ca, cb = critique_segments(x["critique"])
        seg_p += [r["prompt"], r["prompt"]]
        seg_r += [r["response_a"], r["response_b"]]
        seg_c += [ca, cb]
    out.update(naming_rate(world.judge, seg_p, seg_r, seg_c))
    out["examples"] = [{"prompt": r["prompt"], "response_a": r["response_a"], "response_b": r["response_b"],
                        "critique": x["critique"], "p_a": round(x["p_first"], 3), "label": r["verdict"]}
                       for r, x in list(zip(records, results))[:3]]
    return out


def _ci(prompts: list[str], hits: list[bool]) -> list[float] | None:
    """Bootstrap 95% interval over prompts of a rate (None without data)."""
    from alignkit.eval.uncertainty import bootstrap_mean

    groups: dict[str, list[float]] = {}
    for p, h in zip(prompts, hits):
        groups.setdefault(p, []).append(float(h))
    stat = bootstrap_mean(list(groups.values()))
    return [stat["low"], stat["high"]] if stat else None


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None


def critique_data(pairs_path: Path, labeler, max_pairs: int, max_points: int, seed: int):
    """``(critique_pair dicts, critique_point dicts, counts)`` from a pairwise file's pairs: at most
    ``max_pairs`` critiqued pairs and ``max_points`` pointwise critiques of its distinct responses."""
    rows = read_jsonl(pairs_path)
    pairs, counts = labeler.critique_records([(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
    rng = random.Random(seed)
    rng.shuffle(pairs)
    items = list(dict.fromkeys((r["prompt"], resp) for r in rows for resp in (r["chosen"], r["rejected"])))
    rng.shuffle(items)
    points = labeler.critique_score_records(items[:max_points]) if max_points else []
    return pairs[:max_pairs], points, counts


def _swapped(r: dict) -> dict:
    """A critique_pair record with A and B swapped (critique parts and verdict follow)."""
    ca, cb = critique_segments(r["critique"])
    return {**r, "response_a": r["response_b"], "response_b": r["response_a"],
            "critique": f"Response A: {cb} Response B: {ca}", "verdict": "B" if r["verdict"] == "A" else "A"}


def candidate_critiques(world, labeler, n_pairs: int, n_points: int, seed: int,
                        split: str = "train") -> tuple[list[dict], list[dict]]:
    """Critiques of the world's reference responses to ``split`` prompts: ``n_pairs`` pairs (two
    quality classes of one prompt each) and ``n_points`` single responses."""
    rng = random.Random(f"critic-candidates-{seed}" + ("" if split == "train" else f"-{split}"))
    prompts = world.prompts(split=split)
    triples, items = [], []
    for p in prompts:
        cands = list(world.candidate_responses(p, rng).values())
        triples.append((p, *rng.sample(cands, 2)))
        items.append((p, rng.choice(cands)))
    pairs, _ = labeler.critique_records(rng.sample(triples, min(n_pairs, len(triples))))
    points = labeler.critique_score_records(rng.sample(items, min(n_points, len(items))))
    return pairs, points


def critic_stage(ctx) -> None:
    """Train the critique model and evaluate it; add ``best_of_n/critic`` to the policies and
    ``critic`` to the reward-model report (``ctx.extra["critic"]`` holds every metric)."""
    from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
    from alignkit.rollout.critique import CritiqueReward
    from alignkit.train.critic import CriticConfig, run_critic

    w, out, seed = ctx.world, ctx.out, ctx.cfg.seed
    source = "overall" if "overall/train" in ctx.data else "helpfulness"
    labeler = w.labeler("overall", "honest", temperature=LABELER_TEMPERATURE, seed=seed + 23)
    train_pairs, train_points, counts = critique_data(ctx.data[f"{source}/train"], labeler,
                                                      MAX_TRAIN_PAIRS, MAX_TRAIN_POINTS, seed)
    more_pairs, more_points = candidate_critiques(w, labeler, CANDIDATE_PAIRS, CANDIDATE_POINTS, seed)
    train_pairs, train_points = train_pairs + more_pairs, train_points + more_points
    if SWAP_PAIRS:
        train_pairs = train_pairs + [_swapped(r) for r in train_pairs]
    random.Random(seed).shuffle(train_pairs)
    random.Random(seed).shuffle(train_points)
    eval_pairs, _, eval_counts = critique_data(ctx.data[f"{source}/heldout"], labeler, MAX_EVAL_PAIRS, 0, seed)
    clean_pairs, _ = candidate_critiques(w, labeler, CANDIDATE_EVAL_PAIRS, 0, seed, split="heldout")
    paths = {name: write_jsonl(out / "data" / f"{name}.jsonl", rows) for name, rows in
             (("critique_pair-train", train_pairs), ("critique_point-train", train_points),
              ("critique_pair-heldout", eval_pairs), ("critique_pair-heldout-clean", clean_pairs))}
    ctx.data.update({f"critique/{k}": v for k, v in paths.items()})
    print(f"[demo] critiques: {len(train_pairs)} pairwise + {len(train_points)} pointwise train, "
          f"{len(eval_pairs)} held-out pairs (SFT-sample pairs: {json.dumps({'train': counts, 'heldout': eval_counts})})")
    cfg = CriticConfig(
        model=ModelConfig(path=str(ctx.sft_dir)),
        data=DataConfig(path=str(paths["critique_pair-train"]), max_length=CRITIC_MAX_LENGTH,
                        max_prompt_length=CRITIC_MAX_PROMPT),
        optim=OptimConfig(lr=CRITIC_LR, batch_size=16, epochs=CRITIC_EPOCHS, warmup_ratio=0.05),
        run=RunConfig(output_dir=str(out / "critic"), seed=seed, report_to="jsonl", progress=True, overwrite=True),
        mix_path=str(paths["critique_point-train"]), verdict_weight=VERDICT_WEIGHT,
        extend_vocab=EXTEND_VOCAB, eval_verdicts=0,
    )
    run_critic(cfg)
    ctx.curves["critic"] = out / "critic" / "metrics.jsonl"
    pair_reward = CritiqueReward(cfg.run.output_dir, max_new_tokens=CRITIC_MAX_NEW_TOKENS, max_prompt_length=CRITIC_MAX_PROMPT,
                                 batch_size=CRITIC_BATCH)
    metrics = evaluate_pairs(pair_reward, w, eval_pairs)
    clean = evaluate_pairs(pair_reward, w, clean_pairs)
    metrics["clean"] = {k: v for k, v in clean.items() if k != "examples"}
    ctx.extra["critic"] = metrics
    # Beside the scalar reward models, in their shape (accuracy, by margin label, pairs), plus its own.
    ctx.rm_report["critic"] = {k: metrics[k] for k in (
        "accuracy", "accuracy_by_margin", "count_by_margin", "n_pairs", "n_prompts", "accuracy_one_order",
        "accuracy_vs_gold", "position_bias", "order_consistency", "naming_rate")}
    ctx.rm_report["critic"]["ci"] = metrics["ci"]["accuracy"]
    print("[demo] critic held-out: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in (
        "accuracy", "accuracy_one_order", "accuracy_vs_gold", "position_bias", "order_consistency", "naming_rate")
        if metrics[k] is not None) + "; on held-out reference-response pairs: " + ", ".join(
        f"{k} {clean[k]:.3f}" for k in ("accuracy", "accuracy_vs_gold", "position_bias", "naming_rate") if clean[k] is not None))
    _best_of_n_critic(ctx, CritiqueReward(cfg.run.output_dir, max_new_tokens=POINT_MAX_NEW_TOKENS,
                                          max_prompt_length=CRITIC_MAX_PROMPT, batch_size=CRITIC_BATCH))


def _best_of_n_critic(ctx, reward) -> None:
    """Best-of-N on the held-out prompts with the pointwise critique reward (expected score)."""
    from alignkit.eval.metrics import best_of_n_kl

    s = ctx.scale
    prompts = ctx.world.prompts(split="heldout")
    n, draws = s.best_of_n, s.bon_draws
    msgs = [[{"role": "user", "content": p.text}] for p in prompts]
    # The best_of_n stage's samples (kept by sft_samples): draws × N per prompt, consecutive.
    # At most the first CRITIC_DRAWS blocks of N are critiqued, to bound the cost of generation.
    gens = sft_samples(ctx, n * draws)
    keep = min(CRITIC_DRAWS, draws)
    rows = [i * n * draws + k for i in range(len(prompts)) for k in range(n * keep)]  # (P·keep·N,)
    scores = reward([msgs[gens.prompt_index[r]] for r in rows], [gens.texts[r] for r in rows])
    best = scores.view(-1, n).argmax(dim=1)  # (P·keep,) index of the best of each block of N
    picked = [b * n + int(j) for b, j in enumerate(best)]
    ctx.policies["best_of_n/critic"] = {
        "prompts": [prompts[b // keep] for b in range(len(best))],
        "texts": [gens.texts[rows[k]] for k in picked], "kl": best_of_n_kl(n),
        "kl_kind": f"analytic log N − (N−1)/N, N={n}",
    }
    ctx.extra.setdefault("critic", {})["best_of_n_examples"] = [
        {"prompt": prompts[b // keep].text, "response": gens.texts[rows[k]], "critique": reward.last[k]["critique"],
         "expected_score": round(reward.last[k]["score"], 3)} for b, k in list(enumerate(picked))[::max(1, len(picked) // 5)][:5]]
