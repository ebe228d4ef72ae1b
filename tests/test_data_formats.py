"""Formats: detection, normalisation of every format, margins, rankings and every bad input."""

from __future__ import annotations

import json
from math import comb

import pytest

from alignkit.data import (
    DEFAULT_MARGIN_LABELS,
    LLAMA2_MARGIN_SMALL,
    DataError,
    DataReport,
    PreferencePair,
    RatedExample,
    SFTExample,
    UnpairedExample,
    detect_format,
    load_dataset_records,
)

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
ASSISTANT = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tmp_path, rows, **kw):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    kw.setdefault("shuffle", False)
    train, evals, report = load_dataset_records(path, **kw)
    return train + evals, report, path


# --- every format from JSONL ------------------------------------------------------------------


def test_pairwise_strings_and_message_lists(tmp_path):
    sys_user = [{"role": "system", "content": "Be kind."}, USER("Hi?")]
    rows = [
        {"prompt": " What is 2+2? ", "chosen": " 4 ", "rejected": "5"},
        # replies as a single assistant message
        {"prompt": sys_user, "chosen": [ASSISTANT("Hello!")], "rejected": [ASSISTANT("Go away.")]},
        # replies repeating the whole conversation: the shared prompt is stripped
        {"prompt": "Hi?", "chosen": [USER("Hi?"), ASSISTANT("Hello!")], "rejected": [USER("Hi?"), ASSISTANT("No.")]},
        # no prompt field: full conversations, the prompt is their shared prefix
        {"chosen": sys_user + [ASSISTANT("A")], "rejected": sys_user + [ASSISTANT("B")]},
        # an HH-style prompt string is parsed into turns
        {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:", "chosen": " ciao", "rejected": "no"},
    ]
    records, report, path = load(tmp_path, rows)
    assert report.format == "pairwise" and (report.read, report.kept) == (5, 5)
    assert records[0] == PreferencePair([USER("What is 2+2?")], "4", "5", source=f"{path}:1")
    assert (records[1].prompt, records[1].chosen, records[1].rejected) == (sys_user, "Hello!", "Go away.")
    assert (records[2].prompt, records[2].chosen, records[2].rejected) == ([USER("Hi?")], "Hello!", "No.")
    assert (records[3].prompt, records[3].chosen, records[3].rejected) == (sys_user, "A", "B")
    assert records[4].prompt == [USER("hi"), ASSISTANT("hello"), USER("bye")]
    assert records[4].chosen == "ciao"


def test_ranked_by_indices_and_by_ranks_expands_all_pairs_best_first(tmp_path):
    rows = [
        {"prompt": "p", "responses": ["r0", "r1", "r2"], "ranking": [2, 0, 1]},
        {"prompt": "q", "responses": ["s0", "s1", "s2", "s3"], "ranks": [2, 4, 1, 3]},  # 1 = best
        {"prompt": "z", "responses": ["t0", "t1"], "ranks": [1, 0]},  # 0-based ranks
    ]
    records, report, path = load(tmp_path, rows)
    assert report.format == "ranked" and report.read == 3
    assert report.kept == comb(3, 2) + comb(4, 2) + comb(2, 2) == len(records) == 10
    first = [(p.chosen, p.rejected) for p in records[:3]]
    assert first == [("r2", "r0"), ("r2", "r1"), ("r0", "r1")]
    second = [(p.chosen, p.rejected) for p in records[3:9]]  # best-first order s2 > s0 > s3 > s1
    assert second == [("s2", "s0"), ("s2", "s3"), ("s2", "s1"), ("s0", "s3"), ("s0", "s1"), ("s3", "s1")]
    assert (records[9].chosen, records[9].rejected) == ("t1", "t0")
    assert all(p.group == -1 and p.weight == 1.0 for p in records)
    assert records[0].source == f"{path}:1 (responses 2>0)"


def test_grouped_rankings_share_a_group_and_weigh_one_prompt(tmp_path):
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
        {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranking": [3, 2, 1, 0]},
        {"prompt": "w", "responses": ["x", "y"], "ranking": [1, 0]},
    ]
    records, report, _ = load(tmp_path, rows, group_rankings=True)
    assert [p.group for p in records] == [0] * 3 + [1] * 6 + [2]
    assert [p.weight for p in records] == [1 / 3] * 3 + [1 / 6] * 6 + [1.0]
    for g in (0, 1, 2):  # every prompt weighs as one example
        assert sum(p.weight for p in records if p.group == g) == pytest.approx(1.0)


def test_ranked_skips_identical_responses_per_pair_and_weights_kept_pairs(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}]
    records, report, path = load(tmp_path, rows, group_rankings=True)
    assert [(p.chosen, p.rejected) for p in records] == [("a", "b"), ("b", "a")]
    assert report.skipped == {"identical_responses": 1}
    assert report.skip_examples["identical_responses"] == [f"{path}:1 (responses 0>2)"]
    assert [p.weight for p in records] == [0.5, 0.5]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("ranking", [0, 0, 1], r"'ranking' must be a permutation of the response indices 0\.\.2"),
        ("ranking", [0, 1], r"'ranking' must be a permutation"),
        ("ranks", [1, 2, 2], r"'ranks' must give each of the 3 responses a distinct rank 1\.\.3"),
        ("ranks", [2, 3, 4], r"'ranks' must give each"),
        ("ranking", "0,1,2", r"field 'ranking' must be a list of integers, got str"),
    ],
)
def test_bad_rankings(tmp_path, field, value, message):
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], field: value}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: .*" + message):
        load(tmp_path, rows)


