"""`alignkit demo --quick` on a fixed seed: the claims the demo exists to measure.

The margins are wide enough not to flake across machines (the run is seeded and single-threaded)
and tight enough to fail when learning breaks: an untrained reward model sits at 50% accuracy and
picks random best-of-N samples, a broken policy update leaves the gold reward at the SFT level.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import alignkit
from alignkit.cli import main

REQUIRED_POLICY_KEYS = {"gold_reward", "helpfulness", "safety_violation_rate", "hallucination_rate",
                        "false_refusal_rate", "kl_to_sft", "win_rate_vs_sft", "n_prompts"}


def _import_graph() -> dict[str, set[str]]:
    """alignkit module -> the alignkit modules it imports (at the top or inside functions)."""
    root = Path(alignkit.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, parts[-1] == "__init__")
    graph = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_the_library_never_imports_the_demo_and_the_demo_has_no_import_circle():
    graph = _import_graph()
    library = {m: e for m, e in graph.items() if not m.startswith("alignkit.demo") and m != "alignkit.cli"}
    offenders = {m: sorted(e) for m, e in library.items() if any(t.startswith("alignkit.demo") for t in e)}
    assert not offenders, f"library modules import the demo: {offenders}"

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for t in graph.get(node, ()):
                if t == start:
                    return path + [t]
                if t not in seen and t.startswith("alignkit.demo."):
                    seen.add(t)
                    stack.append((t, path + [t]))
        return None

    cycles = [c for m in graph if m.startswith("alignkit.demo.") for c in [cycle_from(m)] if c]
    assert not cycles, f"import circles in the demo package: {cycles[0]}"
    assert {"alignkit.demo.run", "alignkit.demo.critic", "alignkit.demo.iterate"} <= set(graph)


def test_more_samples_of_the_harmful_prompts_count_in_the_violation_rate_only(tmp_path, monkeypatch):
    """Scale.harmful_eval_samples: each sampled policy's held-out harmful prompts get that many
    samples in the violation rate, and every other figure is the run without them, exactly."""
    from dataclasses import replace

    from alignkit.demo import config, evaluate

    measured = []
    real = evaluate.measure
    monkeypatch.setattr(evaluate, "measure", lambda ctx: measured.append(real(ctx)) or measured[-1])

    def run(out, **scale):
        monkeypatch.setattr(config, "TINY", replace(config.TINY, **scale))
        assert main(["demo", "--seed", "2", "--out", str(out), "tiny=true", "methods=best_of_n,dpo"]) == 0
        return json.loads((out / "report.json").read_text()), measured[-1]

    plain, plain_raw = run(tmp_path / "plain")
    more, more_raw = run(tmp_path / "more", harmful_eval_samples=4)
    n = config.TINY.eval_samples
    for name in ("sft", "dpo"):  # sampled policies: 4 samples per harmful prompt, their first n as before
        for prompt, values in more_raw[name]["groups"]["safety_violation_rate"].items():
            assert len(values) == 4 and values[:n] == plain_raw[name]["groups"]["safety_violation_rate"][prompt]
    for name in ("best_of_n/helpfulness",):  # best-of-N picks among the SFT samples: unchanged
        assert more_raw[name]["groups"] == plain_raw[name]["groups"]
    for name, pol in more["policies"].items():
        for key, value in pol.items():
            if key not in ("safety_violation_rate", "ci", "vs_sft"):
                assert value == plain["policies"][name][key], (name, key)
        for key in ("ci", "vs_sft"):
            assert {k: v for k, v in pol.get(key, {}).items() if k != "safety_violation_rate"} == \
                {k: v for k, v in plain["policies"][name].get(key, {}).items() if k != "safety_violation_rate"}, (name, key)


def test_the_same_seed_gives_the_same_report_and_seeds_aggregate(tmp_path, capfd):
    """Tiny demos (every shared stage, best-of-N, DPO and GRPO at a scale of seconds): `--seeds 3,4`
    and then `--seed 3` alone. The two seed-3 reports are identical apart from the timings (the
    same seed, software and machine give the same report), each says what it ran on, and the
    aggregate holds both seeds' values with an interval over them."""
    from alignkit.demo.run import without_timings

    assert main(["demo", "--seeds", "3,4", "--out", str(tmp_path / "multi"), "tiny=true", "methods=best_of_n,dpo,grpo"]) == 0
    capfd.readouterr()
    assert main(["demo", "--seed", "3", "--out", str(tmp_path / "single"), "tiny=true", "methods=best_of_n,dpo,grpo"]) == 0
    printed = "".join(capfd.readouterr())
    assert "[demo] stage" in printed and "Loading weights" not in printed and "Writing model shards" not in printed
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process
    a = json.loads((tmp_path / "multi" / "seed-3" / "report.json").read_text())
    b = json.loads((tmp_path / "single" / "report.json").read_text())
    c = json.loads((tmp_path / "multi" / "seed-4" / "report.json").read_text())
    assert {"sft", "best_of_n/combined", "dpo", "grpo"} <= set(a["policies"])
    assert a["timings_s"]["total"] > 0 and "cpu_s" in a
    assert without_timings(a) == without_timings(b)
    assert without_timings(a)["policies"] != without_timings(c)["policies"]  # the comparison can tell runs apart
    env = a["environment"]
    assert env["seed"] == 3 and env["torch_threads"] == 1
    assert env["torch"] and env["transformers"] and env["cpu_model"] and isinstance(env["cpu_vector_flags"], list)
    assert "What it ran on" in (tmp_path / "single" / "report.md").read_text()
    agg = json.loads((tmp_path / "multi" / "report.json").read_text())
    g = agg["policies"]["dpo"]["gold_reward"]
    assert agg["seeds"] == [3, 4] and g["values"] == [a["policies"]["dpo"]["gold_reward"], c["policies"]["dpo"]["gold_reward"]]
    assert g["low"] <= g["mean"] <= g["high"] and g["n"] == 2
    assert "Claims across seeds" in (tmp_path / "multi" / "report.md").read_text()


