"""Iterative rounds: data accumulates, reward models see all rounds so far, a killed run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.train.iterate import load_manifest, run_rounds


class Recorder:
    """Fake collect/train/optimise steps that record what they were given."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.seen_lines: dict[int, int] = {}

    def collect(self, policy: Path, r: int):
        return {"helpfulness": [{"round": r, "i": i, "policy": str(policy)} for i in range(3)]}

    def train(self, files, round_dir: Path, r: int):
        self.seen_lines[r] = len(files["helpfulness"].read_text().splitlines())
        if self.fail_at == r:
            raise KeyboardInterrupt("killed")
        round_dir.mkdir(parents=True, exist_ok=True)
        return {"helpfulness": round_dir / "rm"}

    def optimise(self, policy: Path, dirs, out: Path, r: int) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return out


def test_rounds_accumulate_data_and_chain_policies(tmp_path):
    rec = Recorder()
    rounds = run_rounds(tmp_path, tmp_path / "sft", 3, rec.collect, rec.train, rec.optimise)
    assert [r.round for r in rounds] == [1, 2, 3]
    assert rec.seen_lines == {1: 3, 2: 6, 3: 9}  # reward models retrain on all data so far
    rows = [json.loads(line) for line in (tmp_path / "data" / "helpfulness.jsonl").read_text().splitlines()]
    assert rows[0]["policy"] == str(tmp_path / "sft")
    assert rows[3]["policy"] == rounds[0].policy_dir  # round 2 samples the round-1 policy
    assert [r.round for r in load_manifest(tmp_path)] == [1, 2, 3]


def test_killed_round_resumes_without_duplicated_data(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_rounds(tmp_path, tmp_path / "sft", 3, Recorder(fail_at=2).collect, Recorder(fail_at=2).train, Recorder().optimise)
    assert [r.round for r in load_manifest(tmp_path)] == [1]
    rec = Recorder()
    rounds = run_rounds(tmp_path, tmp_path / "sft", 3, rec.collect, rec.train, rec.optimise)
    assert [r.round for r in rounds] == [1, 2, 3]
    assert rec.seen_lines == {2: 6, 3: 9}  # round 2's partial rows were dropped, round 1 not redone
    assert len((tmp_path / "data" / "helpfulness.jsonl").read_text().splitlines()) == 9
