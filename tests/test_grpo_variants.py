"""benchmarks/grpo_variants.py: rerunning the demo's GRPO stage from a finished run's folder
reproduces that run's GRPO figures (the context is rebuilt faithfully), and its guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.cli import main as cli
from tests.conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_variants.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "grpo_variants")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli(["demo", "--seed", "3", "--out", str(out), "tiny=true", "methods=grpo"]) == 0
    return out


def test_variant_demo_reproduces_the_runs_grpo_and_a_variant_differs(bench, demo_run, tmp_path):
    report = json.loads((demo_run / "report.json").read_text())
    rows = {r["policy"]: r for r in bench.main(["--run", str(demo_run), "--variants", "demo,dr_grpo", "--out", str(tmp_path)])}
    for name, source in (("sft", "sft"), ("grpo-demo", "grpo")):
        for metric in ("gold_reward", "false_refusal_rate", "safety_violation_rate", "kl_to_sft"):
            assert rows[name][metric] == report["policies"][source][metric], (name, metric)
    assert rows["grpo-demo"]["gold_reward_ci"] == report["policies"]["grpo"]["ci"]["gold_reward"]
    assert rows["grpo-dr_grpo"]["kl_to_sft"] != rows["grpo-demo"]["kl_to_sft"]  # the override took effect
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(list(rows.values())))
    assert not (demo_run / "grpo-demo").exists()  # the source run's folder is only read


def test_nested_overrides_start_from_the_demos_sections(bench, demo_run, tmp_path, monkeypatch):
    """'reward.unfinished_penalty' changes that field alone: the demo's whitening stays on; 'kl.kl_coef'
    keeps GRPO's k3 loss-term KL; 'rollout.samples_per_prompt' keeps the demo's rollout count and
    prompts; a training seed replaces the run seed; advantage picks the estimator."""
    from alignkit.demo import methods

    seen = {}
    monkeypatch.setattr(methods, "_critic_free", lambda ctx, name, advantage, **kw: seen.update(name=name, advantage=advantage, **kw))
    ctx = bench.rebuild_context(demo_run, tmp_path, 3, "tiny")
    name = bench.run_variant(ctx, "x", {"reward.unfinished_penalty": 0.0, "kl.kl_coef": 0.2, "advantage": "rloo",
                                          "rollout.samples_per_prompt": 8}, train_seed=7)
    assert name == seen["name"] == "grpo-x-t7" and seen["advantage"] == "rloo"
    assert seen["reward"].unfinished_penalty == 0.0 and seen["reward"].whiten is True
    assert seen["kl"].kl_coef == 0.2 and seen["kl"].kl_estimator == "k3" and seen["kl"].kl_penalty == "loss"
    assert (seen["rollout"].samples_per_prompt, seen["rollout"].prompts_per_rollout) == (8, 16)
    assert seen["rollout"].num_rollouts == ctx.scale.rl_rollouts
    assert seen["run"].seed == 7 and seen["run"].output_dir == str(tmp_path / "grpo-x-t7")


def test_guards(bench, demo_run, tmp_path):
    with pytest.raises(SystemExit, match="--out must differ from --run"):
        bench.main(["--run", str(demo_run), "--out", str(demo_run)])
    with pytest.raises(SystemExit, match="unknown or no variants \\['nope'\\]"):
        bench.main(["--run", str(demo_run), "--variants", "nope", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="has no report.json"):
        bench.main(["--run", str(tmp_path), "--out", str(tmp_path / "b")])
    with pytest.raises(FileNotFoundError, match="has no model"):
        bench.rebuild_context(tmp_path, tmp_path / "c", 3, "tiny")
    with pytest.raises(ValueError, match="scale must be tiny, quick or full"):
        bench.rebuild_context(demo_run, tmp_path / "d", 3, "huge")