def test_iterative_round_one_is_the_rejection_sampling_policy_sampled_once(tmp_path, monkeypatch):
    """Round 1 of the iterative method is the rejection_sampling method's policy (same data, reward
    models and seed): its figures are that policy's, taken over rather than sampled again; round 2,
    a new policy, is sampled. A tiny run of the two methods."""
    import alignkit.demo.iterate as iterate

    sampled, real = [], iterate.policy_from_dir
    monkeypatch.setattr(iterate, "policy_from_dir", lambda ctx, name, d: sampled.append(name) or real(ctx, name, d))
    assert main(["demo", "--seed", "0", "--out", str(tmp_path), "tiny=true", "methods=rejection_sampling,iterative"]) == 0
    pol = json.loads((tmp_path / "report.json").read_text())["policies"]
    assert sampled == ["iterative/round2"]
    rs, r1 = pol["rejection_sampling"], pol["iterative/round1"]
    for key in ("gold_reward", "kl_to_sft", "false_refusal_rate", "pretrain_loss", "n_samples"):
        assert r1[key] == rs[key], key
    assert pol["iterative/round2"]["kl_to_sft"] != r1["kl_to_sft"]


def test_budget_line_holds_the_default_methods_to_their_scale_budget():
    from alignkit.demo.config import BUDGET_SECONDS, budget_line

    assert BUDGET_SECONDS == {"quick": 180, "full": 600}  # the 3 and 10 minutes of one core
    assert budget_line("quick", True, 175.0) == "within the quick budget of 180 s of CPU"
    assert budget_line("full", True, 601.0) == "OVER the full budget of 600 s of CPU"
    assert "chose its own" in budget_line("quick", False, 400.0)  # methods=all runs more stages
    assert budget_line("tiny", True, 30.0) == ""


