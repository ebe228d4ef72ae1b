"""Accelerate config files checked before launching (``python -m alignkit.train.launch_checks``):
accelerate's loader reads each file, then the start-up checks of the engine
(``deepspeed_unavailable``, ``deepspeed_config_problems``; the running check itself is tested in
tests/test_fsdp.py) and FSDP version 2 apply to its settings. On this CPU machine the shipped DDP
and FSDP files pass and both DeepSpeed files are refused with what to use instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.train import engine
from alignkit.train.launch_checks import check_config_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
SHIPPED = sorted(EXAMPLES.glob("*.yaml"))


@pytest.fixture
def gpu_machine(monkeypatch):
    """A machine with deepspeed and a CUDA GPU."""
    monkeypatch.setattr(engine, "deepspeed_unavailable", lambda: None)


@pytest.fixture
def cpu_machine(monkeypatch):
    monkeypatch.setattr(engine, "deepspeed_unavailable", lambda: "no CUDA GPU is visible, and DeepSpeed ZeRO trains on GPUs")


def test_the_four_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_in_accelerate_and_run_on_a_gpu_machine(path, gpu_machine):
    assert check_config_file(path) == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_on_a_cpu_machine(path, cpu_machine):
    problems = check_config_file(path)
    if path.name.startswith("deepspeed"):
        assert len(problems) == 1, problems
        stage = path.stem[-1]
        assert f"asks for DeepSpeed ZeRO-{stage}, but no CUDA GPU" in problems[0]  # what, where
        assert "fsdp.yaml" in problems[0]  # what to use instead
    else:
        assert problems == []


@pytest.mark.parametrize("edit,expect", [
    (("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 4"), "optim.grad_accum"),
    (("gradient_clipping: 0.0", "gradient_clipping: 1.0"), "optim.max_grad_norm"),
    (("distributed_type: DEEPSPEED", "distributed_type: DEEPSPED"), "accelerate cannot read it"),
    (("use_cpu: false", "use_cpu: false\ntypo_key: 1"), "unknown keys"),  # accelerate's own key check
    (("use_cpu: false", "use_cpu: false\n  broken: [yaml"), "accelerate cannot read it"),
])
def test_a_wrong_deepspeed_config_is_refused(tmp_path, gpu_machine, edit, expect):
    text = (EXAMPLES / "deepspeed_zero3.yaml").read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit[0], edit[1]))
    problems = check_config_file(bad)
    assert any(expect in p for p in problems), problems


def test_fsdp_1_is_refused(tmp_path):
    bad = tmp_path / "fsdp1.yaml"
    bad.write_text((EXAMPLES / "fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    assert any("set fsdp_version: 2" in p for p in check_config_file(bad))


@pytest.mark.skipif(engine.deepspeed_unavailable() is None, reason="this machine can run DeepSpeed")
def test_the_command_line_says_which_files_cannot_run_here():
    files = [str(EXAMPLES / "deepspeed_zero3.yaml"), str(EXAMPLES / "fsdp.yaml")]
    proc = subprocess.run([sys.executable, "-m", "alignkit.train.launch_checks", "--config_file", *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "deepspeed_zero3.yaml: cannot run here" in proc.stdout and "fsdp.yaml instead" in proc.stdout
    assert "fsdp.yaml: ok" in proc.stdout
