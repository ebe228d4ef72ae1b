"""Command line: ``alignkit <command> [--config FILE.yaml] [key=value ...]``.

Every command is a typed config dataclass plus a run function; ``alignkit <command> --help``
prints every field with its default and doc (read from the docstring under the field). The Python
API (:mod:`alignkit.api`) calls the same run functions: this file only parses arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from alignkit.config import ConfigError, build_config, help_text

#: command -> (module, config class, run function, one-line description)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "sft": ("alignkit.train.sft", "SFTConfig", "run_sft", "supervised fine-tuning on demonstrations"),
    "rm": ("alignkit.train.rm", "RMConfig", "run_rm", "train a reward model (pairwise with margins, or regression)"),
    "eval-rm": ("alignkit.train.evaluate_rm", "EvalRMConfig", "run_eval_rm", "reward-model accuracy overall and per margin bucket"),
    "score": ("alignkit.train.evaluate_rm", "ScoreConfig", "run_score", "score (prompt, response) rows with a reward model"),
    "dpo": ("alignkit.train.dpo", "DPOConfig", "run_dpo", "direct preference optimisation and variants (ipo, cdpo, robust, hinge, simpo, orpo) on comparisons"),
    "kto": ("alignkit.train.kto", "KTOConfig", "run_kto", "KTO on completions labelled desirable/undesirable (or on pairs)"),
    "ppo": ("alignkit.train.ppo", "PPOConfig", "run_ppo", "actor-critic PPO from a reward (InstructGPT): KL penalty, GAE, PPO-ptx, cost constraint"),
    "grpo": ("alignkit.train.grpo", "GRPOConfig", "run_grpo", "group-relative policy optimisation (critic-free) from a reward"),
    "rloo": ("alignkit.train.grpo", "RLOOConfig", "run_rloo", "REINFORCE leave-one-out (critic-free) from a reward"),
    "rs": ("alignkit.train.rejection_sampling", "RSConfig", "run_rs", "rejection sampling: best of N under the reward, then fine-tune on it"),
    "critic": ("alignkit.train.critic", "CriticConfig", "run_critic", "train a critique (generative) reward model: SFT on written critiques ending in a verdict"),
    "tiny-model": ("alignkit.models.factory", "TinyCommandConfig", "run_tiny_model", "build a tiny local Llama + BPE tokenizer from a corpus (no network)"),
    "iterate": ("alignkit.demo.iterate", "IterateConfig", "run_iterate", "iterative RLHF rounds on the alignment world: label, retrain reward models, rejection-sample"),
    "demo": ("alignkit.demo", "DemoConfig", "run_demo", "the whole pipeline on the embedded alignment world, measured by its gold judge"),
}


def _load(command: str):
    module, cfg_name, fn_name, _ = COMMANDS[command]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, fn_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="alignkit",
        description="Align language models with human preferences.",
        epilog="Commands:\n" + "\n".join(f"  {k:<9} {v[3]}" for k, v in COMMANDS.items())
        + "\n\nRun `alignkit <command> --help` for every option of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", choices=list(COMMANDS), metavar="command")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"alignkit: unknown command {command!r}." + (f" Did you mean {close[0]!r}?" if close else "")
              + f" Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cfg_cls, run = _load(command)
    parser = argparse.ArgumentParser(
        prog=f"alignkit {command}",
        description=(cfg_cls.__doc__ or "").strip(),
        epilog="Options (give as key=value; dotted or unique leaf names):" + help_text(cfg_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of options (overridden by key=value arguments)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    if command == "demo":
        # The demo's own flags, as the README shows them.
        parser.add_argument("--out", dest="out_flag")
        parser.add_argument("--seed", dest="seed_flag", type=int)
        parser.add_argument("--seeds", dest="seeds_flag", help="comma-separated seeds, e.g. 0,1,2: one run each, aggregated")
        parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(rest)
    overrides = list(args.overrides)
    if command == "demo" and args.seed_flag is not None and args.seeds_flag:
        print("alignkit demo: give --seed N (one run) or --seeds A,B,C (one run per seed), not both", file=sys.stderr)
        return 2
    if command == "demo":
        if args.out_flag:
            overrides.append(f"out={args.out_flag}")
        if args.seed_flag is not None:
            overrides.append(f"seed={args.seed_flag}")
        if args.seeds_flag:
            overrides.append(f"seeds={args.seeds_flag}")
        if args.quick:
            overrides.append("quick=true")
    try:
        cfg = build_config(cfg_cls, args.config, overrides)
    except (ConfigError, ValueError) as e:
        print(f"alignkit {command}: {e}", file=sys.stderr)
        return 2
    from alignkit.models.loading import ModelLoadError
    from alignkit.numerics import NonFiniteError
    from alignkit.train.outputs import OutputError, check_output_path

    try:
        if getattr(getattr(cfg, "run", None), "output_dir", None):
            check_output_path(cfg.run.output_dir)  # before any model or data is loaded
        import shlex

        from alignkit.context import RunContext, run_context

        # The command line is stated in the model card of the output folder.
        with run_context(RunContext(command=command, invocation="alignkit " + " ".join(map(shlex.quote, argv)))):
            run(cfg)
    except (ValueError, FileNotFoundError, ModelLoadError, NonFiniteError, OutputError) as e:
        # Bad input (data, config, paths) and diverged runs get their message, not a traceback; bugs still raise.
        print(f"alignkit {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
