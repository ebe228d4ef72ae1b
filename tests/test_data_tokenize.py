"""Tokenisation: chat rendering, the exact prompt/response boundary, the end of turn, truncation.
(The token ids in the chat-template styles of real families are checked in test_chat_templates.py.)"""

from __future__ import annotations

import copy

import pytest

from alignkit.data import (
    IGNORE_INDEX,
    DataReport,
    PreferencePair,
    RatedExample,
    SFTExample,
    UnpairedExample,
    encode_prompt,
    plain_chat,
    chat_format,
    render_prompt,
    tokenize_pair,
    tokenize_rated,
    tokenize_records,
    tokenize_sft,
    tokenize_unpaired,
)
from alignkit.models.factory import DEFAULT_CORPUS, train_tokenizer

from chat_styles import trained_runs

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
ASSISTANT = lambda text: {"role": "assistant", "content": text}  # noqa: E731
CONVERSATION = [
    {"role": "system", "content": "Be helpful."},
    USER("What is 2 plus 3?"),
    ASSISTANT("5."),
    USER("And the capital of France?"),
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DEFAULT_CORPUS, vocab_size=512)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_default_is_the_factory_template(tok):
    expected = (
        "Be helpful.\n\nHuman: What is 2 plus 3?\n\nAssistant: 5.<eos>\n\n"
        "Human: And the capital of France?\n\nAssistant:"
    )
    assert render_prompt(tok, CONVERSATION) == expected  # through the chat template
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    assert render_prompt(bare, CONVERSATION) == expected  # through the documented default
    assert plain_chat(CONVERSATION, "<eos>") == expected


def test_sft_boundary_eos_and_labels(tok):
    ex = SFTExample(CONVERSATION, "The capital of France is Paris.", "x:1")
    item = tokenize_sft(ex, tok)
    prompt = ids(tok, render_prompt(tok, CONVERSATION))
    # the plain layout ends a reply with EOS, then the blank line its template renders after a turn
    response = ids(tok, " The capital of France is Paris.") + [tok.eos_token_id] + ids(tok, "\n\n")
    assert item["input_ids"] == prompt + response
    assert item["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert encode_prompt(tok, CONVERSATION) == prompt  # what generation feeds the policy
    assert item["length"] == len(prompt) + len(response)
    assert tok.decode(item["input_ids"]) == render_prompt(tok, CONVERSATION) + " The capital of France is Paris.<eos>\n\n"


def test_pair_unpaired_rated_items(tok):
    pair = PreferencePair([USER("Hi?")], "Hello there.", "Go away.", margin=2.0, group=7, weight=0.25)
    item = tokenize_pair(pair, tok)
    prompt = ids(tok, "Human: Hi?\n\nAssistant:")
    chosen = ids(tok, " Hello there.") + [tok.eos_token_id] + ids(tok, "\n\n")
    rejected = ids(tok, " Go away.") + [tok.eos_token_id] + ids(tok, "\n\n")
    assert item == {
        "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "margin": 2.0,
        "weight": 0.25, "group": 7, "length": len(prompt) + max(len(chosen), len(rejected)),
    }
    un = tokenize_unpaired(UnpairedExample([USER("Hi?")], "Hello there.", False), tok)
    assert un == {"prompt_ids": prompt, "completion_ids": chosen, "label": False, "length": len(prompt) + len(chosen)}
    rated = tokenize_rated(RatedExample([USER("Hi?")], "Go away.", -1.5), tok)
    assert rated == {"prompt_ids": prompt, "response_ids": rejected, "score": -1.5, "length": len(prompt) + len(rejected)}
    with pytest.raises(TypeError, match="expected a PreferencePair, got SFTExample"):
        tokenize_pair(SFTExample([USER("a")], "b"), tok)


def test_a_template_without_an_end_of_turn_gets_eos_after_each_reply(tok):
    t = copy.deepcopy(tok)
    # renders nothing a model could stop at after a reply: alignkit inserts EOS before its newline
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    fmt = chat_format(t)
    assert (fmt.end_of_turn, fmt.trailer, fmt.inserted, fmt.stop_ids) == ("<eos>", "\n", True, (t.eos_token_id,))
    item = tokenize_sft(SFTExample([USER("Hi?")], "Hello."), t)
    assert item["input_ids"] == ids(t, "<user>Hi?\n<assistant>") + ids(t, "Hello.") + [t.eos_token_id] + ids(t, "\n")
    messages = [USER("a?"), ASSISTANT("b."), USER("c?"), ASSISTANT("d.")]
    multi = tokenize_sft(SFTExample(messages[:3], "d.", messages=messages), t)
    assert t.decode(multi["input_ids"]) == "<user>a?\n<assistant>b.<eos>\n<user>c?\n<assistant>d.<eos>\n"
    assert trained_runs(t, multi) == ["b.<eos>\n", "d.<eos>\n"]


def test_a_template_that_renders_the_prompt_differently_before_a_reply(tok, caplog):
    t = copy.deepcopy(tok)
    # the generation prompt ends with a newline, but a rendered reply follows "<assistant>" directly:
    # the response is then put after the prompt as generation sees it, with the end of turn
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<assistant>\\n' }}{% endif %}")
    with caplog.at_level("WARNING"):
        item = tokenize_sft(SFTExample([USER("Hi?")], "Hello."), t)
    assert "renders a conversation's start differently" in caplog.text
    assert item["input_ids"] == ids(t, "<user>Hi?<eos><assistant>\n") + ids(t, "Hello.") + [t.eos_token_id]
    # an earlier assistant turn of a messages row cannot be located then: a clear error, and the way out
    messages = [USER("a?"), ASSISTANT("b."), USER("c?"), ASSISTANT("d.")]
    example = SFTExample(messages[:3], "d.", source="chat.jsonl:9", messages=messages)
    with pytest.raises(ValueError, match=r"chat.jsonl:9: the chat template renders the conversation before assistant "
                                         r"turn 1 differently .*data.assistant_turns=last"):
        tokenize_sft(example, t)
    assert trained_runs(t, tokenize_sft(example, t, assistant_turns="last")) == ["d.<eos>"]


def test_bos_is_added_once_when_the_tokenizer_adds_it(tok):
    from tokenizers import processors

    t = copy.deepcopy(tok)
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", t.bos_token_id)]
    )
    assert t("Hi")["input_ids"][0] == t.bos_token_id
    item = tokenize_sft(SFTExample([USER("Hi?")], "Hello."), t)
    assert item["input_ids"][0] == t.bos_token_id and item["input_ids"][1] != t.bos_token_id
    assert item["input_ids"][1:] == tokenize_sft(SFTExample([USER("Hi?")], "Hello."), tok)["input_ids"]
    # a template that renders BOS itself does not get a second one
    t.chat_template = "{{ bos_token }}" + t.chat_template
    again = tokenize_sft(SFTExample([USER("Hi?")], "Hello."), t)
    assert again["input_ids"] == item["input_ids"]


