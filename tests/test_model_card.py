"""Model cards: every output folder's README.md has the Hugging Face header and states the command
or API call, the data report and the final and evaluation metrics, equal to metrics.jsonl's; the
card is part of the atomic final save; every command saves its config; tracker names are options.

:func:`check_card` is also applied by tests/test_api.py to the output of every method, from the
command line and from the API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import alignkit
from alignkit.cli import main
from alignkit.train.card import DATA_COLUMNS, final_metrics, model_card
from tests.conftest import write_jsonl


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        try:
            return float(text)  # nan, inf
        except ValueError:
            return text


def parse_card(path: Path) -> dict:
    """The header, the stated call, the data rows, the final metrics and the evaluations of a card."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the card opens with the Hugging Face YAML header"
    _, header, body = text.split("---\n", 2)
    lines = body.splitlines()
    call = lines[lines.index("## How it was made") + 3]
    card = {"header": yaml.safe_load(header), "call": call, "data": [], "final": {}, "evals": [], "final_step": None}
    section = None
    for line in lines:
        if line.startswith("## "):
            section = None
            continue
        if line.startswith("Final (step "):
            card["final_step"] = int(line.split("step ")[1].split(")")[0])
            section = "final"
            continue
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "source":
            section = "data"
            continue
        if cells[:2] == ["step", "metric"]:
            section = "evals"
            continue
        if cells[0] == "metric" or set(cells[0]) <= {"-"}:
            continue
        if section == "data":
            card["data"].append((cells[0], cells[1], *map(int, cells[2:])))
        elif section == "final":
            card["final"][cells[0]] = _value(cells[1])
        elif section == "evals":
            card["evals"].append((int(cells[0]), cells[1], _value(cells[2])))
    return card


