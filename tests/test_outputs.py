"""The output folder's guarantees (alignkit.train.outputs), each against the failure it prevents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from alignkit.train import outputs
from alignkit.train.outputs import (DONE_FILE, OutputError, OutputLock, check_checkpoint, check_finite_weights,
                                    check_resume_settings, claim_output_dir, compare_fingerprints, data_digest,
                                    final_save, finished_run, intact_checkpoints, recover_final_save, run_fingerprint)


# ---- the lock ----------------------------------------------------------------------------------


def test_a_run_in_the_same_process_takes_the_lock_over(tmp_path):
    first = OutputLock(tmp_path).acquire()  # e.g. a run that stopped with an error in a notebook
    second = OutputLock(tmp_path).acquire()
    first.release()  # the stale holder's release does not free the new holder's lock
    assert [h for _, h in outputs._HELD.values()] == [second]
    second.release()
    assert not outputs._HELD


def test_the_lock_of_a_killed_run_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from alignkit.train.outputs import OutputLock
        OutputLock({str(tmp_path)!r}).acquire(); print("held", flush=True); time.sleep(60)""")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f'"pid": {holder.pid}'):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    OutputLock(tmp_path).acquire().release()


# ---- claiming the folder -------------------------------------------------------------------------


def _finished(out: Path) -> None:
    with final_save(out, {"command": "sft"}) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text("old")
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "a.json").write_text("{}")