def test_truncation_keeps_the_prompt_end_then_cuts_responses_and_is_counted(tok):
    long_prompt = [USER("the quick brown fox " * 20)]
    pair = PreferencePair(long_prompt, "The capital of France is Paris. " * 3, "No.", source="d:1")
    full = tokenize_pair(pair, tok)
    short = PreferencePair([USER("Hi")], "Ok", "No", source="d:2")
    report = DataReport()
    items, report = tokenize_records([pair, short], tok, max_length=40, max_prompt_length=24, report=report)
    cut = items[0]
    assert cut["prompt_ids"] == full["prompt_ids"][-24:]  # the END of the prompt survives
    assert cut["prompt_ids"][-2:] == ids(tok, " Assistant:")[-2:]
    assert cut["chosen_ids"] == full["chosen_ids"][:16]  # the chosen reply loses its end (and EOS)
    assert tok.eos_token_id not in cut["chosen_ids"]
    assert cut["rejected_ids"] == full["rejected_ids"]  # short enough: untouched, keeps EOS
    assert cut["length"] == 40
    assert items[1] == tokenize_pair(short, tok)
    assert (report.tokenized, report.truncated, report.truncated_prompt, report.truncated_response) == (2, 1, 1, 1)
    assert report.truncated_examples == ["d:1"]


def test_prompt_alone_over_max_length_leaves_one_response_token(tok):
    ex = SFTExample([USER("the quick brown fox " * 20)], "Paris.", source="d:3")
    full = tokenize_sft(ex, tok)
    report = DataReport()
    item = tokenize_sft(ex, tok, max_length=10, report=report)
    prompt_len = sum(1 for x in full["labels"] if x == IGNORE_INDEX)
    assert item["input_ids"] == full["input_ids"][prompt_len - 9 : prompt_len + 1]
    assert item["labels"] == [IGNORE_INDEX] * 9 + [full["input_ids"][prompt_len]]
    assert (report.truncated, report.truncated_prompt, report.truncated_response) == (1, 1, 1)