def test_unpaired_labels(tmp_path):
    rows = [
        {"prompt": "p", "completion": "c1", "label": True},
        {"prompt": "p", "completion": "c2", "label": "false"},
        {"prompt": "p", "completion": "c3", "label": " TRUE "},
        {"prompt": "p", "completion": "c4", "label": 0},
        {"prompt": "p", "completion": "c5", "label": 1},
    ]
    records, report, path = load(tmp_path, rows)
    assert report.format == "unpaired"
    assert [r.label for r in records] == [True, False, True, False, True]
    assert records[0] == UnpairedExample([USER("p")], "c1", True, f"{path}:1")


@pytest.mark.parametrize("label", ["maybe", 2, 0.5, "yes"])
def test_unpaired_rejects_other_labels(tmp_path, label):
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": label}]
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'label' must be a bool \(true/false, or 0/1\)"):
        load(tmp_path, rows)


def test_ratings(tmp_path):
    rows = [{"prompt": "p", "response": "r", "score": 4}, {"prompt": "p", "response": "s", "score": "-0.5"}]
    records, report, path = load(tmp_path, rows)
    assert report.format == "ratings"
    assert records == [RatedExample([USER("p")], "r", 4.0, f"{path}:1"), RatedExample([USER("p")], "s", -0.5, f"{path}:2")]


def test_sft_prompt_completion_and_messages(tmp_path):
    rows = [
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "system", "content": "S"}, USER("u1"), ASSISTANT("a1"), USER("u2"), ASSISTANT("a2")]},
    ]
    records, report, path = load(tmp_path, rows)
    assert report.format == "sft"
    assert records[0] == SFTExample([USER("p")], "c", f"{path}:1")
    assert records[1].prompt == [{"role": "system", "content": "S"}, USER("u1"), ASSISTANT("a1"), USER("u2")]
    assert records[1].completion == "a2"


def test_explicit_format_overrides_detection(tmp_path):
    # ratings rows read as SFT: the completion field is required and named in the error.
    rows = [{"prompt": "p", "response": "r", "score": 1}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: missing field 'completion' .* for format 'sft'"):
        load(tmp_path, rows, format="sft")
    with pytest.raises(DataError, match=r"unknown format 'dpo'; known formats: ranked, pairwise, hh"):
        load(tmp_path, rows, format="dpo")


# --- margins ---------------------------------------------------------------------------------


def test_margin_numbers_and_llama2_labels(tmp_path):
    labels = ["significantly better", "Better", "  slightly   BETTER ", "negligibly better", "Unsure"]
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": m} for m in labels]
    rows += [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.25}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    records, _, _ = load(tmp_path, rows)
    assert [r.margin for r in records] == [3.0, 2.0, 1.0, 0.0, 0.0, 0.25, 0.0]
    assert DEFAULT_MARGIN_LABELS["significantly better"] == 3.0

    custom = {"Significantly Better": 10.0, "better": 5.0, "slightly better": 1.0, "negligibly better": 0.5, "unsure": 0.0}
    records, _, _ = load(tmp_path, rows, margin_labels=custom)
    assert [r.margin for r in records] == [10.0, 5.0, 1.0, 0.5, 0.0, 0.25, 0.0]
    records, _, _ = load(tmp_path, rows, margin_labels=LLAMA2_MARGIN_SMALL)
    assert [r.margin for r in records] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.25, 0.0])


def test_unknown_margin_label_lists_the_known_ones(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "much better"}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'margin' 'much better' is neither a number nor a known label; labels: \['better'"):
        load(tmp_path, rows)


# --- bad input -------------------------------------------------------------------------------


def test_missing_field_names_location_field_and_type(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataError) as e:
        load(tmp_path, rows)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'data.jsonl'}:2: missing field 'rejected'")
    assert "expected a string or a list of chat messages" in msg and "for format 'pairwise'" in msg
    assert "['chosen', 'prompt']" in msg