def test_output_paths_that_cannot_be_written_are_clear_errors(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        claim_output_dir(tmp_path / "f", resume=False, overwrite=False)
    with pytest.raises(OutputError, match="cannot be created: .* is a file"):
        claim_output_dir(tmp_path / "f" / "run", resume=False, overwrite=False)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            claim_output_dir(ro, resume=False, overwrite=False)


def test_a_finished_model_is_not_overwritten_unless_asked(tmp_path):
    _finished(tmp_path)
    with pytest.raises(OutputError, match="holds a finished model .*run.overwrite=true"):
        claim_output_dir(tmp_path, resume=False, overwrite=False)
    assert (tmp_path / "model.safetensors").read_text() == "old"
    claim_output_dir(tmp_path, resume=True, overwrite=False)  # resume: the caller says it is finished
    logs = []
    claim_output_dir(tmp_path, resume=False, overwrite=True, log=logs.append)
    assert "removing the finished model" in logs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no old weights left under a new run


def test_leftover_checkpoints_of_an_unfinished_run_need_resume_or_overwrite(tmp_path):
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2" / "trainer_state.json").write_text('{"step": 2}')
    with pytest.raises(OutputError, match="checkpoints of an unfinished run.*run.resume=true"):
        claim_output_dir(tmp_path, resume=False, overwrite=False)
    claim_output_dir(tmp_path, resume=True, overwrite=False)
    claim_output_dir(tmp_path, resume=False, overwrite=True)
    assert not (tmp_path / "checkpoints").exists()


# ---- the atomic final save -------------------------------------------------------------------------


def test_final_save_replaces_the_model_and_marks_the_folder_finished(tmp_path):
    _finished(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with final_save(tmp_path, {"command": "dpo"}) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
        (tmp / "model.safetensors").write_text("new")
    assert (tmp_path / "model.safetensors").read_text() == "new"
    assert not (tmp_path / "adapter").exists()  # the old model's extra file is gone
    assert (tmp_path / "metrics.jsonl").exists()  # the run's own files stay
    assert finished_run(tmp_path)["command"] == "dpo"
    assert not (tmp_path / ".tmp-final").exists()


def test_a_save_killed_before_its_commit_leaves_the_old_model(tmp_path):
    _finished(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with final_save(tmp_path) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise KeyboardInterrupt
    assert (tmp_path / "model.safetensors").read_text() == "old" and finished_run(tmp_path)["command"] == "sft"
    logs = []
    recover_final_save(tmp_path, logs.append)
    assert "discarding an incomplete final save" in logs[0] and not (tmp_path / ".tmp-final").exists()


def test_a_save_killed_after_its_commit_is_finished_at_the_next_start(tmp_path, monkeypatch):
    _finished(tmp_path)
    real_replace, calls = os.replace, []

    def dying_replace(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed half-way through moving files into place
        real_replace(a, b)

    monkeypatch.setattr(outputs.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        with final_save(tmp_path, {"command": "dpo"}) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            (tmp / "model.safetensors").write_text("new")
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert finished_run(tmp_path) is None  # mid-move: not a finished folder
    logs = []
    claim_output_dir(tmp_path, resume=True, overwrite=False, log=logs.append)
    assert "finishing an interrupted final save" in logs[0]
    assert (tmp_path / "model.safetensors").read_text() == "new" and finished_run(tmp_path)["command"] == "dpo"


def test_non_finite_weights_are_never_saved():
    model = torch.nn.Linear(3, 2)
    check_finite_weights(model)
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(OutputError, match=r"non-finite weights \(bias\); not saving"):
        check_finite_weights(model)


# ---- checkpoints ----------------------------------------------------------------------------------


def _checkpoint(out: Path, step: int) -> Path:
    ckpt = out / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.arange(64.0)}, ckpt / "model.safetensors")
    torch.save({"state": torch.ones(50)}, ckpt / "optimizer.bin")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ckpt


@pytest.mark.parametrize("damage, message", [
    ("truncate model.safetensors", "model.safetensors: truncated"),
    ("truncate optimizer.bin", "optimizer.bin"),
    ("garble trainer_state.json", "trainer_state.json: cannot read the checkpoint state"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, message):
    _checkpoint(tmp_path, 10)
    newest = _checkpoint(tmp_path, 20)
    check_checkpoint(newest)
    verb, name = damage.split()
    path = newest / name
    if verb == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 40])
    else:
        path.write_text('{"step": 2')
    with pytest.raises(OutputError, match=message):
        check_checkpoint(newest)
    logs = []
    found = [(c.name, s["step"]) for c, s in intact_checkpoints(tmp_path, logs.append)]
    assert found == [("step-10", 10)]
    assert "skipping damaged checkpoint step-20" in logs[0] and message.split(":")[0] in logs[0]


# ---- the settings fingerprint -------------------------------------------------------------------------


@dataclass
class _Run:
    output_dir: str = "a"
    seed: int = 0
    progress: bool = True


@dataclass
class _Cfg:
    lr: float = 1e-5
    run: _Run = field(default_factory=_Run)


def test_a_resume_with_changed_settings_lists_every_difference(tmp_path):
    items = [{"input_ids": torch.tensor([1, 2, 3]), "label": 1.0}]
    saved = run_fingerprint(_Cfg(), items, processes=1)
    same = run_fingerprint(_Cfg(run=_Run(output_dir="b", progress=False)), [dict(items[0])], processes=1)
    assert compare_fingerprints(saved, same) == []  # where and how it reports shapes nothing
    changed = run_fingerprint(_Cfg(lr=1e-3, run=_Run(seed=1)), [{"input_ids": torch.tensor([1, 2, 4]), "label": 1.0}],
                              processes=1)
    with pytest.raises(OutputError) as e:
        check_resume_settings(tmp_path, saved, changed, allow=False)
    text = str(e.value)
    assert "lr: 1e-05 → 0.001" in text and "run.seed: 0 → 1" in text and "data: 'digest" in text
    assert "run.resume_changed=true" in text
    logs = []
    check_resume_settings(tmp_path, saved, changed, allow=True, log=logs.append)
    assert "continuing" in logs[0] and "run.seed" in logs[0]


def test_the_data_digest_sees_order_values_and_dtypes():
    a = [{"ids": torch.tensor([1, 2])}, {"ids": torch.tensor([3])}]
    assert data_digest(a) == data_digest([{"ids": torch.tensor([1, 2])}, {"ids": torch.tensor([3])}])
    assert data_digest(a) != data_digest(a[::-1])
    assert data_digest(a) != data_digest([{"ids": torch.tensor([1, 2], dtype=torch.int32)}, {"ids": torch.tensor([3])}])
    assert data_digest(a) != data_digest([{"ids": torch.tensor([1, 2])}, {"ids": torch.tensor([4])}])


# ---- through the CLI: the guards where users meet them ------------------------------------------------


def _sft(tiny_dir, tmp_path, *extra, data_rows=None):
    from alignkit.cli import main
    from tests.conftest import write_jsonl

    rows = data_rows or [{"prompt": f"Item {i}?", "completion": f"Item {i} is red."} for i in range(16)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    return main(["sft", f"model.path={tiny_dir}", f"data.path={data}", "optim.batch_size=4", "optim.max_steps=4",
                 f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "run.report_to=jsonl", *extra])


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_an_output_dir_that_is_a_file_is_refused_before_loading(tiny_dir, tmp_path, capsys):
    (tmp_path / "out").write_text("")
    assert _sft(tiny_dir, tmp_path) == 1
    out = capsys.readouterr()
    assert "is a file, not a folder" in out.err and "Traceback" not in out.err and "device=" not in out.out


def test_cli_a_finished_model_is_refused_then_replaced_on_request(tiny_dir, tmp_path, capsys):
    assert _sft(tiny_dir, tmp_path) == 0
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert finished_run(tmp_path / "out")["command"] == "sft"
    assert _sft(tiny_dir, tmp_path, "optim.lr=1e-3") == 1
    err = capsys.readouterr().err
    assert "holds a finished model" in err and "run.overwrite=true" in err and "Traceback" not in err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    assert _sft(tiny_dir, tmp_path, "optim.lr=1e-3", "run.overwrite=true") == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != first
    assert _steps(tmp_path / "out") == [1, 2, 3, 4]  # the first run's rows are gone with its model


def test_cli_resume_refuses_changed_settings_and_falls_back_past_a_damaged_checkpoint(tiny_dir, tmp_path, capsys):
    from alignkit.cli import main  # noqa: F401  (the CLI turns OutputError into exit 1)

    # An uninterrupted run, then one killed after step 3 (checkpoints at 2 and 3 — simulated
    # by running 4 steps with save_every=1 and removing what step 4 wrote).
    assert _sft(tiny_dir, tmp_path, "run.save_every=1", "run.keep_checkpoints=3") == 0
    out = tmp_path / "out"
    full = (out / "model.safetensors").read_bytes()
    for name in json.loads((out / DONE_FILE).read_text())["files"] + [DONE_FILE]:
        (out / name).unlink() if (out / name).is_file() else None
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # all 4 rows: the resume must drop step 4's
    capsys.readouterr()
    # Changed settings: refused with the differences listed.
    assert _sft(tiny_dir, tmp_path, "run.resume=true", "optim.lr=1e-3") == 1
    err = capsys.readouterr().err
    assert "settings differ" in err and "optim.lr" in err and "run.resume_changed=true" in err
    changed = [{"prompt": f"Item {i}?", "completion": f"Item {i} is blue."} for i in range(16)]
    assert _sft(tiny_dir, tmp_path, "run.resume=true", data_rows=changed) == 1
    assert "data: 'digest" in capsys.readouterr().err
    # The newest checkpoint (step 3) damaged: the run falls back to step 2 and still ends where
    # the uninterrupted run ended, with no step logged twice.
    weights = out / "checkpoints" / "step-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert _sft(tiny_dir, tmp_path, "run.resume=true") == 0
    text = capsys.readouterr().out
    assert "skipping damaged checkpoint step-3" in text and "resumed from" in text and "step-2" in text
    assert (out / "model.safetensors").read_bytes() == full
    assert _steps(out) == [1, 2, 3, 4]
