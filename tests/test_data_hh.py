"""HH-RLHF transcripts, checked on all 1,500 real rows of the shared sample."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from alignkit.data import DataError, load_dataset_records, parse_hh_transcript, tokenize_records
from alignkit.models.factory import DEFAULT_CORPUS, train_tokenizer

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-sample.jsonl"


@pytest.fixture(scope="module")
def hh():
    train, evals, report = load_dataset_records(HH, shuffle=False)
    return train, evals, report


def test_all_rows_parse_with_the_odd_ones_reported(hh):
    train, evals, report = hh
    assert report.format == "hh"
    assert (report.read, report.kept, len(train), len(evals)) == (1500, 1495, 1495, 0)
    # Four transcripts have an empty chosen reply ("...\n\nAssistant: ").
    assert report.skipped == {"empty_response": 4, "prefix_mismatch": 1}
    assert report.skip_examples["empty_response"] == [f"{HH}:{n}" for n in (87, 517, 926, 1104)]
    # Line 1255: chosen's last assistant turn embeds "  Human: ..." with no blank line, so its
    # dialogue has one more assistant turn than rejected's: listed, not kept or dropped silently.
    assert report.mismatched == [f"{HH}:1255"]
    assert f"{HH}:1255" in report.summary()


def test_strict_makes_the_mismatch_an_error(hh):
    with pytest.raises(DataError, match=rf"{re.escape(str(HH))}:1255: prefix_mismatch: .*chosen has 4 turns before its reply, rejected 3"):
        load_dataset_records(HH, strict=True)


def test_prompt_turn_counts(hh):
    train, _, _ = hh
    human_turns = Counter(sum(m["role"] == "user" for m in p.prompt) for p in train)
    assert dict(human_turns) == {
        1: 439, 2: 381, 3: 375, 4: 214, 5: 50, 6: 13, 7: 11, 8: 3, 9: 5, 10: 1, 11: 1, 12: 1, 18: 1
    }
    roles = Counter(m["role"] for p in train for m in p.prompt)
    assert roles == {"user": 3707, "assistant": 2215}
    assert all(p.prompt[-1]["role"] == "user" for p in train)
    # Three dialogues hold two assistant turns in a row (lines 668, 764, 1320): kept as they are.
    doubled = [p.source for p in train if any(a["role"] == b["role"] for a, b in zip(p.prompt, p.prompt[1:]))]
    assert doubled == [f"{HH}:{n}" for n in (668, 764, 1320)]


def test_every_kept_pair_rebuilds_its_raw_transcripts(hh):
    """prompt + reply, written back as a transcript, is the raw text up to whitespace at turn edges."""
    train, _, _ = hh
    raw = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]
    squash = lambda s: " ".join(s.split())  # noqa: E731
    for pair in train:
        row = raw[int(pair.source.rsplit(":", 1)[1]) - 1]
        turns = "".join(
            f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in pair.prompt
        )
        assert squash(turns + "\n\nAssistant: " + pair.chosen) == squash(row["chosen"])
        assert squash(turns + "\n\nAssistant: " + pair.rejected) == squash(row["rejected"])
        assert pair.chosen and pair.rejected and pair.chosen != pair.rejected
        assert pair.chosen == pair.chosen.strip() and all(m["content"] == m["content"].strip() for m in pair.prompt)


def test_spot_check_first_row(hh):
    first = hh[0][0]
    assert first.source == f"{HH}:1"
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.prompt[1]["content"] == "Are you looking for practical joke ideas?"
    assert first.prompt[2]["content"] == "yep"
    assert first.prompt[3]["content"].startswith("Ok, I’ll give you a couple examples")
    assert first.prompt[3]["content"].endswith("you will find a new place to watch.")
    assert "\n\n2. Make a list of jokes" in first.prompt[3]["content"]  # blank lines inside a turn stay
    assert first.prompt[4]["content"] == "okay some of these do not have anything to do with pens"
    assert first.chosen == (
        "No, sorry!  All of these involve a pen, the point is that you can get funny results by "
        "doing pranks with pens."
    )
    assert first.rejected.startswith("There are lots of funny things you can do with pens")
    assert first.rejected.endswith("It’s really funny.")
    assert first.margin == 0.0 and first.weight == 1.0 and first.group == -1


def test_whole_sample_tokenises_with_exact_boundaries_and_counted_truncation(hh):
    train, _, report = hh
    tok = train_tokenizer(DEFAULT_CORPUS, vocab_size=512)
    items, report = tokenize_records(train, tok, max_length=256, max_prompt_length=128, report=report)
    assert len(items) == report.tokenized == 1495
    tail = tok(" Assistant:", add_special_tokens=False)["input_ids"][-2:]  # "Assistant" ":"
    long_prompts = 0
    for item, pair in zip(items, train):
        full_prompt = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
        full_ids = tok(full_prompt, add_special_tokens=False)["input_ids"]
        long_prompts += len(full_ids) > 128
        assert item["prompt_ids"] == full_ids[-128:]  # the end of the conversation is kept
        assert item["prompt_ids"][-2:] == tail
        assert item["length"] <= 256
    assert report.truncated_prompt == long_prompts > 0
    assert report.truncated >= report.truncated_prompt


def test_transcript_variants():
    # No leading blank line, stray whitespace, and "Human:" inside a turn that is not a new turn.
    text = "Human:  hi there \n\nAssistant: said Human: hello\n\n\nHuman: bye  "
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "said Human: hello"},
        {"role": "user", "content": "bye"},
    ]
    assert parse_hh_transcript("Be brief.\n\nHuman: q\n\nAssistant: a")[0] == {"role": "system", "content": "Be brief."}


def test_malformed_transcripts_are_reported_or_strict_errors(tmp_path):
    path = tmp_path / "hh.jsonl"
    rows = [
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "Human: q\n\nAssistant: a", "rejected": "Human: Q\n\nAssistant: b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    train, _, report = load_dataset_records(path, shuffle=False)
    assert [(p.chosen, p.rejected) for p in train] == [("a", "b")]
    assert report.skipped == {"malformed_transcript": 1, "prefix_mismatch": 1}
    assert report.skip_examples["malformed_transcript"] == [f"{path}:2"]
    assert report.mismatched == [f"{path}:3"]
    with pytest.raises(DataError, match=r"hh\.jsonl:2: malformed_transcript: 'chosen' does not end with an Assistant turn"):
        load_dataset_records(path, shuffle=False, strict=True)
