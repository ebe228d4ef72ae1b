"""Time DPO training with plain padding, padding-free batches and prefix sharing on HH-RLHF.

    python benchmarks/bench_dpo.py [--pairs 160] [--steps 20] [--batch-size 8] [--threads N] [--repeats 3]

A tiny Llama (hidden 64, 2 layers, a 512-token BPE vocabulary trained on the sample) is trained
with DPO (frozen-copy reference) on the first pairs of ``<repo>/../shared/data/hh-rlhf-harmless-sample.jsonl``
with each batching in turn, on the same pairs in the same order. Each batching runs in its own
process, so its peak memory is its own.

Reported per batching:

* ``pairs/s`` and ``tokens/s``: tokens = Σ over pairs of |x| + |y_w| + |x| + |y_l|, the tokens
  of the two separate sequences, the SAME numerator for every batching, so the ratio of
  tokens/s is the speed-up;
* ``tok/CPU-s``: the same tokens per second of CPU time used by the process (all threads), a
  figure that other processes sharing the machine disturb much less than wall-clock time;
* ``fed tok/step``: positions the model actually computes per step (padding included, a shared
  prompt counted once);
* ``peak MB``: peak tensor memory of a training step above what is resident before it (the
  policy and the reference): activations, logits, masks, gradients, optimizer state. On CPU it
  is read from the profiler's allocation events over three extra steps (outside the timing),
  on CUDA from ``torch.cuda.max_memory_allocated``;
* ratios to ``padded``.

Only the timed steps count: two warm-up steps run first. Each method runs ``--repeats`` times
(interleaved) and the fastest run is reported. CPU figures are noisy when other processes share
the machine, multi-threaded ones badly so (threads wait for each other); ``--threads 1`` steadies
them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"
METHODS = ("padded", "padding_free", "prefix_shared")


def peak_step_memory_mb(fit) -> float:
    """Peak tensor memory allocated while ``fit()`` runs, above the memory allocated before, MB."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fit()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fit()
    # Allocation (+bytes) and free (-bytes) events in time order; their running sum peaks at
    # the step's high-water mark.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def build_model(out: Path, n_texts: int) -> Path:
    """A tiny Llama with a tokenizer trained on the HH sample (cached in ``out``)."""
    from alignkit.models.factory import TinyModelConfig, build_tiny_model

    if (out / "config.json").exists():
        return out
    texts = [json.loads(line)["chosen"] for line in HH.read_text(encoding="utf-8").splitlines()[:n_texts]]
    return build_tiny_model(out, texts, TinyModelConfig(vocab_size=512, hidden_size=64, intermediate_size=192,
                                                        num_hidden_layers=2, num_attention_heads=4))


