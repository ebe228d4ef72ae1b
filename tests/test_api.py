"""The Python API: every method trained from in-memory data and an in-memory model gives the same
weights as the command line on the same data saved to disk; in-memory rows are validated like file
rows; keyword overrides are checked like key=value; rewards as batched Python callables."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import alignkit
from alignkit.cli import main
from tests.conftest import write_jsonl

BASE = ["run.progress=false", "run.report_to=jsonl", "optim.batch_size=2", "data.max_length=48", "data.max_prompt_length=24"]
COMMON = [*BASE, "optim.max_steps=2"]
QS = [f"What colour is item {i}?" for i in range(6)]
SFT_ROWS = [{"prompt": q, "completion": f"Item {i} is {'red' if i % 2 else 'blue'}."} for i, q in enumerate(QS)]
PAIR_ROWS = [{"prompt": q, "chosen": f"Item {i} is red.", "rejected": "No idea."} for i, q in enumerate(QS)]
UNPAIRED_ROWS = [{"prompt": q, "completion": f"Item {i} is red." if i % 2 else "No.", "label": bool(i % 2)}
                 for i, q in enumerate(QS)]
PROMPT_ROWS = [{"prompt": q} for q in QS]
CRITIC_ROWS = [{"prompt": q, "response_a": "It is red.", "response_b": "No.", "critique": "A answers; B refuses.",
                "verdict": "A"} for q in QS]
ONLINE = ["sampling.max_new_tokens=6", "rollout.prompts_per_rollout=2", "rollout.samples_per_prompt=2",
          "rollout.num_rollouts=2", "rollout.ppo_epochs=1", "reward.unfinished_penalty=0"]

#: method -> (rows, CLI options, API keyword overrides)
METHODS = {
    "sft": (SFT_ROWS, [], {}),
    "rm": (PAIR_ROWS, [], {}),
    "dpo": (PAIR_ROWS, [], {}),
    "kto": (UNPAIRED_ROWS, [], {}),
    "critic": (CRITIC_ROWS, ["eval_verdicts=0"], {"eval_verdicts": 0}),
    "ppo": (PROMPT_ROWS, ONLINE, {}),
    "grpo": (PROMPT_ROWS, ONLINE, {}),
    "rloo": (PROMPT_ROWS, ONLINE, {}),
    "rs": (PROMPT_ROWS, ["sampling.max_new_tokens=6", "num_samples=2", "reward.unfinished_penalty=0"], {}),
}


def _options(args: list[str]) -> dict:
    return dict(a.split("=", 1) for a in args)


def _weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    """A tiny reward model (one CLI step) for the online methods' reward."""
    out = tmp_path_factory.mktemp("rm")
    data = write_jsonl(out / "pairs.jsonl", PAIR_ROWS)
    assert main(["rm", f"model.path={tiny_dir}", f"data.path={data}", f"run.output_dir={out / 'model'}", *COMMON]) == 0
    return out / "model"