def _equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def check_card(out: Path, command: str, reports: list | None = None) -> dict:
    """Assert ``out``'s card matches its metrics.jsonl (and ``reports``, the run's data reports)."""
    card = parse_card(out / "README.md")
    assert card["header"]["library_name"] == "alignkit" and command in card["header"]["tags"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step, final = final_metrics(rows)
    assert card["final_step"] == step
    assert card["final"].keys() == final.keys() and all(_equal(card["final"][k], final[k]) for k in final), (card["final"], final)
    evals = [(r["step"], k, v) for r in rows for k, v in r.items() if k.startswith("eval/")]
    assert len(card["evals"]) == len(evals) and all(
        a[:2] == b[:2] and _equal(a[2], b[2]) for a, b in zip(card["evals"], evals))
    if reports is not None:
        assert card["data"] == [(src, rep.format, *(getattr(rep, attr) for _, attr in DATA_COLUMNS))
                                for src, rep in reports]
    done = json.loads((out / "alignkit_done.json").read_text())
    assert "README.md" in done["files"]  # written inside the atomic final save
    assert (out / "alignkit_config.yaml").exists()
    return card


QS = [f"What colour is item {i}?" for i in range(8)]


def test_card_states_the_command_line_data_report_and_metrics(tiny_dir, tmp_path):
    rows = [{"prompt": q, "completion": f"Item {i} is red. " * (1 + 6 * (i == 0))} for i, q in enumerate(QS)]
    rows.append({"prompt": "empty", "completion": ""})  # skipped and counted
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "out"
    args = ["sft", f"model.path={tiny_dir}", f"data.path={data}", f"run.output_dir={out}", "optim.max_steps=3",
            "optim.batch_size=2", "data.eval_size=2", "run.eval_every=2", "data.max_length=24", "data.max_prompt_length=16", "run.progress=false",
            "run.report_to=jsonl"]
    assert main(args) == 0
    card = check_card(out, "sft")
    assert card["call"].startswith("alignkit sft model.path=") and f"data.path={data}" in card["call"]
    assert card["header"]["base_model"] == str(tiny_dir) and card["header"]["datasets"] == [str(data)]
    (row,) = card["data"]
    read, kept, skipped, train, evals, tokenized, truncated = row[2:]
    assert row[0] == str(data) and (read, kept, skipped, train + evals, tokenized) == (9, 8, 1, 8, 8) and truncated >= 1
    assert sorted({s for s, _, _ in card["evals"]}) == [2, 3]
    assert "optim:" in (out / "README.md").read_text() and "max_steps: 3" in (out / "README.md").read_text()


def test_card_of_an_api_call_names_the_call_and_in_memory_data(tiny_dir, tmp_path):
    rows = [{"prompt": q, "chosen": "It is red.", "rejected": "No."} for q in QS]
    res = alignkit.dpo(model=str(tiny_dir), data=rows, output_dir=str(tmp_path / "o"), max_steps=1, progress=False,
                       report_to="jsonl", batch_size=4, eval_size=2)
    card = check_card(res.output_dir, "dpo", res.data_reports)
    assert card["call"].startswith("alignkit.dpo(model=") and "data=<list of 8 records>" in card["call"]
    assert "datasets" not in card["header"]  # in-memory data has no dataset id
    assert res.metrics == card["final"] and res.eval_metrics == {k: v for k, v in card["final"].items() if k.startswith("eval/")}


def test_card_without_jsonl_metrics_says_so_and_the_header_reads_back():
    from alignkit.context import RunContext
    from alignkit.train.sft import SFTConfig

    text = model_card("sft", SFTConfig(), RunContext(invocation="alignkit sft x=1"), [])
    assert "No metrics were logged" in text and "alignkit sft x=1" in text
    header = yaml.safe_load(text.split("---\n")[1])
    assert header == {"library_name": "alignkit", "tags": ["alignkit", "sft"]}  # no base_model when none is set
    step, final = final_metrics([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval/nll": 0.5}])
    assert step == 2 and final == {"loss": 1.0, "eval/nll": 0.5}


def test_rs_saves_its_config_and_card(tiny_dir, tmp_path):
    res = alignkit.rs(model=str(tiny_dir), data=[{"prompt": q} for q in QS[:4]], output_dir=str(tmp_path / "o"),
                      reward=lambda prompts, responses: [float(len(r)) for r in responses], num_samples=2,
                      max_new_tokens=6, progress=False, report_to="jsonl", batch_size=2)
    saved = yaml.safe_load((res.output_dir / "alignkit_config.yaml").read_text())
    assert saved["num_samples"] == 2 and saved["data"]["path"] == "memory:data"
    check_card(res.output_dir, "rs", res.data_reports)


def test_tracker_project_and_run_name_are_options(monkeypatch, tmp_path):
    from alignkit.config import RunConfig, field_docs
    from alignkit.train.progress import MetricsWriter

    seen = {}

    class Acc:
        is_main_process, log_with = True, ["wandb"]

        def init_trackers(self, project, config=None, init_kwargs=None):
            seen.update(project=project, init_kwargs=init_kwargs)

    MetricsWriter(RunConfig(output_dir=str(tmp_path), report_to="jsonl,wandb", tracker_project="mine", run_name="r1"), Acc())
    assert seen == {"project": "mine", "init_kwargs": {"wandb": {"name": "r1"}, "mlflow": {"run_name": "r1"}}}
    MetricsWriter(RunConfig(output_dir=str(tmp_path), report_to="jsonl,wandb"), Acc())
    assert seen == {"project": "alignkit", "init_kwargs": {}}
    docs = field_docs(RunConfig)
    assert docs["tracker_project"] and docs["run_name"]


@pytest.mark.parametrize("command", ["sft"])
def test_a_folder_finished_before_the_card_existed_gets_one_on_overwrite(command, tiny_dir, tmp_path):
    rows = [{"prompt": q, "completion": "It is red."} for q in QS]
    kw = dict(model=str(tiny_dir), data=rows, output_dir=str(tmp_path / "o"), max_steps=1, progress=False,
              report_to="jsonl", batch_size=4)
    res = alignkit.sft(**kw)
    (res.output_dir / "README.md").unlink()
    alignkit.sft(**kw, overwrite=True)
    check_card(res.output_dir, command)
