import textwrap

import pytest

from alignkit.cli import COMMANDS, main
from alignkit.config import ConfigError, build_config, field_docs, flat_fields, help_text
from alignkit.train.rm import RMConfig
from alignkit.train.sft import SFTConfig


def test_every_field_has_a_doc():
    for cls in (SFTConfig, RMConfig):
        for key, (_, _, doc) in flat_fields(cls).items():
            assert doc, f"{cls.__name__}.{key} has no docstring"


def test_overrides_dotted_and_leaf_names_and_types():
    cfg = build_config(SFTConfig, overrides=["optim.lr=3e-4", "batch_size=4", "run.resume=true", "margin_labels={better: 2.5}"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size == 4 and cfg.run.resume is True
    assert cfg.data.margin_labels == {"better": 2.5}


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent("""
        model: {path: /m}
        optim:
          lr: 0.001
          batch_size: 3
    """))
    cfg = build_config(SFTConfig, f, ["optim.batch_size=5"])
    assert cfg.model.path == "/m" and cfg.optim.lr == 0.001 and cfg.optim.batch_size == 5


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*optim\.lr"):
        build_config(SFTConfig, overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(SFTConfig, overrides=["bach_size=2"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*learning_rate"):
        build_config(SFTConfig, f)


def test_bad_value_type_is_explained():
    with pytest.raises(ConfigError, match="optim.batch_size: expected an integer"):
        build_config(SFTConfig, overrides=["optim.batch_size=many"])
    with pytest.raises(ConfigError, match="expected true or false"):
        build_config(SFTConfig, overrides=["run.resume=maybe"])


def test_help_lists_every_field_with_doc(capsys):
    text = help_text(RMConfig)
    assert "optim.lr=0.0001" in text and "Peak learning rate" in text
    assert "use_margin=True" in text
    with pytest.raises(SystemExit):
        main(["rm", "--help"])
    out = capsys.readouterr().out
    assert "center_rewards" in out and "margin" in out


def test_cli_rejects_misspelt_key(capsys):
    assert main(["sft", "optim.lrr=1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cli_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("sft", "rm", "eval-rm", "score", "demo"):
        assert name in out and name in COMMANDS


def test_field_docs_read_from_source():
    from alignkit.config import OptimConfig

    assert field_docs(OptimConfig)["grad_accum"].startswith("Micro-batches accumulated")


def test_saved_config_loads_back(tmp_path):
    from alignkit.config import save_config

    cfg = build_config(SFTConfig, overrides=["optim.lr=0.002", "data.margin_labels={better: 2.5}", "run.seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = build_config(SFTConfig, tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize("command, key", [("grpo", "run.padding_free"), ("ppo", "data.eval_fraction"),
                                          ("rloo", "data.eval_size"), ("rs", "data.eval_path")])
def test_a_command_only_has_options_it_reads(command, key, capsys):
    from alignkit.cli import main

    assert main([command, f"{key}=1"]) == 2
    assert f"'{key}' is not an option of this command" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"  {key}=" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "  run.padding_free=" in capsys.readouterr().out  # the offline commands still have it