@pytest.mark.parametrize("method", list(METHODS))
def test_api_from_memory_equals_cli_from_disk(method, tiny_dir, rm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, extra, kw = METHODS[method]
    if method in ("ppo", "grpo", "rloo", "rs"):
        extra = [*extra, f"reward.reward_models=[{rm_dir}]"]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    common = BASE if method in ("ppo", "grpo", "rloo") else COMMON  # online runs count rollouts
    assert main([method, f"model.path={tiny_dir}", f"data.path={data}", f"run.output_dir={cli_out}", *common, *extra]) == 0

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    options = {**_options(common), **_options(extra), **kw}
    result = getattr(alignkit, method)(model=model, tokenizer=tokenizer, data=[dict(r) for r in rows],
                                       **{"run.output_dir": str(api_out)}, **{k: v for k, v in options.items()})
    assert isinstance(result, alignkit.Result) and result.output_dir == api_out
    cli, api = _weights(cli_out), _weights(api_out)
    assert cli.keys() == api.keys()
    for name in cli:
        torch.testing.assert_close(api[name], cli[name], rtol=0, atol=0, msg=f"{method}: {name} differs")
    # the result holds the trained model and the run's final metrics
    assert result.model is not None and result.tokenizer is not None
    saved = dict(result.model.state_dict())
    some = next(n for n in api if n in saved)
    torch.testing.assert_close(saved[some].detach().cpu().float(), api[some].float())
    assert result.metrics and result.metrics == _last_step(api_out / "metrics.jsonl")
    # both folders explain themselves: model card figures equal metrics.jsonl and the data report
    from tests.test_model_card import check_card

    check_card(cli_out, method)
    card = check_card(api_out, method, result.data_reports)
    assert card["call"].startswith(f"alignkit.{method}(model=<")
    import yaml

    saved_cfg = yaml.safe_load((api_out / "alignkit_config.yaml").read_text())
    assert saved_cfg["data"]["path"] == "memory:data" and saved_cfg["model"]["path"] == "memory:model"


def _last_step(path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    last = max(r["step"] for r in rows)
    out = {}
    for r in rows:
        if r["step"] == last:
            out.update({k: v for k, v in r.items() if k != "step"})
    return out


def test_eval_rm_and_score_from_memory_equal_the_cli(rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS)
    out = tmp_path / "cli.json"
    assert main(["eval-rm", f"model.path={rm_dir}", f"data.path={data}", f"output={out}"]) == 0
    head = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    res = alignkit.eval_rm(model=head, tokenizer=tok, data=PAIR_ROWS)
    assert res.metrics == json.loads(out.read_text())

    rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in PAIR_ROWS]
    assert main(["score", f"model.path={rm_dir}", f"data.path={write_jsonl(tmp_path / 'r.jsonl', rows)}",
                 f"output={tmp_path / 'cli.jsonl'}"]) == 0
    res = alignkit.score(model=head, tokenizer=tok, data=rows, output=str(tmp_path / "api.jsonl"))
    cli = [json.loads(x)["score"] for x in (tmp_path / "cli.jsonl").read_text().splitlines()]
    api = [json.loads(x)["score"] for x in res.output_dir.read_text().splitlines()]
    assert api == cli


def test_in_memory_rows_are_validated_like_file_rows(tiny_dir, tmp_path):
    bad = [dict(r) for r in PAIR_ROWS]
    del bad[3]["rejected"]
    with pytest.raises(ValueError, match=r"memory:data\[3\].*rejected"):
        alignkit.dpo(model=str(tiny_dir), data=bad, output_dir=str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match=r"memory:data\[1\]: expected a dict"):
        alignkit.sft(model=str(tiny_dir), data=[SFT_ROWS[0], "text"], output_dir=str(tmp_path / "y"))
    with pytest.raises(ValueError, match="empty"):
        alignkit.sft(model=str(tiny_dir), data=[], output_dir=str(tmp_path / "z"))


def test_datasets_and_splits_are_read(tiny_dir, tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT_ROWS), "test": datasets.Dataset.from_list(SFT_ROWS[:2])})
    res = alignkit.sft(model=str(tiny_dir), data=dd, eval_split="test", output_dir=str(tmp_path / "o"), progress=False,
                       report_to="jsonl", max_steps=1, batch_size=2)
    sources = [s for s, _ in res.data_reports]
    assert sources == ["memory:data", "memory:data"]  # train split, then the test split as evaluation
    assert res.data_reports[0][1].read == 6 and res.data_reports[1][1].read == 2
    assert "eval/nll" in res.eval_metrics
    with pytest.raises(ValueError, match="no split 'dev'"):
        alignkit.sft(model=str(tiny_dir), data=dd, split="dev", output_dir=str(tmp_path / "p"))


def test_keyword_overrides_are_checked_like_the_command_line(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'lrr'.*'lr'"):
        alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, lrr=1e-3)
    with pytest.raises(ValueError, match="batch_size=0: must be ≥ 1"):
        alignkit.sft(model=str(tiny_dir), data=SFT_ROWS, batch_size=0)
    cfg = alignkit.SFTConfig()
    cfg.run.output_dir = str(tmp_path / "o")
    res = alignkit.sft(cfg, model=str(tiny_dir), data=SFT_ROWS, max_steps=1, progress=False, report_to="jsonl")
    assert cfg.optim.max_steps == 0 and res.config.optim.max_steps == 1  # the given config is not changed
    with pytest.raises(TypeError, match="DPOConfig"):
        alignkit.sft(alignkit.DPOConfig(), data=SFT_ROWS)


def test_a_model_object_needs_its_tokenizer(tiny_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="tokenizer="):
        alignkit.sft(model=AutoModelForCausalLM.from_pretrained(tiny_dir), data=SFT_ROWS)


def test_a_memory_path_outside_its_call_is_refused():
    from alignkit.data import load_dataset_records

    with pytest.raises(ValueError, match="memory:data names an in-memory input"):
        load_dataset_records("memory:data")


