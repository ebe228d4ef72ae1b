"""The ceiling for the demo's training speed: a plain transformers loop (forward, backward, AdamW
step, no alignkit) on the demo's model shape, in tokens per CPU-second, one thread.

The demo's stages train this model; if the plain loop is not much faster than the demo's own
figures (its log prints tokens/s per stage), the stages are compute-bound and only a smaller scale
shortens the run.

    python benchmarks/bench_demo_model.py            # full/quick shape: hidden 64, 3 layers, vocab 768
    python benchmarks/bench_demo_model.py --hidden 96  # the shape before (1.6x slower per token)
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.demo.config import FULL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=53, help="tokens per document (the demo corpus's mean is ~53)")
    p.add_argument("--batches", default="16,32,64", help="comma-separated batch sizes (the demo pretrains at 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch size (after 3 warm-up steps)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: the demo's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    s = FULL  # quick and full share the model shape
    hidden = args.hidden or s.hidden_size
    config = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden,  # as demo/pipeline.py builds it
                         num_hidden_layers=s.num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=s.vocab_size, max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print(f"demo model shape: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, one thread")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randint(0, s.vocab_size, (batch, args.length))
        for i in range(3 + args.steps):
            if i == 3:
                t0 = time.process_time()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        cpu = time.process_time() - t0
        print(f"batch {batch:>3} x {args.length} tokens: {batch * args.length * args.steps / cpu:,.0f} tokens per CPU-second")


if __name__ == "__main__":
    main()
