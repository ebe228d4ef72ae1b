"""A launch this machine cannot run is refused at start-up with what, where and how to fix it:
DeepSpeed ZeRO without the deepspeed package or without a CUDA GPU, DeepSpeed set to accumulate or
clip on top of alignkit, an FSDP version alignkit does not run. The shipped accelerate configs are
read by accelerate's own loader and checked here too (on this CPU machine: DDP and FSDP run,
the DeepSpeed files are refused with the message)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.train.launch_checks import LaunchError, check_config_file, check_launch_environment, deepspeed_problems

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
SHIPPED = sorted(EXAMPLES.glob("*.yaml"))
DS_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


def test_the_four_configs_are_shipped():
    assert {p.name for p in SHIPPED} >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}


@pytest.mark.parametrize("installed,cuda", [(False, False), (False, True), (True, False)])
def test_a_deepspeed_launch_that_cannot_run_here_is_refused_with_the_fix(installed, cuda):
    with pytest.raises(LaunchError) as e:
        check_launch_environment(DS_ENV, cuda_available=cuda, deepspeed_installed=installed)
    msg = str(e.value)
    assert "launched for DeepSpeed ZeRO-3" in msg  # where
    assert ("deepspeed package is not installed" in msg) == (not installed)  # what
    assert ("no CUDA GPU" in msg) == (not cuda)
    assert "examples/accelerate/fsdp.yaml" in msg  # how to fix


def test_a_deepspeed_launch_on_a_gpu_machine_with_deepspeed_passes():
    check_launch_environment(DS_ENV, cuda_available=True, deepspeed_installed=True)


@pytest.mark.parametrize("env", [{}, {"ACCELERATE_USE_FSDP": "true"}, {"ACCELERATE_USE_DEEPSPEED": "false"}])
def test_other_launches_are_not_checked_for_deepspeed(env):
    check_launch_environment(env, cuda_available=False, deepspeed_installed=False)


@pytest.mark.parametrize("key,value,fix", [("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "optim.grad_accum"),
                                           ("ACCELERATE_GRADIENT_CLIPPING", "1.0", "optim.max_grad_norm")])
def test_deepspeed_accumulating_or_clipping_on_top_of_alignkit_is_refused(key, value, fix):
    env = {**DS_ENV, key: value}
    with pytest.raises(LaunchError, match=fix):
        check_launch_environment(env, cuda_available=True, deepspeed_installed=True)
    check_launch_environment({**DS_ENV, key: "1" if "ACCUMULATION" in key else "0.0"}, cuda_available=True,
                             deepspeed_installed=True)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_in_accelerate_and_run_on_a_gpu_machine(path):
    assert check_config_file(path, cuda_available=True, deepspeed_installed=True) == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_on_a_cpu_machine(path):
    problems = check_config_file(path, cuda_available=False, deepspeed_installed=False)
    if path.name.startswith("deepspeed"):
        assert len(problems) == 1, problems
        assert "asks for DeepSpeed ZeRO-" in problems[0] and "no CUDA GPU" in problems[0]
        assert "fsdp.yaml" in problems[0]
    else:
        assert problems == []


@pytest.mark.parametrize("edit,expect", [
    (("zero_stage: 3", "zero_stage: 1"), "zero_stage is 1"),
    (("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 4"), "optim.grad_accum"),
    (("gradient_clipping: 0.0", "gradient_clipping: 1.0"), "optim.max_grad_norm"),
    (("zero_stage: 3", "zero_stage: 3\n  not_a_key: 1"), None),  # accelerate checks keys of the sections it knows
    (("distributed_type: DEEPSPEED", "distributed_type: DEEPSPED"), "accelerate cannot read it"),
])
def test_a_wrong_deepspeed_config_is_refused(tmp_path, edit, expect):
    text = (EXAMPLES / "deepspeed_zero3.yaml").read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit[0], edit[1]))
    problems = check_config_file(bad, cuda_available=True, deepspeed_installed=True)
    if expect is None:
        return  # whatever accelerate makes of it, the check does not crash
    assert any(expect in p for p in problems), problems


def test_fsdp_1_is_refused(tmp_path):
    bad = tmp_path / "fsdp1.yaml"
    bad.write_text((EXAMPLES / "fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    assert any("fsdp_version: 2" in p for p in check_config_file(bad))


@pytest.mark.skipif(not deepspeed_problems(), reason="this machine can run DeepSpeed")
def test_the_command_line_check_says_why_deepspeed_cannot_run_here():
    files = [str(EXAMPLES / "deepspeed_zero3.yaml"), str(EXAMPLES / "fsdp.yaml")]
    proc = subprocess.run([sys.executable, "-m", "alignkit.train.launch_checks", "--config_file", *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "deepspeed_zero3.yaml: cannot run here" in proc.stderr and "fsdp.yaml" in proc.stderr
    assert "fsdp.yaml: ok" in proc.stdout


@pytest.mark.skipif(not deepspeed_problems(), reason="this machine can run DeepSpeed")
def test_a_process_launched_for_deepspeed_stops_before_building_the_accelerator(monkeypatch, tmp_path):
    """The engine runs the check first: the message, not an import error from inside accelerate."""
    from alignkit.config import RunConfig
    from alignkit.train.engine import make_accelerator

    for k, v in DS_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LaunchError, match="launched for DeepSpeed ZeRO-3"):
        make_accelerator(RunConfig(output_dir=str(tmp_path), progress=False, report_to="jsonl"))