def test_given_reference_model_is_used(tiny_dir, tmp_path):
    """A reference model given in Python is the π_ref: a reference that differs from the policy
    makes the first step's DPO loss differ from log 2 (the loss when π_ref = π_θ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    common = dict(tokenizer=tok, data=PAIR_ROWS, max_steps=1, batch_size=6, beta=1.0, progress=False, report_to="jsonl")
    same = alignkit.dpo(model=AutoModelForCausalLM.from_pretrained(tiny_dir), output_dir=str(tmp_path / "a"), **common)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        ref.lm_head.weight.mul_(3.0)
    other = alignkit.dpo(model=AutoModelForCausalLM.from_pretrained(tiny_dir), reference=ref,
                         output_dir=str(tmp_path / "b"), **common)
    assert abs(same.history[0]["loss"] - 0.693147) < 1e-5
    assert abs(other.history[0]["loss"] - 0.693147) > 1e-3
    cfg = alignkit.DPOConfig()
    cfg.reference = "precomputed"  # would never run the given reference: refused
    with pytest.raises(ValueError, match="reference model was given.*precomputed"):
        alignkit.dpo(cfg, model=str(tiny_dir), reference=ref, data=PAIR_ROWS, output_dir=str(tmp_path / "c"))


def test_import_alignkit_is_light():
    code = "import sys, alignkit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        alignkit.nope  # noqa: B018


# ---- rewards as Python callables ---------------------------------------------------------------


def test_batched_reward_callables_are_checked():
    from alignkit.rollout.rewards import BatchFunctionReward, as_reward, check_scores

    prompts, responses = [[{"role": "user", "content": "hi"}]] * 3, ["a", "bb", "ccc"]
    r = as_reward(lambda ps, rs: [len(x) for x in rs])
    assert isinstance(r, BatchFunctionReward) and r(prompts, responses).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"returned \(2,\) scores for 3 responses"):
        as_reward(lambda ps, rs: [1.0, 2.0])(prompts, responses)
    with pytest.raises(ValueError, match=r"1 of 3 scores are not finite, e.g. nan at index 1 \(response 1: 'bb'\)"):
        as_reward(lambda ps, rs: [1.0, float("nan"), 0.0])(prompts, responses)
    with pytest.raises(ValueError, match="one number per response"):
        as_reward(lambda ps, rs: "abc")(prompts, responses)
    with pytest.raises(TypeError, match="RewardSource or a callable"):
        as_reward(3.0)
    # the check applies to every source's scores where the online methods read them
    from alignkit.rollout.rewards import RewardSource
    from alignkit.train.online.rewards import score_responses

    class Short(RewardSource):
        def __call__(self, prompts, responses):
            return torch.zeros(len(responses) - 1)

    with pytest.raises(ValueError, match=r"returned \(2,\) scores for 3 responses"):
        score_responses(Short(), prompts, responses, torch.ones(3, dtype=torch.bool), 0.0)
    assert check_scores(torch.tensor([1.0, 2.0]), 2, "x").tolist() == [1.0, 2.0]


def test_a_reward_callable_adds_to_the_reward_models(rm_dir):
    from alignkit.rollout.rewards import RewardModel
    from alignkit.train.online.rewards import RewardConfig, build_reward

    prompts, responses = [[{"role": "user", "content": q}] for q in QS[:3]], ["It is red.", "No.", "Blue."]
    models = RewardModel(str(rm_dir))(prompts, responses)
    combined = build_reward(RewardConfig(reward_models=[str(rm_dir)], weights=[2.0]), lambda ps, rs: [1.0, 2.0, 3.0])
    torch.testing.assert_close(combined(prompts, responses), 2.0 * models + torch.tensor([1.0, 2.0, 3.0]))
    alone = build_reward(RewardConfig(), lambda ps, rs: [1.0, 2.0, 3.0])
    assert alone(prompts, responses).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="no reward"):
        build_reward(RewardConfig(), None)


def test_wrong_in_memory_objects_are_named(tiny_dir, rm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    head = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    head.config.pad_token_id = None
    with pytest.raises(Exception, match="no pad_token_id"):
        alignkit.eval_rm(model=head, tokenizer=AutoTokenizer.from_pretrained(rm_dir), data=PAIR_ROWS)

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="in-memory data must be a datasets.Dataset"):
        alignkit.sft(model=str(tiny_dir), data=5, output_dir=str(tmp_path / "a"))
    with pytest.raises(Exception, match="expected a causal LM"):
        alignkit.sft(model=object(), tokenizer=tok, data=SFT_ROWS, output_dir=str(tmp_path / "b"))
    with pytest.raises(Exception, match="expected a transformers tokenizer"):
        alignkit.sft(model=str(tiny_dir), tokenizer=object(), data=SFT_ROWS, output_dir=str(tmp_path / "c"))


def test_every_public_name_resolves_and_is_documented():
    import inspect

    for name in alignkit.__all__:
        obj = getattr(alignkit, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert (obj.__doc__ or "").strip(), f"alignkit.{name} has no docstring"
    from alignkit.api import METHODS
    from alignkit.cli import COMMANDS

    assert {c for c, _ in METHODS.values()} <= set(COMMANDS)  # the API runs the commands' own functions
