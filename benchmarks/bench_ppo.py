"""PPO step time on a tiny local model, split into generation, scoring and update, and tokens/s.

    python benchmarks/bench_ppo.py                      # defaults: 64 prompts, 32 new tokens
    python benchmarks/bench_ppo.py --prompts 32 --max-new-tokens 16 --rollouts 4 --threads 1

Builds a tiny Llama with the local factory (no network), runs ``alignkit.train.ppo.run_ppo`` with
a Python-function reward, and reports the mean over rollouts (the first, warm-up, rollout is
excluded) of each phase as logged in ``time/*`` and, in CPU seconds, ``cpu/*`` (definitions in docs/rl.md):

- generation: sampling the responses (``alignkit.rollout.generate``, KV cache) and building the batch;
- scoring: the reward function, plus the no-grad forward passes for log π_old, log π_ref and V;
- update: ``ppo_epochs`` passes of minibatch forward/backward/optimizer steps.

``tokens/s`` counts prompt + response tokens of the rollout over the whole step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per rollout (one response each)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rollouts", type=int, default=4, help="rollouts to time (plus one warm-up)")
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16, help="optim.batch_size: episodes per forward pass / step")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--value-model", default="separate", choices=["separate", "shared"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.models.factory import DEFAULT_CORPUS, TinyModelConfig, build_tiny_model
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.online import KLConfig, RewardConfig, RolloutConfig
    from alignkit.train.ppo import PPOConfig, run_ppo

    with tempfile.TemporaryDirectory() as tmp:
        corpus = DEFAULT_CORPUS * 20 + [f"The colour of item {i} is {c}." for i in range(50) for c in ("red", "blue")]
        model_dir = build_tiny_model(Path(tmp) / "tiny", corpus, TinyModelConfig(
            hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers))
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        prompts = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(args.prompts)]
        cfg = PPOConfig(
            model=ModelConfig(path=str(model_dir)),
            optim=OptimConfig(lr=1e-3, batch_size=args.batch_size, schedule="constant", warmup_ratio=0.0),
            run=RunConfig(output_dir=str(Path(tmp) / "out"), progress=False, report_to="jsonl"),
            sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, generation_batch_size=args.prompts),
            reward=RewardConfig(unfinished_penalty=0.0),
            rollout=RolloutConfig(prompts_per_rollout=args.prompts, num_rollouts=args.rollouts + 1,
                                  ppo_epochs=args.ppo_epochs),
            kl=KLConfig(kl_coef=0.05),
            value_model=args.value_model,
        )
        reward = FunctionReward(lambda p, r: sum(c.isdigit() for c in r) / max(1, len(r)))
        t0 = time.perf_counter()
        result = run_ppo(cfg, prompts, reward)
        wall = time.perf_counter() - t0

    rows = result.history[1:]  # drop the warm-up rollout
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    figures = {
        "prompts_per_rollout": args.prompts, "max_new_tokens": args.max_new_tokens, "ppo_epochs": args.ppo_epochs,
        "value_model": args.value_model, "threads": torch.get_num_threads(), "policy_params": params,
        "response_tokens_mean": mean("response_length"),
        "generation_s": mean("time/generation"), "scoring_s": mean("time/scoring"), "update_s": mean("time/update"),
        "step_s": mean("time/step"), "tokens_per_s": mean("tokens_per_s"),
        "generated_tokens_per_s": args.prompts * mean("response_length") / mean("time/generation"),
        "total_wall_s": wall,
        # CPU seconds of the process per phase (the loop's cpu/*): undisturbed by other work on shared cores
        **{f"{phase}_cpu_s": mean(f"cpu/{phase}") for phase in ("generation", "scoring", "update", "step")},
    }
    step = figures["step_s"]
    print(f"\nPPO step on a tiny Llama ({params / 1e6:.2f}M parameters, hidden {args.hidden}, {args.layers} layers), {args.prompts} prompts × "
          f"≤{args.max_new_tokens} new tokens, {args.ppo_epochs} PPO epochs, {figures['threads']} threads")
    cpu_step = figures["step_cpu_s"]
    print(f"{'phase':<12}{'seconds':>10}{'share':>9}{'CPU-s':>9}{'share':>9}")
    for phase in ("generation", "scoring", "update"):
        s, c = figures[f"{phase}_s"], figures[f"{phase}_cpu_s"]
        print(f"{phase:<12}{s:>10.3f}{s / step:>9.1%}{c:>9.3f}{c / cpu_step:>9.1%}")
    print(f"{'step':<12}{step:>10.3f}{'':>9}{cpu_step:>9.3f}")
    print(f"tokens/s (prompt + response, whole step): {figures['tokens_per_s']:,.0f}")
    print(f"generated tokens/s (generation phase):    {figures['generated_tokens_per_s']:,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