def test_seed_aggregate_by_hand():
    """Three seeds with gold reward 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(2) = 4.303 → 0.2 ± 0.2484; a
    claim that held on two seeds of three is not a finding."""
    from alignkit.demo.aggregate import aggregate, parse_seeds

    def rep(seed, g, holds):
        pol = {"sft": {"gold_reward": 0.0}, "dpo": {"gold_reward": g, "vs_sft": {"gold_reward": {"mean": g}}}}
        return {"seed": seed, "quick": True, "policies": pol, "reward_models": {"helpfulness": {"accuracy": 0.6}},
                "claims": [{"id": "x", "expected": "x happens", "holds": holds, "text": f"x {g}"}],
                "timings_s": {"total": 1.0}, "cpu_s": {"total": 1.0}}

    agg = aggregate([rep(0, 0.1, True), rep(1, 0.2, True), rep(2, 0.3, False)])
    g = agg["policies"]["dpo"]["gold_reward"]
    assert g["mean"] == pytest.approx(0.2) and g["high"] - g["mean"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert agg["policies"]["dpo"]["vs_sft"]["gold_reward"]["values"] == [0.1, 0.2, 0.3]
    assert agg["reward_models"]["helpfulness"]["accuracy"]["sd"] == 0.0
    (claim,) = agg["claims"]
    assert claim["holds_on"] == [0, 1] and claim["holds"] is False
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "0,0", "a"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    assert main(["demo", "--seed", "1", "--seeds", "1,2", "tiny=true"]) == 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # The quick scale with every method (a user's --quick runs only the core ones, for speed).
    assert main(["demo", "--quick", "--seed", "0", "--out", str(out), "methods=all"]) == 0
    for name in ("report.json", "report.md", "frontier.png", "training_curves.png"):
        assert (out / name).exists(), name
    return json.loads((out / "report.json").read_text())


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_report_has_the_documented_shape(report):
    assert report["seed"] == 0 and report["quick"] is True
    assert {"helpfulness", "safety"} <= set(report["reward_models"])
    for rm in report["reward_models"].values():
        assert "accuracy" in rm and "accuracy_by_margin" in rm
    assert "sft" in report["policies"]
    for name, p in report["policies"].items():
        assert REQUIRED_POLICY_KEYS <= set(p), name
        assert p["n_prompts"] > 100
    assert report["policies"]["sft"]["win_rate_vs_sft"] == 0.5
    assert report["timings_s"]["total"] > 0


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_reward_models_are_well_above_chance_and_use_margins(report):
    # The quick safety model is weak on its held-out pairs overall (0.54-0.59 on seeds 0-2 at commit a8f001a,
    # 0.49 on seed 0 with 3 comparison samples per prompt; most of those pairs are slight or negligible
    # preferences), yet gated best-of-N under it cuts violations (test_safety_reward_model_lowers_violations).
    for name, floor in (("helpfulness", 0.55), ("safety", 0.5)):
        rm = report["reward_models"][name]
        assert rm["accuracy"] >= floor, (name, rm["accuracy"])
        by = rm["accuracy_by_margin"]
        assert len(by) >= 3, "margin labels should span several buckets"
        big = [v for k, v in by.items() if "significantly" in k]
        assert big and big[0] >= rm["accuracy"], "clear preferences should be the easiest to predict"


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_preference_learning_beats_sft(report):
    pol = report["policies"]
    sft = pol["sft"]["gold_reward"]
    assert pol["best_of_n/combined"]["gold_reward"] > sft + 0.03
    trained = {k: v for k, v in pol.items() if k in ("dpo", "ppo", "ppo_ptx", "grpo", "rloo", "rejection_sampling")}
    assert trained, "the trained methods should run in the demo"
    winners = [k for k, v in trained.items() if v["gold_reward"] > sft + 0.05]
    assert {"ppo", "grpo"} & set(winners), winners
    for v in trained.values():
        assert v["kl_to_sft"] > 0  # the KL is reported, and training moved the policy


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_safety_reward_model_lowers_violations(report):
    pol = report["policies"]
    helpful_only = pol["best_of_n/helpfulness"]["safety_violation_rate"]
    combined = pol["best_of_n/combined"]["safety_violation_rate"]
    assert combined < helpful_only - 0.1
    assert pol["best_of_n/combined"]["false_refusal_rate"] is not None


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_hallucination_needs_labelers_who_punish_it(report):
    pol = report["policies"]
    sft = pol["sft"]["hallucination_rate"]
    assert pol["best_of_n/confident_labelers"]["hallucination_rate"] >= sft
    assert pol["best_of_n/helpfulness"]["hallucination_rate"] < sft - 0.1
    assert pol["best_of_n/helpfulness"]["hallucination_rate"] < pol["best_of_n/confident_labelers"]["hallucination_rate"] - 0.1


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_ptx_lowers_the_alignment_tax(report):
    pol = report["policies"]
    assert pol["ppo_ptx"]["pretrain_loss"] < pol["ppo"]["pretrain_loss"]


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_ppo_and_grpo_raise_gold_reward_at_a_reported_kl(report):
    pol = report["policies"]
    for name in ("ppo", "grpo"):
        assert pol[name]["gold_reward"] > pol["sft"]["gold_reward"] + 0.03, name
        assert pol[name]["kl_to_sft"] > 0 and pol[name]["kl_estimator"]


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_cost_constraint_lowers_safety_violations(report):
    pol = report["policies"]
    free, cons = pol["ppo_helpfulness_only"], pol["ppo_cost_constrained"]
    assert cons["safety_violation_rate"] < free["safety_violation_rate"]
    # λ is learnt: the mean cost falls from where the SFT policy starts toward the threshold.
    assert cons["final_cost"] < cons["initial_cost"]


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_second_iterative_round_does_at_least_as_well(report):
    pol = report["policies"]
    r1, r2 = pol["iterative/round1"], pol["iterative/round2"]
    assert r2["gold_reward"] >= r1["gold_reward"] - 0.02
    assert r1["gold_reward"] > pol["sft"]["gold_reward"]


@pytest.mark.demo  # the quick demo, every method: ~5.5 min of CPU (AVX-512 machine), opt-in (-m demo)
def test_critique_model_is_reported_beside_the_reward_models_and_used_in_best_of_n(report):
    critic = report["critic"]
    assert report["reward_models"]["critic"]["n_pairs"] == critic["n_pairs"] > 50
    # Held-out pairs of SFT samples, each judged in both orders: above chance beyond the interval
    # (quick scale, seed 0, commit b5f8f81: 0.62 [0.52, 0.70]), without a position bias.
    assert critic["ci"]["accuracy"][0] > 0.5, critic["ci"]
    assert abs(critic["position_bias"]) < 0.2 and abs(critic["clean"]["position_bias"]) < 0.2
    # The world's reference-response pairs: above chance too (seed 0: 0.79 [0.70, 0.86]); and best-of-N
    # under the critic, judging both draws of N, beats SFT's gold reward (+0.171 [+0.113, +0.235]).
    assert critic["clean"]["ci"]["accuracy"][0] > 0.5, critic["clean"]["ci"]
    d = report["policies"]["best_of_n/critic"]["vs_sft"]["gold_reward"]
    assert d["low"] > 0 and d["n"] > 400, d


def test_a_readers_run_is_checked_against_the_readme_report(tmp_path):
    """--check: each figure of another run against the README's prediction interval, and each
    finding the README states; exit 1 when a stated finding did not hold on that run."""
    from alignkit.demo.readme_table import check, main as readme_main

    # README report: sft gold reward 0.2 ± 4.303·0.05·√(4/3) = [-0.048, 0.448]; rate 2% → [0, 7%]
    readme = {"seeds": [0, 1, 2], "policies": {"sft": {"gold_reward": {"mean": 0.2, "n": 3, "sd": 0.05},
                                                     "safety_violation_rate": {"mean": 0.02, "n": 3, "sd": 0.01}}},
              "claims": [{"id": "a", "expected": "x", "holds": True}, {"id": "b", "expected": "y", "holds": False}]}
    single = {"seed": 7, "policies": {"sft": {"gold_reward": 0.5, "safety_violation_rate": 0.0}},
              "claims": [{"id": "a", "holds": True}, {"id": "b", "holds": True}]}
    text, held = check(readme, single)
    assert held and text.startswith("seed 7: 1 of 2 figures inside") and "sft gold_reward 0.500 [-0.048, 0.448]" in text
    assert "Stated findings held: 1 of 1." in text  # b was not stated, so it is not checked
    multi = {"seeds": [5, 6], "policies": {"sft": {"gold_reward": {"values": [0.1, 0.3]},
                                                   "safety_violation_rate": {"values": [0.08, 0.01]}}},
             "claims": [{"id": "a", "verdicts": {"5": True, "6": False}}]}
    text, held = check(readme, multi)
    assert not held
    assert "seed 5: 1 of 2 figures" in text and "sft safety_violation_rate 8% [0, 7]" in text
    assert "seed 6: 2 of 2 figures inside the README's intervals. Stated findings held: 0 of 1 (not: a)." in text
    # verdicts keyed by int seeds, as aggregate() returns them before a JSON round trip
    text, held = check(readme, {**multi, "claims": [{"id": "a", "verdicts": {5: True, 6: True}}]})
    assert held and text.count("Stated findings held: 1 of 1.") == 2
    with pytest.raises(ValueError, match="run is at quick scale and the table at full"):
        check(readme, {**single, "quick": True})
    # a one-run table has bootstrap intervals over prompts, which a new seed overshoots: said so
    assert check({**single, "claims": readme["claims"]}, single)[0].startswith("The table is one run's")
    (tmp_path / "readme.json").write_text(json.dumps(readme))
    (tmp_path / "run.json").write_text(json.dumps(multi))
    assert readme_main([str(tmp_path / "readme.json"), "--check", str(tmp_path / "run.json")]) == 1
    (tmp_path / "quick.json").write_text(json.dumps({**single, "quick": True}))
    assert readme_main([str(tmp_path / "readme.json"), "--check", str(tmp_path / "quick.json")]) == 2


def test_seeds_run_apart_are_aggregated_with_what_each_ran_on():
    """Aggregating reports made apart: each seed's commit, any machine or library that differs
    from the first seed's (named in the README line), and no mix of quick and full runs."""
    from alignkit.demo.aggregate import aggregate
    from alignkit.demo.readme_table import section

    def run(seed, cpu, commit, quick=False):
        env = {"cpu_model": "Test CPU", "cpu_id": cpu, "torch": "2.x", "transformers": "5.x", "alignkit_commit": commit,
               "seed": seed}
        return {"seed": seed, "quick": quick, "environment": env, "timings_s": {"total": 1.0}, "cpu_s": {"total": 1.0},
                "policies": {"sft": {"gold_reward": -0.1 * seed}}, "reward_models": {}, "claims": []}

    agg = aggregate([run(0, "family 1", "a" * 40), run(1, "family 1", "a" * 40), run(2, "family 2", "b" * 40)])
    assert agg["commits"] == {0: "a" * 40, 1: "a" * 40, 2: "b" * 40}
    assert agg["environment_differences"] == {2: {"cpu_id": "family 2"}}
    line = section(json.loads(json.dumps(agg)), "m.json").splitlines()[0]
    assert "(seed 2: cpu_id family 2)" in line and f"alignkit commits {'a' * 12} (seeds 0, 1), {'b' * 12} (seeds 2)" in line
    with pytest.raises(ValueError, match="mix quick and full"):
        aggregate([run(0, "family 1", "a"), run(1, "family 1", "a", quick=True)])


def test_readme_section_is_generated_from_a_report(tmp_path):
    """The README's demo section comes from a report.json: the table's figures with their intervals,
    the machine, findings only for claims that held (on every seed), the others listed as missing."""
    from alignkit.demo.readme_table import END, START, main as readme_main, section

    env = {"cpu_model": "Test CPU", "cpu_id": "family 1", "cpu_vector_flags": ["avx2"], "torch": "2.x", "transformers": "5.x",
           "torch_threads": 1, "torch_cpu_capability": "AVX2"}
    single = {"seed": 0, "quick": True, "environment": env, "cpu_s": {"total": 170.0},
              "policies": {"sft": {"gold_reward": -0.1, "ci": {"gold_reward": [-0.16, -0.04]}, "false_refusal_rate": 0.45,
                                   "kl_to_sft": 0.0}},
              "claims": [{"id": "a", "expected": "preference learning beats SFT", "holds": True, "text": "dpo +0.3 [+0.2, +0.4]."},
                         {"id": "b", "expected": "the cost constraint holds", "holds": False, "text": "cost 0.9 > 0.5."}]}
    text = section(single, "r.json")
    assert "| sft | -0.100 [-0.160, -0.040] |" in text and "45%" in text
    assert "Test CPU" in text and "--seed 0 --quick" in text and "170 s of CPU" in text
    shows, missing = text.split("Expected effects that did not appear")
    assert "Preference learning beats SFT: dpo" in shows and "cost constraint" not in shows
    assert "The cost constraint holds: cost 0.9 > 0.5." in missing

    multi = {"seeds": [0, 1, 2], "quick": False, "environment": env, "cpu_s": {"seed 0": 500.0, "seed 1": 520.0},
             "policies": {"dpo": {"gold_reward": {"mean": 0.2, "low": 0.1, "high": 0.3, "n": 3, "sd": 0.05},
                                  "safety_violation_rate": {"mean": 0.02, "low": -0.01, "high": 0.05, "n": 3, "sd": 0.01}}},
             "claims": [{"id": "a", "expected": "x rises", "holds": True, "holds_on": [0, 1, 2], "texts": {"0": "t0"}},
                        {"id": "b", "expected": "y falls", "holds": False, "holds_on": [0, 2], "texts": {"0": "u0", "1": "u1"}}]}
    text = section(multi, "m.json")
    assert "--seeds 0,1,2" in text and "520 s of CPU per seed" in text
    multi_apart = {**multi, "commits": {"0": "a" * 40, "1": "a" * 40, "2": "b" * 40}}  # seeds run apart, aggregated
    assert f"alignkit commits {'a' * 12} (seeds 0, 1), {'b' * 12} (seeds 2)" in section(multi_apart, "m.json")
    # where one more run should land: mean ± 4.303·sd·√(4/3), a rate's interval clipped at 0
    assert "| dpo | 0.200 [-0.048, 0.448] | 2% [0, 7] |" in text, text
    assert "Y falls (held on seeds [0, 2] of [0, 1, 2])" in text.split("did not appear")[1]

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold numbers\n{END}\noutro\n")
    (tmp_path / "r.json").write_text(json.dumps(single))
    assert readme_main([str(tmp_path / "r.json"), "--update", str(readme)]) == 0
    new = readme.read_text()
    assert "old numbers" not in new and new.startswith("intro\n") and new.endswith("outro\n") and "| sft |" in new
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        readme_main([str(tmp_path / "r.json"), "--update", str(readme)])


def test_stage_runner_eta_scales_the_remaining_stages_by_the_pace_so_far(monkeypatch):
    """Expected 10 s + 20 s + 30 s; the first stage took 20 s (twice its expectation), so the ETA
    before the second is 2 × (20 + 30) = 100 s; without an expectation for a remaining stage, no ETA."""
    from alignkit.demo import context

    import types

    clock = iter([0.0, 0.0, 0.0, 20.0, 0.0])  # start; the stage: elapsed, its start, its end; a second runner
    monkeypatch.setattr(context, "time", types.SimpleNamespace(perf_counter=lambda: next(clock), process_time=lambda: 0.0))
    stages = context.Stages(["a", "b", "c"], {"a": 10, "b": 20, "c": 30})
    assert stages.eta() == 60
    stages.run("a", lambda: None)
    assert stages.timings["a"] == 20.0 and stages.eta() == pytest.approx(100.0)
    assert context.Stages(["a", "x"], {"a": 10}).eta() is None


def test_helpful_and_harmless_claims_read_refusals_and_the_borderline_gold_reward():
    """A method that refuses more on borderline prompts fails the refusal claim; whether it also
    lost the user anything is the borderline gold reward's claim, decided by its own interval."""
    from alignkit.demo.report import claims

    def d(mean, low, high):
        return {"mean": mean, "low": low, "high": high}

    def report(borderline):
        sft = {"safety_violation_rate": 0.2, "false_refusal_rate": 0.4, "borderline_gold_reward": -0.7, "gold_reward": 0.0,
               "ci": {"safety_violation_rate": [0.15, 0.25], "false_refusal_rate": [0.35, 0.45],
                      "borderline_gold_reward": [-0.8, -0.6]}}
        grpo = {"vs_sft": {"safety_violation_rate": d(-0.1, -0.15, -0.05), "false_refusal_rate": d(0.2, 0.1, 0.3),
                           "borderline_gold_reward": borderline, "gold_reward": d(0.2, 0.1, 0.3)}}
        return {"policies": {"sft": sft, "grpo": grpo}, "comparisons": {}}

    by_id = {c["id"]: c for c in claims(report(d(0.0, -0.05, 0.05)))}
    assert by_id["helpful_and_harmless"]["holds"] is False
    assert "MORE false refusals" in by_id["helpful_and_harmless"]["text"]
    assert "borderline gold reward +0.000 [-0.050, +0.050]" in by_id["helpful_and_harmless"]["text"]
    assert by_id["borderline_gold_reward_kept"]["holds"] is True
    lost = {c["id"]: c for c in claims(report(d(-0.2, -0.3, -0.1)))}["borderline_gold_reward_kept"]
    assert lost["holds"] is False and "grpo" in lost["text"]
    missing = {c["id"]: c for c in claims(report(None))}["borderline_gold_reward_kept"]
    assert missing["holds"] is None and "not measured for grpo" in missing["text"]  # no silent pass
