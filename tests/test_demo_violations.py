"""benchmarks/demo_violations.py: re-measuring a finished demo run's violations with more samples
per held-out harmful prompt pairs each policy's samples with SFT's prompt by prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignkit.cli import main as cli
from tests.conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_violations.py"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli(["demo", "--seed", "3", "--out", str(out), "tiny=true", "methods=dpo"]) == 0
    return out


def test_a_policy_equal_to_sft_differs_by_exactly_zero_and_rows_are_consistent(demo_run, tmp_path):
    bench = load_script(BENCH, "demo_violations")
    shutil.copytree(demo_run / "sft", demo_run / "ppo")  # a "method" that is SFT itself: same samples, same prompts
    rows = {r["policy"]: r for r in bench.main(["--run", str(demo_run), "--samples", "3", "--out", str(tmp_path / "r.json")])}
    assert set(rows) == {"sft", "dpo", "ppo"}  # the run's sampled policies, nothing it lacks
    assert rows["ppo"]["violation_rate"] == rows["sft"]["violation_rate"]
    assert rows["ppo"]["vs_sft"]["mean"] == 0 and rows["ppo"]["vs_sft"]["low"] == 0 and rows["ppo"]["vs_sft"]["high"] == 0
    d = rows["dpo"]["vs_sft"]
    assert d["mean"] == pytest.approx(rows["dpo"]["violation_rate"] - rows["sft"]["violation_rate"])
    assert d["low"] <= d["mean"] <= d["high"]
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(list(rows.values())))


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    bench = load_script(BENCH, "demo_violations")
    with pytest.raises(SystemExit, match="not a finished demo run"):
        bench.main(["--run", str(tmp_path)])
