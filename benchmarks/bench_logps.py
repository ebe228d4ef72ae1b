"""Memory and time of the two log-prob paths on a large-vocabulary model: the full (B, T, V)
logits against the chunked path (hidden states through the output head a chunk of rows at a
time, alignkit/linear_logps.py).

    python benchmarks/bench_logps.py [--batch 4] [--length 256] [--prompt 64] [--steps 3] [--repeats 2]
                                     [--dtype float32|bf16-autocast] [--chunk-elements N ...]

The model is a random Llama with SmolLM2-135M's shape (hidden 576, 9 heads / 3 KV heads, MLP
1536, a 49,152-token vocabulary, tied embeddings) but 2 layers instead of 30, so the head is
what differs. One step is an SFT step's forward and backward (``sft_batch_loss``: summed NLL of
the label tokens; the first ``--prompt`` tokens of each row are prompt, without labels) on
``--batch`` rows of ``--length`` random tokens, on one CPU thread.

Each path runs in its own child process, so its memory is its own; the children alternate
(``--repeats``) and the best time of each is kept. Reported per path:

* ``s/step``: wall time of a forward + backward (the fastest repeat's mean over ``--steps``);
* ``step MB``: peak RSS during the timed steps above the RSS before them (the high-water mark
  is reset after a warm-up step, through ``/proc/self/clear_refs``, and read with
  ``resource.getrusage``): what a step adds to the resident model and its gradients. The
  children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS;
* ``peak MB``: the peak RSS of the timed steps (model, gradients and the step);
* ``fwd s``, ``fwd MB``: the same for a forward without gradient (a reference model's or an
  evaluation's);
* ratios chunked / full.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> dict:
    """One path's measurement (runs in a fresh process)."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit import linear_logps
    from alignkit.models.output_head import set_logps_path
    from alignkit.train.sft import sft_batch_loss

    if args.chunk_elements:
        linear_logps.CHUNK_ELEMENTS = args.chunk_elements[0]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, **SMOLLM2))
    model.config._attn_implementation = "sdpa"
    model.train()
    line = set_logps_path(model, args.path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (args.batch, args.length), generator=g)
    labels = ids.clone()
    labels[:, : args.prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16-autocast")

    def step():
        with autocast:
            loss, _ = sft_batch_loss(model, batch)
        loss.backward()
        return float(loss)

    loss = step()  # warm-up: kernels, and the gradients (kept allocated, as in training)
    model.zero_grad(set_to_none=False)
    def measure(fn) -> tuple[float, float, float]:
        """(seconds per call, peak RSS above the RSS before, peak RSS) of ``args.steps`` calls."""
        before = _rss_mb()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS (Linux ≥ 4.0)
            f.write("5")
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - t0) / args.steps, _max_rss_mb() - before, _max_rss_mb()

    def reference_forward():  # DPO's reference, evaluation: no gradient
        with torch.no_grad(), autocast:
            sft_batch_loss(model, batch)

    seconds, step_mb, peak_mb = measure(step)
    fwd_seconds, fwd_mb, _ = measure(reference_forward)
    return {"path": args.path, "line": line, "loss": loss, "s_per_step": seconds, "step_mb": step_mb,
            "peak_mb": peak_mb, "fwd_s": fwd_seconds, "fwd_mb": fwd_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64, help="tokens per row without labels")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bf16-autocast"), default="float32")
    p.add_argument("--chunk-elements", type=int, nargs="*", default=[],
                   help="also run the chunked path with these CHUNK_ELEMENTS (rows × V per chunk)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--path", default="full", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = [("full", 0), ("chunked", 0)] + [("chunked", n) for n in args.chunk_elements]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    best: dict[tuple, dict] = {}
    for _ in range(args.repeats):
        for path, chunk in runs:
            cmd = [sys.executable, __file__, "--child", "1", "--path", path, "--chunk-elements", *([str(chunk)] if chunk else []),
                   *(f"--{k}={v}" for k, v in (("batch", args.batch), ("length", args.length), ("prompt", args.prompt),
                                               ("layers", args.layers), ("steps", args.steps),
                                               ("threads", args.threads), ("dtype", args.dtype)))]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{path} run failed:\n{proc.stderr}")
            out = json.loads(proc.stdout.splitlines()[-1])
            key = (path, chunk)
            if key not in best or out["s_per_step"] < best[key]["s_per_step"]:
                best[key] = {**out, **{k: min(out[k], best.get(key, out)[k]) for k in ("step_mb", "peak_mb", "fwd_mb")}}
            else:
                best[key].update({k: min(out[k], best[key][k]) for k in ("step_mb", "peak_mb", "fwd_s", "fwd_mb")})
    labels = args.batch * (args.length - max(args.prompt, 1))
    print(f"SmolLM2-shaped Llama, {args.layers} layers, V={SMOLLM2['vocab_size']}, batch {args.batch} × {args.length} "
          f"tokens ({labels} labelled), {args.dtype}, {args.threads} thread(s), best of {args.repeats}")
    full = best[("full", 0)]
    print(f"{'path':<24}{'s/step':>9}{'step MB':>10}{'peak MB':>10}{'fwd s':>8}{'fwd MB':>8}{'loss':>12}")
    for (path, chunk), r in best.items():
        name = path + (f" (chunk {chunk})" if chunk else "")
        print(f"{name:<24}{r['s_per_step']:>9.3f}{r['step_mb']:>10.0f}{r['peak_mb']:>10.0f}{r['fwd_s']:>8.3f}"
              f"{r['fwd_mb']:>8.0f}{r['loss']:>12.4f}")
    c = best[("chunked", 0)]
    print(f"chunked / full: time {c['s_per_step'] / full['s_per_step']:.2f}×, step memory "
          f"{c['step_mb'] / max(full['step_mb'], 1e-9):.2f}×, peak RSS {c['peak_mb'] / full['peak_mb']:.2f}×; "
          f"no-grad forward: time {c['fwd_s'] / full['fwd_s']:.2f}×, memory {c['fwd_mb'] / max(full['fwd_mb'], 1e-9):.2f}×")
    print(f"[{c['line']}]")


if __name__ == "__main__":
    main()
