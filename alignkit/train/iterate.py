"""Iterative RLHF rounds (Llama 2's RLHF-V1 … V5, Safe RLHF's rounds).

Each round takes the current policy and

1. **collects** comparisons of its own samples (new labels from annotators),
2. appends them to everything collected so far and **retrains the reward models** on all of it,
3. **optimises** the policy against the new reward models (rejection sampling, PPO or DPO),

so the reward models keep up with the distribution the policy now produces. The three steps are
functions the caller gives; this module owns the bookkeeping: the accumulated data files, one
directory per round, and a manifest ``rounds.json`` written atomically after every round, so a
killed run resumes at the first unfinished round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: collect(policy_dir, round) -> {annotation name: records}
Collect = Callable[[Path, int], dict[str, list[dict]]]
#: train_rewards({annotation name: all records so far as a JSONL path}, round_dir, round) -> {name: reward model dir}
TrainRewards = Callable[[dict[str, Path], Path, int], dict[str, Path]]
#: optimise(policy_dir, reward model dirs, output dir, round) -> new policy dir
Optimise = Callable[[Path, dict[str, Path], Path, int], Path]


@dataclass
class RoundRecord:
    """What one finished round produced (one entry of ``rounds.json``)."""

    round: int
    policy_dir: str
    reward_models: dict[str, str]
    data: dict[str, str]
    records: dict[str, int] = field(default_factory=dict)
    """Records per annotation collected in this round."""
    total_records: dict[str, int] = field(default_factory=dict)
    """Lines of each data file after this round (all rounds so far); resuming cuts the files back to these."""


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _write_manifest(out: Path, rounds: list[RoundRecord]) -> None:
    tmp = out / "rounds.json.tmp"
    tmp.write_text(json.dumps([asdict(r) for r in rounds], indent=2), encoding="utf-8")
    os.replace(tmp, out / "rounds.json")  # atomic: the manifest lists complete rounds only


def load_manifest(out: Path) -> list[RoundRecord]:
    path = Path(out) / "rounds.json"
    if not path.exists():
        return []
    return [RoundRecord(**r) for r in json.loads(path.read_text(encoding="utf-8"))]


def run_rounds(out: str | Path, start_policy: str | Path, rounds: int, collect: Collect,
               train_rewards: TrainRewards, optimise: Optimise) -> list[RoundRecord]:
    """Run ``rounds`` rounds from ``start_policy``; resume after the last round in ``out/rounds.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = load_manifest(out)
    if len(done) > rounds:
        raise ValueError(f"{out}/rounds.json already holds {len(done)} rounds; asked for {rounds}")
    policy = Path(done[-1].policy_dir) if done else Path(start_policy)
    data_dir = out / "data"
    keep = done[-1].total_records if done else {}
    for path in data_dir.glob("*.jsonl"):
        # Rows appended by a round that died before its manifest entry are dropped.
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[: keep.get(path.stem, 0)]
        path.write_text("".join(lines), encoding="utf-8")
    if done:
        print(f"[alignkit] iterate: resuming after round {len(done)} from {policy}")
    for r in range(len(done) + 1, rounds + 1):
        round_dir = out / f"round-{r}"
        print(f"[alignkit] iterate: round {r}/{rounds}: collect, retrain reward models, optimise")
        new = collect(policy, r)
        files = {}
        for name, rows in new.items():
            path = data_dir / f"{name}.jsonl"
            _append_jsonl(path, rows)
            files[name] = path
        reward_dirs = train_rewards(files, round_dir, r)
        policy = optimise(policy, reward_dirs, round_dir / "policy", r)
        done.append(RoundRecord(round=r, policy_dir=str(policy), reward_models={k: str(v) for k, v in reward_dirs.items()},
                                data={k: str(v) for k, v in files.items()}, records={k: len(v) for k, v in new.items()},
                                total_records={p.stem: len(p.read_text(encoding="utf-8").splitlines())
                                               for p in data_dir.glob("*.jsonl")}))
        _write_manifest(out, done)
    return done
