"""Data users bring: text rows, implicit-prompt pairs, SFT on comparison files, mixed-format files,
rows to score without a score."""

from __future__ import annotations

import json
import re

import pytest

from alignkit.cli import main
from alignkit.config import DataConfig
from alignkit.data import (
    IGNORE_INDEX,
    DataError,
    PreferencePair,
    ResponseExample,
    SFTExample,
    TextExample,
    detect_format,
    implicit_prompt,
    load_dataset_records,
    tokenize_records,
)
from alignkit.train.common import prepare_data

from conftest import HH_SAMPLE, write_jsonl

USER = lambda text: {"role": "user", "content": text}  # noqa: E731


def load(tmp_path, rows, **kw):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    train, _, report = load_dataset_records(path, shuffle=False, **kw)
    return train, report, path


# ---- text rows ---------------------------------------------------------------------------------


def test_text_rows_train_on_every_token(tmp_path, tiny_tokenizer):
    train, report, path = load(tmp_path, [{"text": "The colour of item 1 is red."}, {"text": "  "}, {"text": "word " * 50}])
    assert report.format == "text" and report.skipped == {"empty_text": 1}
    assert train[0] == TextExample("The colour of item 1 is red.", source=f"{path}:1")
    items, _ = tokenize_records(train, tiny_tokenizer, max_length=32, report=report)
    # Reference: the plain tokenisation of the text followed by EOS, every token but the first a target.
    ids = tiny_tokenizer("The colour of item 1 is red.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert items[0] == {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:], "length": len(ids)}
    long = tiny_tokenizer(("word " * 50), add_special_tokens=False)["input_ids"]
    assert items[1]["input_ids"] == long[:32] and len(items[1]["labels"]) == 32  # the beginning is kept
    assert (report.tokenized, report.truncated, report.truncated_response) == (2, 1, 1)


def test_text_rows_start_with_bos_where_the_tokenizer_adds_one(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_bos_token = True  # a Llama-style tokenizer: tokenizer(text) starts with BOS
    ids = tok("hello there")["input_ids"]
    if ids[:1] != [tok.bos_token_id]:
        pytest.skip("this tokenizers version does not honour add_bos_token on a fast tokenizer")
    (item,), _ = tokenize_records([TextExample("hello there")], tok)
    assert item["input_ids"] == ids + [tok.eos_token_id]  # BOS once, as the tokenizer itself would add it


def test_sft_cli_trains_on_text_rows(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"The colour of item {i} is red."} for i in range(8)])
    code = main(["sft", f"model.path={tiny_dir}", f"data.path={data}", "optim.max_steps=1", "optim.batch_size=4",
                 f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "run.report_to=jsonl"])
    assert code == 0 and "(format text): read 8 rows, kept 8" in capsys.readouterr().out


# ---- implicit-prompt pairs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("What is 2+2? Four.", "What is 2+2? Five.", ("What is 2+2?", "Four.", "Five.")),  # "F" stays in both
        ("Q: colour?\nA: red", "Q: colour?\nA: reddish", ("Q: colour?\nA:", "red", "reddish")),
        ("Say yes. Yes", "Say yes. Yes!", ("Say yes.", "Yes", "Yes!")),  # one reply is a prefix of the other
        ("Hi there. Hello", "Hi there.  Hello", ("Hi there.", "Hello", "Hello")),  # identical after the cut
    ],
)
def test_implicit_prompt_is_the_shared_prefix_cut_at_whitespace(chosen, rejected, expected):
    prompt, c, r = implicit_prompt(chosen, rejected)
    assert (prompt[0]["content"], c, r) == expected and prompt == [USER(expected[0])]


def test_implicit_prompt_pairs_in_a_file(tmp_path):
    rows = [
        {"chosen": "What is two plus two? Four.", "rejected": "What is two plus two? Five."},
        {"chosen": "Red.", "rejected": "Blue."},  # nothing shared: skipped and listed
        {"chosen": "Same answer", "rejected": "Same answer"},
    ]
    assert detect_format(rows[0]) == "pairwise"
    train, report, path = load(tmp_path, rows)
    assert train == [PreferencePair([USER("What is two plus two?")], "Four.", "Five.", source=f"{path}:1")]
    assert report.skipped == {"prefix_mismatch": 1, "identical_responses": 1}
    assert report.mismatched == [f"{path}:2"]
    with pytest.raises(DataError, match=r"data\.jsonl:2: prefix_mismatch: .*share no whole word; give a 'prompt' field"):
        load(tmp_path, rows, strict=True)


# ---- SFT on comparison files ----------------------------------------------------------------------


