"""Range checks of every number in every command's config, applied when a config is built.

A bad number otherwise surfaces late and far away (``batch_size=0`` as a traceback inside the
sampler) or never (``warmup_ratio=2`` silently warms up for the whole run). The checks are a table
keyed by a field's leaf name (``lr``, ``batch_size``, ...), with dotted keys where one leaf name
means different things in different sections, so config classes declare fields without
repeating range logic and a new field with a known name is checked at once. A test asserts that
every numeric field of every command has a check, so a new one cannot slip through. Messages carry
the field's own doc::

    optim.batch_size=0: must be ≥ 1 — Examples per device per forward pass (micro-batch).

Every float must also be finite (``nan`` and ``inf`` are refused everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; ``None`` bounds are open-ended."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def problem(self, x: float) -> str | None:
        """Why ``x`` is out of range, or None."""
        if isinstance(x, float) and not math.isfinite(x):
            return "must be a finite number"
        too_low = self.low is not None and (x < self.low or (x == self.low and not self.low_inclusive))
        too_high = self.high is not None and (x > self.high or (x == self.high and not self.high_inclusive))
        return f"must be {self}" if too_low or too_high else None

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}"
                    f"{']' if self.high_inclusive else ')'}")
        if self.low is not None:
            return f"{'≥' if self.low_inclusive else '>'} {self.low:g}"
        if self.high is not None:
            return f"{'≤' if self.high_inclusive else '<'} {self.high:g}"
        return "a finite number"


@dataclass(frozen=True)
class Each:
    """Every element of a list/tuple, or every value of a mapping, in ``range``."""

    range: Range

    def __str__(self) -> str:
        return f"each {self.range}"


Check = Range | Each


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_inclusive=False)


def between(low: float, high: float, low_inclusive: bool = True, high_inclusive: bool = True) -> Range:
    return Range(low, high, low_inclusive, high_inclusive)


ANY = Range()  # any finite number
COUNT = at_least(1)  # a size, a length, a number of things that must exist
OPTIONAL = at_least(0)  # a count or period where 0 means "off" / "all" / "derive" (see the field's doc)
PROBABILITY = between(0, 1)
SEED = between(0, 2**63 - 1)

#: leaf field name -> check. One name, one meaning across commands; see DOTTED_CHECKS otherwise.
LEAF_CHECKS: dict[str, Check] = {
    # model
    "lora_r": COUNT, "lora_alpha": above(0), "lora_dropout": between(0, 1, high_inclusive=False),
    # data
    "limit": OPTIONAL, "eval_fraction": between(0, 1, high_inclusive=False), "eval_size": OPTIONAL,
    "max_length": COUNT, "max_prompt_length": COUNT, "margin_labels": Each(ANY),
    # optimiser and schedule
    "lr": above(0), "weight_decay": at_least(0), "adam_betas": Each(between(0, 1, high_inclusive=False)),
    "batch_size": COUNT, "grad_accum": COUNT, "epochs": above(0), "max_steps": OPTIONAL,
    "warmup_ratio": PROBABILITY, "max_grad_norm": at_least(0),
    # run
    "seed": SEED, "eval_every": OPTIONAL, "save_every": OPTIONAL, "keep_checkpoints": COUNT,
    "log_every": COUNT, "threads": OPTIONAL, "max_nonfinite_steps": COUNT,
    # reward models
    "reward_scale": above(0), "center_rewards_coefficient": at_least(0),
    # DPO / KTO
    "beta": above(0), "label_smoothing": between(0, 0.5), "simpo_gamma": at_least(0), "sft_weight": at_least(0),
    "desirable_weight": at_least(0), "undesirable_weight": at_least(0),
    # sampling
    "max_new_tokens": COUNT, "temperature": at_least(0), "top_p": between(0, 1, low_inclusive=False),
    "top_k": OPTIONAL, "generation_batch_size": COUNT,
    # rewards in online methods
    "weights": Each(ANY), "safety_threshold": ANY, "clip": at_least(0), "unfinished_penalty": at_least(0),
    # rollouts
    "prompts_per_rollout": COUNT, "samples_per_prompt": COUNT, "num_rollouts": OPTIONAL, "ppo_epochs": COUNT,
    # KL control
    "kl_coef": at_least(0), "target_kl": above(0), "kl_horizon": COUNT,
    # PPO / GRPO
    "gamma": PROBABILITY, "gae_lambda": PROBABILITY, "clip_eps": between(0, 1, low_inclusive=False, high_inclusive=False),
    "clip_eps_high": at_least(0), "clip_eps_value": at_least(0), "vf_coef": at_least(0), "ptx_coef": at_least(0),
    "cost_threshold": ANY, "lagrange_init": at_least(0), "lagrange_lr": at_least(0), "lagrange_max": at_least(0),
    # rejection sampling, iterative rounds
    "num_samples": COUNT, "rounds": COUNT, "prompts_per_round": OPTIONAL,
    # critique reward models
    "max_score": at_least(2), "extend_vocab": OPTIONAL, "verdict_weight": at_least(0), "eval_verdicts": OPTIONAL,
    # tiny-model shapes
    "vocab_size": COUNT, "hidden_size": COUNT, "intermediate_size": COUNT, "num_hidden_layers": COUNT,
    "num_attention_heads": COUNT, "max_position_embeddings": COUNT,
}

#: dotted key (its tail, e.g. "template.max_score") -> check, where a leaf name's meaning depends on
#: its section. Consulted before LEAF_CHECKS.
DOTTED_CHECKS: dict[str, Check] = {}


def is_numeric_type(tp: Any) -> bool:
    """True for int/float fields and containers of them (tuples, lists, dicts of numbers)."""
    import typing

    if tp in (int, float):
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not str]
    return bool(args) and typing.get_origin(tp) is not None and any(is_numeric_type(a) for a in args)


def check_for(key: str) -> Check | None:
    """The check of dotted config key ``key``: the longest matching dotted tail, else its leaf name."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        tail = ".".join(parts[i:])
        if tail in DOTTED_CHECKS:
            return DOTTED_CHECKS[tail]
    return LEAF_CHECKS.get(parts[-1])


def problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be used for ``key`` (``"key=value: must be ... — doc"`` without the doc), or None."""
    check = check_for(key)
    if check is None or value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(check, Each):
        items = value.values() if isinstance(value, dict) else value
        for x in items:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and (why := check.range.problem(x)):
                return f"{key}={value!r}: {why.replace('must be', 'each must be', 1)}"
        return None
    if isinstance(value, (int, float)):
        why = check.problem(value)
        return f"{key}={value!r}: {why}" if why else None
    return None