def test_null_counts_as_missing(tmp_path):
    rows = [{"prompt": "p", "response": "r", "score": None}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: missing field 'score' \(expected a number\)"):
        load(tmp_path, rows, format="ratings")


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p", "chosen": 5, "rejected": "b"}, r"field 'chosen' must be a string or a list of chat messages, got int 5"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"field 'prompt' must be a list of chat messages .*, got int 3"),
        ({"prompt": "p", "response": "r", "score": "high"}, r"field 'score' must be a number, got str 'high'"),
        ({"prompt": "p", "response": "r", "score": True}, r"field 'score' must be a number, got bool True"),
        ({"prompt": "p", "response": "r", "score": "nan"}, r"field 'score' must be a finite number"),
        ({"prompt": [{"role": "robot", "content": "x"}], "completion": "c"}, r"field 'prompt\[0\]' has role 'robot'"),
        ({"prompt": [{"role": "user"}], "completion": "c"}, r"field 'prompt\[0\]' must be a message"),
        ({"prompt": [USER("u"), ASSISTANT("a")], "completion": "c"}, r"field 'prompt' must end with a user turn"),
        ({"prompt": "p", "chosen": [USER("p")], "rejected": "b"}, r"field 'chosen' must end with an assistant message"),
        ({"prompt": "p", "chosen": [USER("other"), ASSISTANT("a")], "rejected": "b"}, r"field 'chosen' is a conversation that does not start with the prompt"),
        ({"chosen": "plain a", "rejected": [ASSISTANT("b")]}, r"missing field 'prompt'.*both be full conversations, or both plain strings"),
    ],
)
def test_wrong_types_and_shapes(tmp_path, row, message):
    with pytest.raises(DataError, match=r"data\.jsonl:1: " + message):
        load(tmp_path, [row])


def test_unknown_format_lists_formats_and_fields_seen(tmp_path):
    with pytest.raises(DataError) as e:
        load(tmp_path, [{"question": "q", "answer": "a"}])
    msg = str(e.value)
    assert "data.jsonl:1: cannot tell the data format from the fields ['answer', 'question']" in msg
    for name in ("pairwise", "hh", "ranked", "unpaired", "ratings", "sft"):
        assert f"{name}: " in msg
    assert "prompt, responses, ranking|ranks" in msg and "pass format=" in msg
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "pairwise"


def test_identical_and_empty_responses_are_counted_skips(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": " same "},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "   "},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "  ", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": [ASSISTANT("")], "rejected": "b"},
    ]
    records, report, path = load(tmp_path, rows)
    assert [r.source for r in records] == [f"{path}:4"]
    assert report.skipped == {"identical_responses": 1, "empty_response": 3, "empty_prompt": 1}
    assert report.skip_examples["empty_response"] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert (report.read, report.kept, report.total_skipped) == (6, 1, 5)
    for kind, fmt_rows in {
        "unpaired": [{"prompt": "p", "completion": " ", "label": 1}, {"prompt": "p", "completion": "c", "label": 1}],
        "ratings": [{"prompt": "p", "response": "", "score": 1}, {"prompt": "p", "response": "r", "score": 1}],
        "sft": [{"messages": [USER("u"), ASSISTANT(" ")]}, {"prompt": "p", "completion": "c"}],
    }.items():
        records, report, _ = load(tmp_path, fmt_rows)
        assert report.format == kind and len(records) == 1 and report.skipped == {"empty_response": 1}


def test_conversations_without_a_shared_prompt_are_listed_or_strict_errors(tmp_path):
    rows = [
        {"chosen": [USER("hi"), ASSISTANT("a")], "rejected": [USER("hi"), ASSISTANT("b")]},
        {"chosen": [USER("hi"), ASSISTANT("a")], "rejected": [USER("hey"), ASSISTANT("b")]},
    ]
    records, report, path = load(tmp_path, rows)
    assert len(records) == 1 and report.mismatched == [f"{path}:2"]
    assert report.skipped == {"prefix_mismatch": 1}
    with pytest.raises(DataError, match=r"data\.jsonl:2: prefix_mismatch: .*from turn 1: user 'hi' vs user 'hey'"):
        load(tmp_path, rows, strict=True)


def test_no_usable_records_is_an_error_with_the_report(tmp_path):
    rows = [{"prompt": "p", "chosen": "x", "rejected": "x"}]
    with pytest.raises(DataError, match=r"(?s)no usable training records.*identical_responses: 1"):
        load(tmp_path, rows)


def test_report_summary_and_dict():
    report = DataReport(source="d.jsonl", format="pairwise", read=10, kept=7, train=6, eval=1, max_examples=2)
    for line in (3, 5, 8):
        report.skip("empty_response", f"d.jsonl:{line}")
    report.tokenized = 7
    report.truncate("d.jsonl:4", prompt=True, response=False)
    text = report.summary()
    assert "read 10 rows, kept 7 records (train 6, eval 1)" in text
    assert "empty_response: 3 (e.g. d.jsonl:3, d.jsonl:5 ...)" in text
    assert "tokenized 7, truncated 1 (prompt 1, response 0; e.g. d.jsonl:4)" in text
    d = report.to_dict()
    assert d["data/skipped/empty_response"] == 3 and d["data/skipped"] == 3 and d["data/truncated"] == 1
    assert all(k.startswith("data/") and isinstance(v, int) for k, v in d.items())
