"""Start-up checks of a launch: a launch this machine cannot run, or that alignkit would run with
different numbers than asked, is refused at once with what is wrong, where, and how to fix it.

``accelerate launch --config_file examples/accelerate/X.yaml`` reads the file (accelerate's own
loader checks its keys and values) and hands it to every process as environment variables
(``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``, ``ACCELERATE_USE_FSDP``, ...).
Two checks build on that:

- :func:`check_launch_environment`, called by every process before its accelerator is built
  (:func:`alignkit.train.engine.make_accelerator`): a DeepSpeed launch on a machine without the
  ``deepspeed`` package or without a CUDA GPU stops with one clear message, instead of an import
  error or a device error from deep inside DeepSpeed;
- :func:`check_config_file` / ``python -m alignkit.train.launch_checks --config_file X.yaml``: the
  same, before launching anything, for a config file: accelerate loads it, alignkit checks the
  settings it relies on (DeepSpeed's own accumulation and clipping off, since alignkit does both;
  FSDP version 2) and whether this machine can run it.

DeepSpeed needs NVIDIA GPUs and ``pip install deepspeed``; without ``deepspeed`` installed,
``accelerate launch`` itself already stops before any process starts ("DeepSpeed is not installed
=> run `pip3 install deepspeed`"); :func:`check_launch_environment` covers the case it lets through
(deepspeed installed, no GPU) and processes started another way (torchrun, a job scheduler) with
the launch's environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: What to use instead of DeepSpeed on a machine that cannot run it (said in every refusal).
DEEPSPEED_ALTERNATIVE = ("on a machine without NVIDIA GPUs shard with FSDP instead "
                         "(`accelerate launch --config_file examples/accelerate/fsdp.yaml ...`, which runs on the "
                         "CPU over gloo too) or use ddp.yaml")


class LaunchError(RuntimeError):
    """A launch this machine cannot run, or one alignkit would run with other numbers than asked."""


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def deepspeed_problems(cuda_available: bool | None = None, deepspeed_installed: bool | None = None) -> list[str]:
    """Why this machine cannot run DeepSpeed ZeRO (empty when it can). The arguments stand in for
    the machine in tests; by default they are looked up."""
    if deepspeed_installed is None:
        deepspeed_installed = importlib.util.find_spec("deepspeed") is not None
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    problems = []
    if not deepspeed_installed:
        problems.append("the deepspeed package is not installed (pip install deepspeed, with a CUDA toolchain)")
    if not cuda_available:
        problems.append("there is no CUDA GPU on this machine (DeepSpeed ZeRO runs its optimizer and "
                        "collectives on NVIDIA GPUs)")
    return problems


def check_launch_environment(env: Mapping[str, str] | None = None, cuda_available: bool | None = None,
                             deepspeed_installed: bool | None = None) -> None:
    """Refuse, before the accelerator is built, a process launched for DeepSpeed
    (``ACCELERATE_USE_DEEPSPEED=true``, set by ``accelerate launch`` for ``distributed_type:
    DEEPSPEED``) on a machine that cannot run it, or with settings alignkit does not run
    correctly. A no-op for every other launch (one process, DDP, FSDP)."""
    env = os.environ if env is None else env
    if not _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        return
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
    where = f"this process was launched for DeepSpeed ZeRO-{stage} (accelerate's distributed_type: DEEPSPEED)"
    problems = deepspeed_problems(cuda_available, deepspeed_installed)
    problems += _deepspeed_setting_problems(env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
                                            env.get("ACCELERATE_GRADIENT_CLIPPING"))
    if problems:
        raise LaunchError(f"{where}, but {'; and '.join(problems)}. Fix: {_fix(problems)}")


def _deepspeed_setting_problems(accumulation, clipping) -> list[str]:
    """alignkit accumulates micro-batches and clips gradients itself (optim.grad_accum,
    optim.max_grad_norm); DeepSpeed doing either too would scale the loss a second time or clip
    twice: silent wrong numbers, so both must be left at 1 and off."""
    problems = []
    if accumulation not in (None, "", "1", 1, "auto"):
        problems.append(f"DeepSpeed's gradient_accumulation_steps is {accumulation} (alignkit accumulates "
                        "itself: set it to 1 and use optim.grad_accum)")
    if clipping not in (None, "", "none", "0", "0.0", 0, 0.0, "auto"):
        problems.append(f"DeepSpeed's gradient_clipping is {clipping} (alignkit clips itself: set it to 0 and use "
                        "optim.max_grad_norm)")
    return problems


def _fix(problems: list[str]) -> str:
    machine = any("deepspeed package" in p or "CUDA GPU" in p for p in problems)
    settings = any("alignkit" in p for p in problems)
    fixes = []
    if machine:
        fixes.append(DEEPSPEED_ALTERNATIVE)
    if settings:
        fixes.append("edit deepspeed_config in the accelerate config file (see examples/accelerate/deepspeed_zero3.yaml)")
    return "; ".join(fixes)


def check_config_file(path: str | Path, cuda_available: bool | None = None,
                      deepspeed_installed: bool | None = None) -> list[str]:
    """Problems of the accelerate config file ``path`` for an alignkit run on this machine (empty
    when it can run here). accelerate's loader reads it first, so unknown keys and invalid values
    are accelerate's own errors; alignkit then checks what it relies on."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = Path(path)
    try:
        cfg = load_config_from_file(str(path))
    except (ValueError, TypeError, FileNotFoundError) as e:
        return [f"{path}: accelerate cannot read it: {e}"]
    kind = cfg.distributed_type
    problems: list[str] = []
    if kind == DistributedType.DEEPSPEED:
        ds = cfg.deepspeed_config or {}
        if ds.get("deepspeed_config_file"):
            problems.append(f"{path}: deepspeed_config_file is not checked here; give the settings in deepspeed_config")
        stage = ds.get("zero_stage")
        if stage not in (2, 3):
            problems.append(f"{path}: deepspeed_config.zero_stage is {stage!r}; alignkit ships and documents ZeRO-2 and ZeRO-3")
        problems += [f"{path}: {p}" for p in _deepspeed_setting_problems(
            str(ds.get("gradient_accumulation_steps", 1)), str(ds.get("gradient_clipping", 0.0)))]
        machine = deepspeed_problems(cuda_available, deepspeed_installed)
        if machine:
            problems.append(f"{path} asks for DeepSpeed ZeRO-{stage}, but {'; and '.join(machine)}; {DEEPSPEED_ALTERNATIVE}")
    elif kind == DistributedType.FSDP:
        version = int((cfg.fsdp_config or {}).get("fsdp_version", 1))
        if version != 2:
            problems.append(f"{path}: fsdp_config.fsdp_version is {version}; alignkit runs and tests FSDP 2 "
                            "(set fsdp_version: 2)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.train.launch_checks",
                                     description="Check accelerate config files for an alignkit run on this machine.")
    parser.add_argument("--config_file", nargs="+", required=True, help="accelerate config file(s) (YAML)")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.config_file:
        problems = check_config_file(path)
        if problems:
            failed += 1
            print(f"[alignkit] {path}: cannot run here:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        else:
            print(f"[alignkit] {path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
