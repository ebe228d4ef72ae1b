"""What a run ran on, recorded beside its figures.

Float32 kernels round differently on CPUs with different instruction sets (AVX-512 vs AVX2 change
the order of additions inside a matrix product), and training amplifies the difference, so the
same seed and software give the same figures only on the same kind of machine. A report therefore
records the CPU (model and the vector flags that pick the kernels), the library versions, the
thread count and the seed; two reports are comparable to the bit only when these match.
"""

from __future__ import annotations

import os
import platform
import sys

#: CPU flags that decide which float kernels run (x86 vector extensions, ARM's NEON/SVE).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "sve2")


def cpu_info() -> dict:
    """``cpu_model``, ``cpu_id`` (family/model/stepping) and ``cpu_vector_flags`` from /proc/cpuinfo
    (Linux), else what platform says."""
    model, flags, ident = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags |= set(value.split())
                elif key in ("cpu family", "model", "stepping") and key not in ident:
                    ident[key] = value.strip()
    except OSError:
        pass
    return {"cpu_model": model, "cpu_id": " ".join(f"{k} {v}" for k, v in ident.items()),
            "cpu_vector_flags": [f for f in VECTOR_FLAGS if f in flags]}


def run_environment(seed: int | None = None) -> dict:
    """The machine and software of this process: CPU model, vector flags and count, torch,
    transformers and Python versions, torch's thread count, its float32 matmul precision, the
    platform, and ``seed``."""
    import torch
    import transformers

    env = {**cpu_info(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": sys.version.split()[0],
           "torch_threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "platform": platform.platform(), "seed": seed}
    try:  # the instruction set torch's CPU kernels were dispatched to (AVX2, AVX512 ...)
        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - older torch
        pass
    try:
        import accelerate

        env["accelerate"] = accelerate.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    env["cuda"] = torch.cuda.is_available()
    env["alignkit_commit"] = source_commit()
    return env


def source_commit() -> str | None:
    """The git commit of the alignkit source this process runs (``+dirty`` when files differ from
    it), or None outside a git checkout (an installed wheel): the code a report's figures came from."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "alignkit"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def comparable(a: dict, b: dict, keys=("cpu_model", "cpu_id", "cpu_vector_flags", "torch", "transformers",
                                       "torch_threads")) -> list[str]:
    """The keys in which two environments differ that change float results (empty: comparable to the bit)."""
    return [k for k in keys if a.get(k) != b.get(k)]
