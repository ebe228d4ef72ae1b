"""``run.release_memory``: freed blocks leave the resident memory (alignkit/train/memory.py).

Each case runs in a fresh Python process (an allocator setting is per process): it allocates
torch tensors of 4 MiB interleaved with small long-lived ones (as optimizer moments sit between
activations), frees the large ones, and reports how much of them left the RSS. With glibc's
defaults the first free raises the mmap threshold, the rest come from the heap and stay resident;
after :func:`release_freed_memory` they leave.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "release":
    from alignkit.train.memory import release_freed_memory
    print(release_freed_memory(), file=sys.stderr)
warm = torch.ones(1 << 20); del warm   # one 4 MiB block freed: glibc raises its threshold here
big, small = [], []
for i in range(64):
    big.append(torch.ones(1 << 20))     # 4 MiB, written so its pages are resident
    small.append(torch.ones(4096))      # 16 KiB kept, between the large blocks
before = rss()
del big
after = rss()
print(json.dumps({"freed_mb": 256, "returned_mb": (before - after) / 2**20}))
"""


#: Environment variables through which a user picks the allocator's settings (left alone by alignkit).
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def _returned_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)["returned_mb"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
@pytest.mark.skipif("malloc" in os.environ.get("GLIBC_TUNABLES", "") + os.environ.get("LD_PRELOAD", ""),
                    reason="the machine sets its own allocator: glibc's defaults are not what runs")
def test_freed_blocks_leave_the_rss_only_with_release_memory():
    kept = _returned_mb("defaults")
    returned = _returned_mb("release")
    assert returned > 0.9 * 256, returned  # every freed 4 MiB block went back to the OS
    assert kept < 0.5 * 256, kept  # the defaults keep them: what the option is for


def test_the_option_is_reported_at_start_up_and_can_be_turned_off(tiny_dir, tmp_path, capsys):
    from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
    from alignkit.train.sft import SFTConfig, run_sft

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}?", "completion": f"It is item {i}."}) + "\n"
                            for i in range(4)))

    def run(release: bool, out: str):
        run_sft(SFTConfig(model=ModelConfig(path=str(tiny_dir)), data=DataConfig(path=str(data)),
                          optim=OptimConfig(batch_size=2, max_steps=1),
                          run=RunConfig(output_dir=str(tmp_path / out), progress=False, report_to="jsonl",
                                        release_memory=release)))
        return capsys.readouterr().out

    from alignkit.train import memory

    monkeypatch_state = memory._applied
    memory._applied = None  # as in a fresh process
    try:
        assert "memory: allocator defaults (run.release_memory=false)" in run(False, "off")
        on = run(True, "on")
        assert "memory: " in on and "run.release_memory=false" not in on
        if memory._applied.startswith("freed blocks"):  # applied: a later run cannot undo it, and says so
            assert "cannot undo it" in run(False, "off-again")
    finally:
        memory._applied = monkeypatch_state


@pytest.mark.parametrize("name,value", [("MALLOC_MMAP_THRESHOLD_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                                        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")])
def test_the_users_own_allocator_settings_are_left_alone(name, value, monkeypatch):
    from alignkit.train import memory

    for other in USER_SETTINGS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(memory, "_applied", None)
    called = []
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *a: called.append(a))
    assert memory.release_freed_memory() == f"allocator as set by {name}={value}"
    assert not called  # mallopt never reached


def test_other_platforms_keep_their_defaults(monkeypatch):
    from alignkit.train import memory

    for other in USER_SETTINGS:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setattr(memory, "_applied", None)
    monkeypatch.setattr(memory.platform, "system", lambda: "Darwin")
    assert memory.release_freed_memory() == "allocator defaults (not glibc)"