def test_sft_reads_comparisons_as_their_chosen_reply(tmp_path, tiny_tokenizer, capsys):
    rows = [
        {"prompt": "q1", "chosen": "good 1", "rejected": "bad 1"},
        {"prompt": "q2", "responses": ["mid", "", "best", "worst"], "ranking": [1, 2, 0, 3]},  # best is empty
        {"prompt": "q3", "responses": ["b", "a"], "ranks": [2, 1]},
        {"prompt": "q4", "chosen": "", "rejected": "bad"},  # counted as the comparison would be
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = prepare_data(DataConfig(path=str(path), shuffle=False), tiny_tokenizer, 0, expect=("SFTExample",), name="sft")
    assert data.train_records == [
        SFTExample([USER("q1")], "good 1", source=f"{path}:1"),
        SFTExample([USER("q2")], "best", source=f"{path}:2"),  # the best non-empty reply of the ranking
        SFTExample([USER("q3")], "a", source=f"{path}:3"),
    ]
    assert data.report.skipped == {"empty_response": 1}
    assert "holds comparisons (format pairwise, ranked): training on the chosen reply" in capsys.readouterr().out
    # The items are the plain SFT items of those demonstrations.
    reference, _ = tokenize_records(data.train_records, tiny_tokenizer, max_length=512, max_prompt_length=384)
    assert data.train == reference


def test_sft_cli_on_hh_trains_on_chosen_and_the_format_hint_works(tiny_dir, tmp_path, capsys):
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(HH_SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:6]), encoding="utf-8")
    common = [f"model.path={tiny_dir}", f"data.path={hh}", "optim.max_steps=1", "optim.batch_size=2",
              "data.max_length=64", "data.max_prompt_length=32", "run.progress=false", "run.report_to=jsonl"]
    assert main(["sft", *common, f"run.output_dir={tmp_path / 'a'}"]) == 0
    assert "holds comparisons (format hh): training on the chosen reply" in capsys.readouterr().out
    # An explicit data.format=sft on comparisons says what to do instead, and that works (above).
    assert main(["sft", *common, "data.format=sft", f"run.output_dir={tmp_path / 'b'}"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"hh\.jsonl:\d: format 'sft' needs 'prompt' and 'completion'", err) and "Leave data.format=auto" in err


def test_wrong_data_for_a_command_names_the_command_that_reads_it(tiny_tokenizer, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    with pytest.raises(ValueError, match=r"format 'prompt'.*PromptExample \(read by `alignkit ppo, grpo, rloo, rs`\).*"
                                         r"`alignkit sft` reads the formats sft .*text \(text\)"):
        prepare_data(DataConfig(path=str(prompts)), tiny_tokenizer, 0, expect=("SFTExample",), name="sft")
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(ValueError, match=r"format 'sft'.*read by `alignkit sft`.*`alignkit dpo` reads the formats ranked"):
        prepare_data(DataConfig(path=str(sft)), tiny_tokenizer, 0, expect=("PreferencePair",), name="dpo")


# ---- mixed-format files ---------------------------------------------------------------------------


def hh_row(q, a, b):
    return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"}


def test_hh_rows_then_pairwise_rows_are_each_read_as_what_they_are(tmp_path):
    rows = [hh_row(f"h{i}", "yes", "no") for i in range(3)] + [
        {"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    train, report, path = load(tmp_path, rows)
    assert len(train) == 7 and report.skipped == {}
    assert [p.prompt[0]["content"] for p in train] == ["h0", "h1", "h2", "p0", "p1", "p2", "p3"]
    assert report.formats == {"hh": 3, "pairwise": 4} and "formats hh 3 rows, pairwise 4 rows" in report.summary()
    train, report, _ = load(tmp_path, rows[3:] + rows[:3])  # pairwise first
    assert len(train) == 7 and report.format == "pairwise"
    # Given format=hh, a pairwise row is an error naming it, never a "malformed transcript" skip.
    with pytest.raises(DataError, match=r"data\.jsonl:4: field 'chosen' is not an HH-RLHF transcript"):
        load(tmp_path, rows, format="hh")


def test_a_row_of_another_kind_stops_the_read_naming_both_formats(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "q", "response": "r", "score": 2}]
    with pytest.raises(DataError, match=r"data\.jsonl:4: this row is in format 'ratings' .*first row \(.*data\.jsonl:1\) "
                                        r"is in format 'pairwise'.*RatedExample vs PreferencePair.*split the file"):
        load(tmp_path, rows)


def test_a_row_missing_a_field_of_the_file_format_names_the_field(tmp_path):
    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}]
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'rejected'"):
        load(tmp_path, pairs)
    unpaired = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "a"}]
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'label'"):
        load(tmp_path, unpaired)
    ratings = [{"prompt": "q", "response": "a", "score": 1}, {"prompt": "q", "response": "a"}]
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'score'"):
        load(tmp_path, ratings)


# ---- rows to score ---------------------------------------------------------------------------------


def test_score_without_a_score_column(tiny_dir, tmp_path):
    from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model
    from alignkit.config import ModelConfig
    from alignkit.rollout.rewards import RewardModel

    rm = save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), tmp_path / "rm")
    rows = [{"prompt": "What colour is item 1?", "response": "Blue."}, {"prompt": "Hi?", "response": "Hello.", "score": 3}]
    assert detect_format(rows[0]) == "response"
    train, _, path = load(tmp_path, rows[:1])
    assert train == [ResponseExample([USER("What colour is item 1?")], "Blue.", source=f"{path}:1")]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    dest = tmp_path / "scores.jsonl"
    assert main(["score", f"model.path={rm}", f"data.path={data}", f"output={dest}"]) == 0
    scored = [json.loads(line) for line in dest.read_text().splitlines()]
    expected = RewardModel(str(rm))([[USER(r["prompt"])] for r in rows], [r["response"] for r in rows]).tolist()
    assert [s["score"] for s in scored] == pytest.approx(expected, abs=1e-5)
    assert [s["label"] for s in scored] == [None, 3.0]


@pytest.mark.parametrize("score", [1e39, -1e39, 10**400, "1e39"])
def test_numbers_beyond_float32_are_errors_not_infinite_losses(tmp_path, score):
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'score' must be a finite number within float32's range"):
        load(tmp_path, [{"prompt": "q", "response": "r", "score": score}])
    train, _, _ = load(tmp_path, [{"prompt": "q", "response": "r", "score": 3.0e38}])
    assert train[0].score == 3.0e38
