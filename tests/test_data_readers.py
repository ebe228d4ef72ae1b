"""Readers: every source type, the options, and the errors for broken files."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from alignkit.data import DataError, load_dataset_records, read_rows, split_rows
from alignkit.data.records import PreferencePair, SFTExample

PAIRS = [
    {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
    for i in range(6)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_locations_are_file_and_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(PAIRS[1]) + "\n", encoding="utf-8")
    rows = list(read_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:1", f"{path}:3"]
    assert rows[1][1] == PAIRS[1]


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in PAIRS).encode()))
    assert [row for _, row in read_rows(path)] == PAIRS


def test_json_list_and_data_object_and_jsonl_named_json(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(PAIRS), encoding="utf-8")
    as_obj = tmp_path / "obj.json"
    as_obj.write_text(json.dumps({"data": PAIRS, "version": 1}), encoding="utf-8")
    as_lines = write_jsonl(tmp_path / "lines.json", PAIRS)
    for path in (as_list, as_obj, as_lines):
        assert [row for _, row in read_rows(path)] == PAIRS
    assert next(read_rows(as_list))[0] == f"{as_list}[0]"
    train, _, report = load_dataset_records(as_obj, shuffle=False)
    assert report.format == "pairwise" and len(train) == 6
    assert train[2] == PreferencePair(
        [{"role": "user", "content": "question 2?"}], "good answer 2", "bad answer 2",
        source=f"{as_obj}[2]",
    )


def test_json_of_wrong_shape(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": PAIRS}), encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a JSON list of objects.*keys \['rows'\]"):
        list(read_rows(path))


def test_parquet_keeps_nested_message_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(5)
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    train, evals, report = load_dataset_records(path, shuffle=False, eval_size=1)
    assert report.format == "sft" and (len(train), len(evals)) == (4, 1)
    assert train[1] == SFTExample([{"role": "user", "content": "hi 1"}], "hello 1", f"{path}[1]", messages=rows[1]["messages"])
    assert evals[0].source == f"{path}[4]"


def test_csv_lines_count_multiline_cells_and_decode_message_cells(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response", "score"])
        w.writerow(["two\nlines", "answer a", "3.5"])
        w.writerow([json.dumps([{"role": "user", "content": "hey"}]), "answer b", "-1"])
    rows = list(read_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:2", f"{path}:4"]
    assert rows[1][1]["prompt"] == [{"role": "user", "content": "hey"}]
    train, _, report = load_dataset_records(path, shuffle=False)
    assert report.format == "ratings"
    assert [(r.prompt[0]["content"], r.score) for r in train] == [("two\nlines", 3.5), ("hey", -1.0)]


def test_csv_with_a_wrong_number_of_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nhello,world,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:2: 3 cells but the header has 2 columns"):
        list(read_rows(path))


def test_saved_datasets_dir_dataset_and_datasetdict_split(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(single))
    assert [row for _, row in read_rows(single)] == PAIRS

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS[:4]), "test": datasets.Dataset.from_list(PAIRS[4:])}
    ).save_to_disk(str(both))
    test_rows = list(read_rows(both, split="test"))
    assert [row for _, row in test_rows] == PAIRS[4:]
    assert test_rows[0][0] == f"{both}/test[0]"
    train, _, report = load_dataset_records(both, split="train", shuffle=False)
    assert len(train) == 4 and report.format == "pairwise"
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        list(read_rows(both, split="validation"))


def test_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a data set written by datasets' save_to_disk"):
        list(read_rows(tmp_path))


def test_hub_name_is_tried_only_when_no_local_path_and_offline_error_says_so(monkeypatch):
    import datasets

    calls = []

    def offline(name, split):
        calls.append((name, split))
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        list(read_rows("someorg/some-prefs", split="test"))
    assert calls == [("someorg/some-prefs", "test")]
    msg = str(e.value)
    assert "'someorg/some-prefs' is not a local file or directory" in msg
    assert "Hugging Face Hub" in msg and "network access" in msg and "Couldn't reach" in msg

    # A missing local file is reported as such, never looked up on the hub.
    with pytest.raises(DataError, match=r"data/missing\.jsonl: no such file"):
        list(read_rows("data/missing.jsonl"))
    assert len(calls) == 1


def test_non_utf8_names_file_line_and_fix(tmp_path):
    path = tmp_path / "latin.jsonl"
    good = (json.dumps(PAIRS[0]) + "\n").encode()
    path.write_bytes(good + good + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        list(read_rows(path))
    msg = str(e.value)
    assert f"{path}:3:" in msg and "not valid UTF-8" in msg
    assert f"byte offset {2 * len(good) + 15}" in msg and "iconv" in msg

    csv_path = tmp_path / "latin.csv"
    csv_path.write_bytes("prompt,completion\nhi,there\ncaf\u00e9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv:3: bytes are not valid UTF-8"):
        list(read_rows(csv_path))


@pytest.mark.parametrize(
    "name,content",
    [("e.jsonl", ""), ("e.jsonl", "\n\n  \n"), ("e.json", "[]"), ("e.csv", ""), ("e.csv", "prompt,completion\n")],
)
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{name}: .*(empty|no rows)"):
        load_dataset_records(path)


def test_malformed_json_line_gives_file_line_and_json_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + '\n{"prompt": "x", "chosen": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON: Expecting value \(column 27\)"):
        list(read_rows(path))
    path.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected a JSON object per line, got list"):
        list(read_rows(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.txt: cannot tell the file type.*\.jsonl"):
        list(read_rows(path))


def test_limit_shuffle_seed_and_eval_split(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    assert len(list(read_rows(path, limit=7))) == 7
    rows = list(read_rows(path))

    train, evals = split_rows(rows, shuffle=False, eval_size=5)
    assert [loc for loc, _ in evals] == [f"{path}:{i}" for i in range(16, 21)] and len(train) == 15

    a = split_rows(rows, shuffle=True, seed=3, eval_fraction=0.25)
    b = split_rows(rows, shuffle=True, seed=3, eval_fraction=0.25)
    c = split_rows(rows, shuffle=True, seed=4, eval_fraction=0.25)
    assert a == b and a != c and (len(a[0]), len(a[1])) == (15, 5)
    assert sorted(a[0] + a[1]) == sorted(rows)  # a permutation, nothing lost
    assert len(split_rows(rows, eval_fraction=0.01)[1]) == 1  # a positive fraction holds out >= 1

    train, evals, report = load_dataset_records(path, limit=10, eval_fraction=0.2, seed=1)
    assert (len(train), len(evals), report.read, report.train, report.eval) == (8, 2, 10, 8, 2)
    assert {r.source for r in train + evals} == {f"{path}:{i}" for i in range(1, 11)}

    with pytest.raises(DataError, match="eval_fraction or eval_size, not both"):
        split_rows(rows, eval_fraction=0.1, eval_size=2)
    with pytest.raises(DataError, match="leaves no training rows"):
        split_rows(rows, eval_size=20)
    with pytest.raises(DataError, match="limit must be a positive"):
        list(read_rows(path, limit=0))