def test_length_options_are_checked(tok):
    ex = SFTExample([USER("a")], "b")
    with pytest.raises(ValueError, match=r"max_prompt_length \(8\) must be below max_length \(8\)"):
        tokenize_sft(ex, tok, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize_records([ex], tok, max_length=1)


def test_tokenize_records_mixes_types_and_shares_prompts(tok):
    records = [
        SFTExample([USER("a")], "b"),
        PreferencePair([USER("a")], "b", "c"),
        UnpairedExample([USER("a")], "b", True),
        RatedExample([USER("a")], "b", 1.0),
    ]
    items, report = tokenize_records(records, tok)
    assert [sorted(i) for i in items] == [
        ["input_ids", "labels", "length"],
        ["chosen_ids", "group", "length", "margin", "prompt_ids", "rejected_ids", "weight"],
        ["completion_ids", "label", "length", "prompt_ids"],
        ["length", "prompt_ids", "response_ids", "score"],
    ]
    assert items[1]["prompt_ids"] == items[2]["prompt_ids"] == items[3]["prompt_ids"]
    assert report.tokenized == 4 and report.truncated == 0


def test_shuffled_ranking_pairs_render_each_response_once_and_equal_one_by_one(tok, monkeypatch):
    """A ranking of 4 responses expanded to 6 pairs and shuffled among other prompts' pairs: the
    items equal tokenising each pair on its own, while the chat template renders each prompt and
    each (prompt, reply) once, not once per pair (the cost the encoder's memory exists to save)."""
    import itertools
    import random

    import alignkit.data.tokenize as T

    prompts = [[USER(f"question {k}")] for k in range(3)]
    prompts += [[{"role": "system", "content": "Be brief."}, *p] for p in prompts]
    replies = ["one", "two two", "three three three", "four"]
    pairs = [PreferencePair(p, a, b) for p in prompts for a, b in itertools.combinations(replies, 2)]
    random.Random(0).shuffle(pairs)
    one_by_one = [tokenize_pair(pair, tok, max_length=40, max_prompt_length=20) for pair in pairs]
    calls = []
    real = T.render
    monkeypatch.setattr(T, "render", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    items, report = tokenize_records(pairs, tok, max_length=40, max_prompt_length=20)
    assert items == one_by_one and report.tokenized == len(pairs)
    calls = [c for c in calls if T._SENTINEL not in str(c)]  # the template's end of turn, read once
    assert len(calls) == len(prompts) * (1 + len(replies))  # each prompt, then each reply to it, once
    # Items never share a list with the encoder's memory or with each other.
    same_reply = [(i, j) for i, j in itertools.combinations(range(len(items)), 2)
                  if pairs[i].prompt == pairs[j].prompt and pairs[i].chosen == pairs[j].chosen]
    assert same_reply and all(items[i]["chosen_ids"] is not items[j]["chosen_ids"] for i, j in same_reply)


def test_encode_responses_takes_any_iterable_and_the_encoder_forgets_a_prompt_after_its_last_use(tok):
    """encode_responses counts each prompt's uses before encoding: prompts given as an iterator
    (spent by that count) still give one item per response, equal to the list's. The encoder
    forgets a prompt and its replies at its last counted use, so its memory holds only prompts
    still to come."""
    from alignkit.data import encode_responses
    from alignkit.data.tokenize import _Encoder

    prompts = [[USER("question 1")], [USER("question 2")], [USER("question 1")]]
    replies = ["one", "two", "one"]
    want = encode_responses(tok, prompts, replies)
    assert len(want) == 3 and want[0] == want[2]
    assert encode_responses(tok, iter(prompts), replies) == want
    enc = _Encoder(tok)
    enc.expect(prompts)
    for k, (p, r) in enumerate(zip(prompts, replies)):
        enc.response(p, r)
        enc.done(p)
        if k == 1:  # question 1 has a use to come, question 2 none
            assert len(enc._prompts) == 1 and len(enc._replies) == 1
    assert enc._prompts == {} and enc._replies == {}
