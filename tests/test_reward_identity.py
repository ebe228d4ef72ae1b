"""Reward-model identity: `alignkit rm` marks what it saves, and every command that scores with a
reward or cost model refuses a directory that is not one, saying what it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.config import ModelConfig
from alignkit.models.errors import ModelLoadError
from alignkit.models.loading import load_reward_model, load_scalar_head_model, load_tokenizer, save_model
from alignkit.rollout.rewards import RewardModel
from tests.conftest import write_jsonl

PROMPT = [{"role": "user", "content": "What colour is item 3?"}]


@pytest.fixture(scope="module")
def alignkit_rm(tiny_dir, tmp_path_factory) -> Path:
    """A reward model saved by `alignkit rm` (one step: only its directory matters here)."""
    from alignkit.cli import main

    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "pairs.jsonl", [{"prompt": f"Item {i}?", "chosen": "red", "rejected": "blue"} for i in range(4)])
    assert main(["rm", f"model.path={tiny_dir}", f"data.path={data}", "optim.batch_size=2", "optim.max_steps=1",
                 f"run.output_dir={tmp / 'rm'}", "run.progress=false", "run.report_to=jsonl"]) == 0
    return tmp / "rm"


@pytest.fixture(scope="module")
def three_label_classifier(tiny_dir, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_dir, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    out = tmp_path_factory.mktemp("cls") / "cls"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    load_tokenizer(str(tiny_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def headless_classifier(tiny_dir, tmp_path_factory) -> Path:
    """A one-output classifier whose checkpoint lost its head weights."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("headless") / "m"
    save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), out)
    weights = load_file(out / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_alignkit_rm_marks_its_output_and_it_scores(alignkit_rm):
    config = json.loads((alignkit_rm / "config.json").read_text())
    assert config["alignkit"] == {"kind": "reward_model", "head": "trained", "objective": "pairwise"}
    assert RewardModel(str(alignkit_rm))([PROMPT], ["Red."]).shape == (1,)


def test_a_causal_lm_is_refused_as_a_reward_model(tiny_dir):
    with pytest.raises(ModelLoadError, match=r"was given as the reward model 'rm', but it is a causal language model "
                                             r"\(LlamaForCausalLM\).*alignkit rm model.path="):
        RewardModel(str(tiny_dir), name="rm")


def test_a_classifier_with_three_labels_is_refused(three_label_classifier):
    with pytest.raises(ModelLoadError, match=r"a classifier with 3 labels \(LlamaForSequenceClassification: neg, neu, pos\)"):
        load_reward_model(ModelConfig(path=str(three_label_classifier)))


def test_a_checkpoint_without_head_weights_is_refused(headless_classifier):
    """transformers would attach a random head ("score.weight MISSING") and score noise."""
    with pytest.raises(ModelLoadError, match="checkpoint has no weights for score.weight: they would be initialised at random"):
        RewardModel(str(headless_classifier))


def test_a_one_output_classifier_from_elsewhere_is_accepted(tiny_dir, tmp_path):
    """Reward models not trained by alignkit (a hub RM: *ForSequenceClassification, one label, head
    in the checkpoint) score as they are."""
    out = save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), tmp_path / "rm")
    assert "alignkit" not in json.loads((out / "config.json").read_text())
    assert torch.isfinite(RewardModel(str(out))([PROMPT], ["Red."])).all()


def test_a_fresh_head_loads_without_transformers_missing_weights_table(tiny_dir, three_label_classifier):
    import logging

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, handler = logging.getLogger("transformers.modeling_utils"), Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        load_scalar_head_model(ModelConfig(path=str(tiny_dir)))  # RM training / PPO's critic from an SFT model
        assert not any("LOAD REPORT" in m or "MISSING" in m for m in seen), seen
        # elsewhere the table still shows (the filter is only around alignkit's own scalar-head loads)
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
        assert any("LOAD REPORT" in m for m in seen)
    finally:
        logger.removeHandler(handler)


def test_a_policy_trained_from_a_reward_model_directory_is_not_marked(alignkit_rm, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(alignkit_rm)  # inherits config.alignkit
    assert getattr(policy.config, "alignkit", None)
    out = save_model(policy, None, tmp_path / "policy")
    assert "alignkit" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("option", ["reward_models=[{rm}]", "safety_model={rm}", "cost_model={rm}"])
def test_ppo_refuses_a_causal_lm_as_reward_safety_or_cost_model(option, alignkit_rm, tiny_dir, tmp_path, capsys):
    from alignkit.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Item {i}?", "chosen": "red", "rejected": "blue"} for i in range(4)])
    args = ["ppo", f"model.path={tiny_dir}", f"data.path={data}", "num_rollouts=1", "prompts_per_rollout=2",
            "optim.batch_size=2", "max_new_tokens=4", f"run.output_dir={tmp_path / 'out'}", "run.progress=false"]
    if not option.startswith("reward_models"):
        args.append(f"reward_models=[{alignkit_rm}]")
    assert main(args + [option.format(rm=tiny_dir)]) == 1
    assert "but it is a causal language model (LlamaForCausalLM)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["grpo", "rloo", "rs"])
def test_online_commands_refuse_a_causal_lm_as_reward_model(command, tiny_dir, tmp_path, capsys):
    from alignkit.cli import main

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Item {i}?", "completion": "red"} for i in range(4)])
    assert main([command, f"model.path={tiny_dir}", f"data.path={data}", f"reward_models=[{tiny_dir}]",
                 f"run.output_dir={tmp_path / 'out'}", "run.progress=false"]) == 1
    assert "causal language model" in capsys.readouterr().err


def test_eval_rm_and_score_refuse_a_causal_lm(tiny_dir, tmp_path, capsys):
    from alignkit.cli import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Item 1?", "chosen": "red", "rejected": "blue"}])
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Item 1?", "response": "red", "score": 1}])
    assert main(["eval-rm", f"model.path={tiny_dir}", f"data.path={pairs}"]) == 1
    assert main(["score", f"model.path={tiny_dir}", f"data.path={rows}", f"output={tmp_path / 's.jsonl'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("but it is a causal language model") == 2
