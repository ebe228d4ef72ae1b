"""The side-by-side benchmark's own guards (benchmarks/bench_vs_trl.py; the benchmark itself needs TRL
and minutes of CPU, so only its cheap parts run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "bench_vs_trl")


def test_model_option_takes_a_hf_directory_and_refuses_anything_else(bench, tiny_dir, tmp_path):
    """--model DIR is used as given when it holds a config.json; a folder without one (a typo, a GGUF
    file's folder) stops with a message naming the option and the two accepted forms, instead of a
    traceback from inside transformers in a child process."""
    assert bench.resolve_model(str(tiny_dir)) == Path(tiny_dir)
    with pytest.raises(SystemExit, match=r"--model .*not a Hugging Face model directory .*'smollm2'"):
        bench.resolve_model(str(tmp_path))


def test_grpo_reward_and_prompts_are_the_same_for_both_trainers(bench):
    """Both trainers score with the one Python reward, and get the first human turn of each HH record."""
    assert bench.grpo_reward("one two three four five six seven eight nine ten eleven twelve") == 0.0
    assert bench.grpo_reward("") == -1.0
    if not bench.HH.exists():
        pytest.skip(f"{bench.HH} is not here")
    import argparse

    prompts = bench.grpo_prompts(argparse.Namespace(grpo_prompts=3))
    assert len(prompts) == 3 and all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
