"""Check accelerate config files before launching: ``python -m alignkit.train.launch_checks
--config_file examples/accelerate/*.yaml`` says, per file, whether this machine can run it with
alignkit, and if not what is wrong and what to use instead.

accelerate's own loader reads each file (unknown top-level keys and invalid values are its
errors); then the checks alignkit's processes run at start-up are applied to the file's settings,
from the same functions (:func:`alignkit.train.engine.deepspeed_unavailable`,
:func:`alignkit.train.engine.deepspeed_config_problems`; the running check is
:func:`alignkit.train.engine.check_deepspeed_launch`): DeepSpeed needs the ``deepspeed`` package and
a CUDA GPU, and must leave gradient accumulation and clipping to alignkit; and FSDP must be version
2, the one alignkit runs and tests. One answer before launching instead of a refusal from every
process after it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: What to use instead of DeepSpeed on a machine that cannot run it.
DEEPSPEED_ALTERNATIVE = ("on this machine use examples/accelerate/fsdp.yaml instead (FSDP 2 shards parameters, gradients "
                         "and optimizer state like ZeRO-3, and runs on the CPU over gloo too) or ddp.yaml")


def check_config_file(path: str | Path) -> list[str]:
    """Problems of the accelerate config file ``path`` for an alignkit run on this machine (empty
    when it can run here)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from alignkit.train import engine

    import yaml

    path = Path(path)
    try:
        cfg = load_config_from_file(str(path))
    except (ValueError, TypeError, FileNotFoundError, yaml.YAMLError) as e:
        return [f"{path}: accelerate cannot read it: {e}"]
    problems: list[str] = []
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        zero = dict(cfg.deepspeed_config or {})
        if zero.get("deepspeed_config_file"):
            problems.append(f"{path}: deepspeed_config_file is not checked here; give the settings in deepspeed_config")
        problems += [f"{path}: {p}" for p in engine.deepspeed_config_problems(zero)]
        why = engine.deepspeed_unavailable()
        if why is not None:
            problems.append(f"{path} asks for DeepSpeed ZeRO-{zero.get('zero_stage', '?')}, but {why}; {DEEPSPEED_ALTERNATIVE}")
    elif cfg.distributed_type == DistributedType.FSDP:
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
            print(f"[alignkit] {path}: cannot run here:\n" + "\n".join(f"  - {p}" for p in problems), flush=True)
        else:
            print(f"[alignkit] {path}: ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
