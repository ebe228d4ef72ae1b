"""Peak memory of SFT, PPO and GRPO with and without gradient checkpointing (`run.gradient_checkpointing`).

    python benchmarks/bench_checkpointing_memory.py                    # sft, ppo, grpo; hidden 256 × 6 layers
    python benchmarks/bench_checkpointing_memory.py --methods ppo --hidden 512 --layers 8 --tokens 768

Builds a tiny-but-not-trivial Llama with the local factory (no network) and runs each method twice,
checkpointing off and on, each run in a fresh process so that one run's allocator state cannot hide
another's peak. Every run trains on sequences of about ``--tokens`` tokens in micro-batches of
``--batch`` sequences, so the activations saved for the backward pass dominate what the run holds:

- sft: 2 optimizer steps on demonstrations of ~``tokens`` tokens;
- ppo: 2 rollouts of ``batch`` prompts of ~``tokens`` tokens (1 response each, separate critic, so
  both the policy's and the critic's layers are checkpointed), one minibatch per rollout;
- grpo: 2 rollouts of ``batch / 4`` prompts × 4 samples, one minibatch per rollout.

Reported per run: the process's peak resident memory (``ru_maxrss``: model, optimizer, generation
and the update together) and, on a CUDA device, ``torch.cuda.max_memory_allocated``. The saving
is the difference between the off and on runs of a method.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _child(args) -> None:
    """One run in this process; prints one JSON line with its peak memory."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig

    work = Path(args.work)
    model = ModelConfig(path=str(work / "tiny"))
    run = RunConfig(output_dir=str(work / f"out-{args.child}-{args.checkpointing}"), progress=False,
                    report_to="jsonl", gradient_checkpointing=args.checkpointing == "on", mixed_precision="no")
    data = DataConfig(path=str(work / ("sft.jsonl" if args.child == "sft" else "prompts.jsonl")),
                      max_length=args.tokens + 64, max_prompt_length=args.tokens)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.child == "sft":
        from alignkit.train.sft import SFTConfig, run_sft

        run_sft(SFTConfig(model=model, data=data, run=run,
                          optim=OptimConfig(lr=1e-4, batch_size=args.batch, max_steps=2, warmup_ratio=0.0)))
    else:
        from alignkit.rollout.generate import SamplingConfig
        from alignkit.rollout.rewards import FunctionReward
        from alignkit.train.online import RewardConfig, RolloutConfig

        common = dict(model=model, data=data, run=run, reward=RewardConfig(unfinished_penalty=0.0),
                      optim=OptimConfig(lr=1e-5, batch_size=args.batch, schedule="constant", warmup_ratio=0.0),
                      sampling=SamplingConfig(max_new_tokens=args.new_tokens))
        reward = FunctionReward(lambda p, r: float(len(r)))
        if args.child == "ppo":
            from alignkit.train.ppo import PPOConfig, run_ppo

            run_ppo(PPOConfig(**common, rollout=RolloutConfig(prompts_per_rollout=args.batch, num_rollouts=2,
                                                              ppo_epochs=1), value_model="separate"), reward=reward)
        else:
            from alignkit.train.grpo import GRPOConfig, run_grpo

            run_grpo(GRPOConfig(**common, rollout=RolloutConfig(prompts_per_rollout=max(1, args.batch // 4),
                                                                samples_per_prompt=4, num_rollouts=2, ppo_epochs=1)),
                     reward=reward)
    out = {"method": args.child, "checkpointing": args.checkpointing,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


def _prepare(work: Path, args) -> None:
    """The tiny model, demonstrations and prompts of about ``args.tokens`` tokens."""
    from alignkit.models.factory import DEFAULT_CORPUS, TinyModelConfig, build_tiny_model

    corpus = DEFAULT_CORPUS * 20 + [f"The colour of item {i} is {c}." for i in range(50) for c in ("red", "blue")]
    build_tiny_model(work / "tiny", corpus, TinyModelConfig(
        hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), max_position_embeddings=2 * (args.tokens + args.new_tokens + 64)))
    words = " ".join(f"item {i} is {'red' if i % 2 else 'blue'}." for i in range(args.tokens))  # ~5 tokens each
    rows = [{"prompt": f"Question {k}: {words}", "completion": f"Answer {k}: {words}"} for k in range(4 * args.batch)]
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="sft,ppo,grpo")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=384, help="tokens per prompt (sft: per prompt and per completion)")
    ap.add_argument("--new-tokens", type=int, default=16, help="sampling.max_new_tokens of ppo/grpo")
    ap.add_argument("--batch", type=int, default=8, help="optim.batch_size: sequences per forward/backward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        _prepare(Path(tmp), args)
        for method in args.methods.split(","):
            for checkpointing in ("off", "on"):
                cmd = [sys.executable, __file__, "--child", method, "--checkpointing", checkpointing, "--work", tmp,
                       *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k in ("hidden", "layers", "tokens", "new_tokens", "batch", "threads"))]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    raise SystemExit(f"{method} checkpointing={checkpointing} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                results.append(json.loads(line[len("RESULT "):]))
                print(json.dumps(results[-1]), flush=True)
    print(f"\nhidden {args.hidden} × {args.layers} layers, ~{args.tokens}-token sequences, batch {args.batch}")
    print(f"{'method':<6} {'peak RSS off':>13} {'peak RSS on':>12} {'saved':>8}")
    for method in args.methods.split(","):
        off, on = (next(r for r in results if r["method"] == method and r["checkpointing"] == c) for c in ("off", "on"))
        print(f"{method:<6} {off['peak_rss_mib']:>9.0f} MiB {on['peak_rss_mib']:>8.0f} MiB "
              f"{off['peak_rss_mib'] - on['peak_rss_mib']:>4.0f} MiB"
              + (f"   cuda max allocated {off['cuda_max_allocated_mib']:.0f} → {on['cuda_max_allocated_mib']:.0f} MiB"
                 if "cuda_max_allocated_mib" in off else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