def run_one(method: str, args) -> dict:
    """Train ``args.steps`` timed DPO steps with ``method``; runs inside its own process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.data import load_dataset_records, tokenize_records
    from alignkit.models.loading import load_causal_lm, load_tokenizer
    from alignkit.train.dpo import DPOConfig, build_dpo_task
    from alignkit.train.loop import Trainer

    tokenizer = load_tokenizer(str(args.model_dir))
    records, _, _ = load_dataset_records(HH, limit=args.pairs + 2 * args.batch_size + 100, shuffle=False)
    items, _ = tokenize_records(records, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    warm, items = items[: 2 * args.batch_size], items[2 * args.batch_size :][: args.pairs]
    torch.manual_seed(0)
    cfg = DPOConfig(model=ModelConfig(path=str(args.model_dir)), batching=method, reference="copy",
                    optim=OptimConfig(lr=1e-4, batch_size=args.batch_size, max_steps=args.steps, warmup_ratio=0.0),
                    run=RunConfig(output_dir=tempfile.mkdtemp(), progress=False, report_to="jsonl", seed=0))
    policy = load_causal_lm(cfg.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def trainer_for(pairs, steps):
        task, reference = build_dpo_task(cfg, policy, pairs, [], tokenizer.pad_token_id)
        trainer = Trainer(policy, task, OptimConfig(**{**cfg.optim.__dict__, "max_steps": steps}), cfg.run, config=cfg)
        reference.to(trainer.acc.device)
        return trainer

    warmup = trainer_for(warm, 2)
    # The pairs each timed step uses (identical for every method: same seed, same global batch).
    timed = trainer_for(items, args.steps)
    used = [i for s in range(args.steps) for mb in timed._micro_batches(s) for i in mb]
    data_tokens = sum(2 * len(items[i]["prompt_ids"]) + len(items[i]["chosen_ids"]) + len(items[i]["rejected_ids"]) for i in used)
    fed = 0
    for s in range(args.steps):
        for mb in timed._micro_batches(s):
            batch = timed.task.collate([items[i] for i in mb])
            fed += batch["input_ids"].numel()
    warmup.fit()
    t0, c0 = time.perf_counter(), time.process_time()
    result = timed.fit()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_step_memory_mb(trainer_for(items[: 3 * args.batch_size], 3).fit)
    return {
        "method": method, "device": device, "threads": torch.get_num_threads(), "steps": args.steps,
        "pairs": len(used), "wall_s": wall, "pairs_per_s": len(used) / wall, "tokens_per_s": data_tokens / wall,
        "tokens_per_cpu_s": data_tokens / cpu,
        "fed_tokens_per_step": fed / args.steps, "data_tokens_per_step": data_tokens / args.steps,
        "peak_mb": peak, "final_loss": result.history[-1]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=160, help="pairs used in the timed steps (steps × batch size)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512, help="longest prompt + response, tokens")
    p.add_argument("--max-prompt-length", type=int, default=384, help="longest prompt, tokens (keeps the latest turns)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest counts")
    p.add_argument("--model-dir", type=Path, default=None, help="tiny model directory (built if missing)")
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one method
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_one(args.method, args)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = args.model_dir or Path(tempfile.gettempdir()) / "alignkit-bench-dpo-tiny"
    build_model(model_dir, n_texts=1500)
    forwarded = ["--pairs", str(args.pairs), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                 "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
                 "--threads", str(args.threads)]
    best: dict[str, dict] = {}
    for _ in range(args.repeats):  # methods interleaved, so a burst of load hits all of them alike
        for method in METHODS:
            cmd = [sys.executable, __file__, "--method", method, "--model-dir", str(model_dir), *forwarded]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if out.returncode != 0:
                sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if method not in best or r["wall_s"] < best[method]["wall_s"]:
                best[method] = r
    results = [best[m] for m in METHODS]
    base = r0 = results[0]
    print(f"\nDPO on {HH.name}: {r0['pairs']} pairs, {r0['steps']} steps × {args.batch_size} pairs (best of {args.repeats}), "
          f"max_length {args.max_length}, device {r0['device']}, {r0['threads']} threads, tiny Llama (hidden 64, 2 layers)")
    print(f"{'batching':<15}{'tokens/s':>10}{'pairs/s':>9}{'tok/CPU-s':>11}{'fed tok/step':>14}{'peak MB':>9}"
          f"{'speed-up':>10}{'(CPU)':>7}{'memory':>8}")
    for r in results:
        print(f"{r['method']:<15}{r['tokens_per_s']:>10.0f}{r['pairs_per_s']:>9.1f}{r['tokens_per_cpu_s']:>11.0f}"
              f"{r['fed_tokens_per_step']:>14.0f}{r['peak_mb']:>9.1f}{r['tokens_per_s'] / base['tokens_per_s']:>9.2f}x"
              f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:>6.2f}x{r['peak_mb'] / max(base['peak_mb'], 1e-9):>7.2f}x")
    print(f"data tokens per step (both sequences of each pair in full): {base['data_tokens_per_step']:.0f}; "
          "loss after the timed steps: " + ", ".join(f"{r['final_loss']:.4f}" for r in results))


if __name__ == "__main__":
    main()
