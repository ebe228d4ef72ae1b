"""Prompts for the online methods: prompt-only rows, any format with a prompt, the data report."""

from __future__ import annotations

import pytest

from alignkit.config import DataConfig, ModelConfig
from alignkit.data import DataError, encode_prompt, read_prompts
from alignkit.train.online import load_prompts

from conftest import write_jsonl

USER = lambda text: {"role": "user", "content": text}  # noqa: E731


def test_prompt_only_rows_as_strings_and_messages_with_every_skip_counted(tmp_path):
    rows = [
        {"prompt": "How do I bake bread?"},
        {"prompt": [{"role": "system", "content": "Be brief."}, USER("Tell me a joke")]},
        {"prompt": "   "},  # empty: skipped and counted, never silently dropped
        {"prompt": " How do I bake bread? "},  # the same prompt once stripped
        {"prompt": [USER("")]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts, report = read_prompts(path)
    assert prompts == [[USER("How do I bake bread?")], [{"role": "system", "content": "Be brief."}, USER("Tell me a joke")]]
    assert report.format == "prompt" and (report.read, report.kept) == (5, 2)
    assert report.skipped == {"empty_prompt": 2, "duplicate_prompt": 1}
    assert report.skip_examples == {"empty_prompt": [f"{path}:3", f"{path}:5"], "duplicate_prompt": [f"{path}:4"]}


def test_long_prompts_are_counted_as_truncated_against_the_generation_ids(tmp_path, tiny_tokenizer):
    texts = ["short?", "word " * 40, "Hi.", "colour " * 30]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    limit = 20
    # Reference: the prompt ids generation sees (and cuts to the last `limit` tokens).
    long_rows = [i + 1 for i, t in enumerate(texts) if len(encode_prompt(tiny_tokenizer, [USER(t.strip())])) > limit]
    assert long_rows == [2, 4]
    prompts, report = read_prompts(path, tokenizer=tiny_tokenizer, max_prompt_length=limit)
    assert len(prompts) == 4 and report.tokenized == 4
    assert (report.truncated, report.truncated_prompt, report.truncated_response) == (2, 2, 0)
    assert report.truncated_examples == [f"{path}:{i}" for i in long_rows]
    assert "truncated 2 (prompt 2" in report.summary()


def test_prompts_from_every_format_and_mixed_rows(tmp_path):
    rows = [
        {"prompt": "q1", "completion": "a"},  # sft
        {"prompt": "q2", "chosen": "x", "rejected": "x"},  # pairwise: identical replies do not matter here
        {"chosen": "\n\nHuman: q3\n\nAssistant: a", "rejected": "\n\nHuman: q3\n\nAssistant: b"},  # hh
        {"prompt": "q4", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},  # ranked: one prompt, not 3
        {"prompt": "q5", "response": "r", "score": 1},  # ratings
        {"prompt": "q6", "completion": "c", "label": True},  # unpaired
        {"messages": [USER("q7"), {"role": "assistant", "content": "a"}]},  # sft messages
        {"prompt": "q8"},
        {"chosen": "Question nine? Yes.", "rejected": "Question nine? No."},  # implicit prompt
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts, report = read_prompts(path)
    assert prompts == [[USER(q)] for q in ["q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8", "Question nine?"]]
    assert report.skipped == {}
    assert report.formats == {"sft": 2, "pairwise": 2, "hh": 1, "ranked": 1, "ratings": 1, "unpaired": 1, "prompt": 1}
    assert "formats sft 2 rows" in report.summary()


def test_text_rows_have_no_prompts(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "just a document"}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: a row of format 'text' .*has no prompt.*'prompt' field"):
        read_prompts(path)
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q"}, {"text": "a document"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: this row is in format 'text'.*first row \(.*m\.jsonl:1\) is in format 'prompt'"):
        read_prompts(mixed)


def test_load_prompts_prints_the_report_and_nothing_usable_is_an_error(tmp_path, capsys, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a?"}, {"prompt": ""}, {"prompt": "a?"}])
    data = DataConfig(path=str(path), max_prompt_length=4)
    assert load_prompts(data, 0, tiny_tokenizer) == [[USER("a?")]]
    out = capsys.readouterr().out
    assert "1 distinct prompts" in out and "read 3 rows, kept 1" in out
    assert "empty_prompt: 1" in out and "duplicate_prompt: 1" in out and "tokenized 1" in out
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": " "}])
    with pytest.raises(DataError, match=r"(?s)no usable prompts.*empty_prompt: 1"):
        load_prompts(DataConfig(path=str(empty)))


def test_grpo_cli_on_a_prompt_only_file(tiny_dir, tmp_path, capsys):
    from alignkit.cli import main
    from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model

    rm = save_model(load_scalar_head_model(ModelConfig(path=str(tiny_dir))), load_tokenizer(str(tiny_dir)), tmp_path / "rm")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Item {i}?"} for i in range(4)] + [{"prompt": ""}])
    code = main(["grpo", f"model.path={tiny_dir}", f"data.path={data}", f"reward_models=[{rm}]", "num_rollouts=1",
                 "prompts_per_rollout=2", "samples_per_prompt=2", "optim.batch_size=4", "max_new_tokens=4",
                 f"run.output_dir={tmp_path / 'out'}", "run.progress=false", "run.report_to=jsonl"])
    out = capsys.readouterr().out
    assert code == 0 and "4 distinct prompts" in out and "empty_prompt: 1" in out


def test_a_null_prompt_in_the_first_row_is_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": None}, {"prompt": "q"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: cannot tell the data format from the fields \['prompt'\] "
                                        r"\(empty or null: \['prompt'\], which count as missing\)"):
        read_prompts(path)
    later = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "q"}, {"prompt": None}])
    with pytest.raises(DataError, match=r"l\.jsonl:2: missing field 'prompt'"):
        read_prompts(later)
