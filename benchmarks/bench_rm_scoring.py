"""CPU time of reward-model scoring: eval-rm, score, and the centring pass the rm trainer no longer runs.

    python benchmarks/bench_rm_scoring.py [--pairs 96] [--hidden 128] [--layers 4] [--repeats 2] [--gguf PATH]
                                          [--only train,eval_padded,eval_shared,centring,score_before,...]

A tiny Llama reward model (``--hidden``, ``--layers``, a 2,048-token BPE vocabulary trained on the
sample; or, with ``--gguf``, SmolLM2 converted from a GGUF file with a fresh one-output head) reads
the first ``--pairs`` pairs of ``<repo>/../shared/data/hh-rlhf-harmless-sample.jsonl`` (multi-turn
prompts, the prompt most of each sequence). One thread; CPU time (``time.process_time``) of the
process; the best of ``--repeats``. Reported, in CPU seconds and per pair:

* ``train step``: one training forward + backward of the pairwise loss per pair (padded, the
  rm default), the yardstick: evaluation should cost no more per pair;
* ``eval-rm padded`` / ``eval-rm prefix_shared``: :func:`alignkit.train.rm.score_pairs` under each
  batching (eval-rm's default is prefix_shared where the model is served exactly);
* ``centring pass``: a padded no-grad pass over the pairs in file order, 16 per batch: what the
  issue's post-training centring pass cost per pair; ``reward_mean=training`` takes the mean from
  the training forwards (0 s), ``reward_mean=final`` reads the trained model prefix-shared at the
  last token (the eval-rm prefix_shared row's cost per pair);
* ``score before`` / ``score now``: ``alignkit score`` / RewardModel on both responses of each pair
  as rows (two responses per prompt, as in a GRPO group or rejection sampling), before (padded rows
  in file order, 32 per forward) and now (:func:`alignkit.models.scoring.score_sequences`: the
  responses to one prompt in one row where a FLOPs estimate says it is cheaper, length-sorted);
  ``score distinct prompts``: the chosen responses only (no prompt shared: length-sorted padded rows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"


def build(args, tmp: Path):
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.loading import load_tokenizer

    if args.gguf:
        from alignkit.config import ModelConfig
        from alignkit.models.loading import load_scalar_head_model

        model = load_scalar_head_model(ModelConfig(path=args.gguf))
        return model.float().eval(), load_tokenizer(args.gguf)
    from alignkit.models.factory import TinyModelConfig, build_tiny_model

    out = tmp / f"rm-{args.hidden}-{args.layers}"
    if not (out / "config.json").exists():
        texts = [json.loads(line)["chosen"] for line in HH.read_text(encoding="utf-8").splitlines()[:600]]
        build_tiny_model(out, texts, TinyModelConfig(vocab_size=2048, hidden_size=args.hidden,
                                                     intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                                                     num_attention_heads=4, max_position_embeddings=1024))
    model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    return model, load_tokenizer(str(out))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gguf", default="")
    ap.add_argument("--tmp", default="/tmp/alignkit-bench-rm")
    ap.add_argument("--only", default="", help="comma-separated row names to measure (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from alignkit.data import RatedExample, collate_pairs, collate_rated, load_dataset_records, tokenize_records
    from alignkit.models.heads import ScalarHead, sequence_rewards
    from alignkit.models.scoring import score_sequences
    from alignkit.train.rm import pairwise_batch_loss, score_pairs

    model, tok = build(args, Path(args.tmp))
    head = ScalarHead(model)
    pad = tok.pad_token_id
    records, _, _ = load_dataset_records(str(HH), shuffle=False, limit=args.pairs)
    items, _ = tokenize_records(records, tok, max_length=args.max_length, max_prompt_length=args.max_length * 3 // 4)
    n = len(items)
    tokens = sum(2 * len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in items)
    rows = [RatedExample(prompt=r.prompt, response=resp, score=0.0) for r in records for resp in (r.chosen, r.rejected)]
    rated, _ = tokenize_records(rows, tok, max_length=args.max_length, max_prompt_length=args.max_length * 3 // 4)
    distinct = rated[::2]
    print(f"{n} pairs, {tokens} tokens as separate sequences ({tokens / max(n, 1):.0f} per pair), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, one thread")

    def train_steps():
        loss = pairwise_batch_loss(use_margin=False, center_coef=0.01)
        head.train()
        for i in range(0, n, 8):
            batch = {k: v for k, v in collate_pairs(items[i : i + 8], pad).items() if torch.is_tensor(v)}
            value, _ = loss(head, batch)
            value.backward()
        head.zero_grad(set_to_none=True)
        head.eval()

    @torch.no_grad()
    def centring_pass():
        for i in range(0, min(n, 512), 16):
            batch = {k: v for k, v in collate_pairs(items[i : i + 16], pad).items() if torch.is_tensor(v)}
            sequence_rewards(head, batch)

    @torch.no_grad()
    def score_before(rows):
        for i in range(0, len(rows), 32):
            batch = {k: v for k, v in collate_rated(rows[i : i + 32], pad).items() if torch.is_tensor(v)}
            sequence_rewards(head, batch)

    passes = {
        "train": ("train step (fwd+bwd, padded)", train_steps),
        "eval_padded": ("eval-rm padded", lambda: score_pairs(head, items, pad, 16, "padded")),
        "eval_shared": ("eval-rm prefix_shared", lambda: score_pairs(head, items, pad, 16, "prefix_shared")),
        "centring": ("centring pass (padded, file order)", centring_pass),
        "score_before": ("score before (2 per prompt)", lambda: score_before(rated)),
        "score_now": ("score now (2 per prompt)", lambda: score_sequences(head, rated, pad, 32)),
        "distinct_before": ("score before (distinct prompts)", lambda: score_before(distinct)),
        "distinct_now": ("score now (distinct prompts)", lambda: score_sequences(head, distinct, pad, 32)),
    }
    only = [k for k in args.only.split(",") if k] or list(passes)
    for key in only:
        name, fn = passes[key]
        s = best(fn, args.repeats)
        print(f"{name:36s} {s:8.2f} CPU-s  {1000 * s / n:8.1f} ms per pair", flush=True)


if __name__ == "__main__":
    main()
