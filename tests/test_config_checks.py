"""Every number of every command's config is range-checked when the config is built, with the
field's doc in the message; no numeric field is left without a check."""

from __future__ import annotations

import pytest

from alignkit.cli import COMMANDS, _load
from alignkit.config import ConfigError, build_config, flat_fields
from alignkit.config_checks import Each, check_for, is_numeric_type


def _configs():
    return {name: _load(name)[0] for name in COMMANDS}


def test_every_numeric_field_of_every_command_has_a_check():
    unchecked = [f"{name}: {key}" for name, cls in _configs().items()
                 for key, (tp, _, _) in flat_fields(cls).items() if is_numeric_type(tp) and check_for(key) is None]
    assert not unchecked, "add these to alignkit/config_checks.py LEAF_CHECKS (or DOTTED_CHECKS):\n" + "\n".join(unchecked)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_pass_their_checks(command):
    build_config(_configs()[command])


def _bad_value(check) -> str:
    """A value the check refuses, as a command-line string."""
    rng = check.range if isinstance(check, Each) else check
    if rng.low is not None:
        bad = rng.low - 1 if rng.low_inclusive else rng.low
    elif rng.high is not None:
        bad = rng.high + 1 if rng.high_inclusive else rng.high
    else:
        bad = float("nan")
    text = "nan" if bad != bad else repr(bad)
    return f"[{text}, {text}]" if isinstance(check, Each) else text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_out_of_range_value_is_refused_with_the_field_doc(command):
    cls = _configs()[command]
    for key, (tp, _, doc) in flat_fields(cls).items():
        check = check_for(key)
        if not is_numeric_type(tp) or check is None:
            continue
        value = _bad_value(check)
        if key.endswith("margin_labels"):
            value = "{better: nan}"
        elif key.endswith("adam_betas"):
            value = "[0.9, 1.0]"
        with pytest.raises(ConfigError) as e:
            build_config(cls, None, [f"{key}={value}"])
        msg = str(e.value)
        assert msg.startswith(f"{key}=") and " — " in msg and doc in msg, msg


def test_messages_name_the_field_the_bound_and_the_doc():
    from alignkit.train.sft import SFTConfig

    cases = {
        "optim.batch_size=0": "optim.batch_size=0: must be ≥ 1 — Examples per device per forward pass (micro-batch).",
        "grad_accum=0": "optim.grad_accum=0: must be ≥ 1",
        "batch_size=-1": "optim.batch_size=-1: must be ≥ 1",
        "max_steps=-5": "optim.max_steps=-5: must be ≥ 0",
        "epochs=-1": "optim.epochs=-1.0: must be > 0",
        "warmup_ratio=2": "optim.warmup_ratio=2.0: must be in [0, 1]",
        "keep_checkpoints=0": "run.keep_checkpoints=0: must be ≥ 1",
        "lr=0": "optim.lr=0.0: must be > 0",
        "lr=.inf": "optim.lr=inf: must be a finite number",
        "max_grad_norm=-1": "optim.max_grad_norm=-1.0: must be ≥ 0",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]").replace(".", r"\.")):
            build_config(SFTConfig, None, [override])


def test_sampling_and_probability_bounds():
    from alignkit.train.ppo import PPOConfig

    for override in ("temperature=-0.5", "top_p=0", "top_p=1.5", "gamma=1.1", "clip_eps=0", "samples_per_prompt=0",
                     "prompts_per_rollout=0", "max_new_tokens=0", "data.eval_fraction=1.0", "model.lora_dropout=1"):
        with pytest.raises(ConfigError):
            build_config(PPOConfig, None, [override])
    cfg = build_config(PPOConfig, None, ["temperature=0", "top_p=1", "gamma=1", "weights=[1.0, -1.0]"])
    assert cfg.sampling.temperature == 0 and cfg.reward.weights == [1.0, -1.0]


def test_yaml_values_are_checked_and_the_file_is_named(tmp_path):
    from alignkit.train.dpo import DPOConfig

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  batch_size: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{path}: optim.batch_size=0: must be ≥ 1"):
        build_config(DPOConfig, path)


def test_the_cli_prints_the_message_and_exits_2(capsys):
    from alignkit.cli import main

    assert main(["sft", "optim.batch_size=0"]) == 2
    assert "optim.batch_size=0: must be ≥ 1 — Examples per device" in capsys.readouterr().err
