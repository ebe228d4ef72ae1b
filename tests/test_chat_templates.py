"""Conformance of the rendered token ids with the chat templates of real model families.

For each template style of tests/chat_styles.py (ChatML with EOS ≠ end of turn, Llama 3, Gemma,
Mistral [INST], and no template), the ids alignkit trains on must be the ids
``apply_chat_template`` gives for the same conversation, the end of turn and the trailing text
included; multi-turn SFT trains exactly the assistant turns; generation stops at the end of turn.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.data import (
    IGNORE_INDEX,
    PreferencePair,
    RatedExample,
    SFTExample,
    UnpairedExample,
    chat_format,
    encode_prompt,
    load_dataset_records,
    plain_chat,
    stop_token_ids,
    tokenize_records,
    tokenize_sft,
)
from alignkit.data.report import DataError

from chat_styles import END_OF_TURN, STYLES, styled_tokenizer, trained_runs
from conftest import write_jsonl

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
ASSISTANT = lambda text: {"role": "assistant", "content": text}  # noqa: E731
SYSTEM = {"role": "system", "content": "Be brief."}

PROMPTS = {
    "single": [USER("What colour is item 3?")],
    "system": [SYSTEM, USER("What colour is item 3?")],
    "multi": [SYSTEM, USER("What is 2 plus 3?"), ASSISTANT("2 plus 3 is 5."), USER("And the colour of item 7?")],
}


def reference(tok, messages, add_generation_prompt=False) -> list[int]:
    """What the tokenizer's own template gives (the plain layout for a template-less tokenizer)."""
    if tok.chat_template is None:
        text = plain_chat(messages, tok.eos_token, add_generation_prompt)
        return tok(text, add_special_tokens=False)["input_ids"]
    return list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)["input_ids"])


@pytest.fixture(scope="module", params=list(STYLES))
def styled(request):
    return request.param, styled_tokenizer(request.param)


def test_end_of_turn_is_read_from_the_template(styled):
    style, tok = styled
    fmt = chat_format(tok)
    assert (fmt.end_of_turn, fmt.trailer) == END_OF_TURN[style]
    assert fmt.end_of_turn_id == tok.convert_tokens_to_ids(END_OF_TURN[style][0])
    assert set(stop_token_ids(tok)) == {fmt.end_of_turn_id, tok.eos_token_id}
    assert not fmt.inserted


@pytest.mark.parametrize("shape", list(PROMPTS))
def test_prompt_and_response_ids_equal_apply_chat_template(styled, shape):
    style, tok = styled
    prompt = PROMPTS[shape]
    chosen, rejected = "The colour of item 7 is blue.", "No."
    full = lambda reply: reference(tok, prompt + [ASSISTANT(reply)])  # noqa: E731
    generation_prompt = reference(tok, prompt, add_generation_prompt=True)
    assert encode_prompt(tok, prompt) == generation_prompt  # what a policy is sampled from
    records = [PreferencePair(prompt, chosen, rejected), SFTExample(prompt, chosen),
               UnpairedExample(prompt, rejected, False), RatedExample(prompt, chosen, 1.0)]
    pair, sft, unpaired, rated = tokenize_records(records, tok)[0]
    assert pair["prompt_ids"] == generation_prompt
    assert pair["prompt_ids"] + pair["chosen_ids"] == full(chosen)
    assert pair["prompt_ids"] + pair["rejected_ids"] == full(rejected)
    assert sft["input_ids"] == full(chosen)
    assert sft["labels"] == [IGNORE_INDEX] * len(generation_prompt) + pair["chosen_ids"]
    assert unpaired["prompt_ids"] + unpaired["completion_ids"] == full(rejected)
    assert rated["prompt_ids"] + rated["response_ids"] == full(chosen)
    eot, trailer = END_OF_TURN[style]
    assert tok.decode(pair["chosen_ids"]).endswith(chosen + eot + trailer)  # no EOS where the turn ends otherwise
    assert sft["input_ids"].count(tok.bos_token_id) == (tok.bos_token_id is not None)  # one BOS, never two


EXPECTED_TURNS = {  # what is trained of the conversation below: each assistant turn and its ending
    "chatml": ["2 plus 3 is 5.<|im_end|>\n", "Blue.<|im_end|>\n"],
    "llama3": ["2 plus 3 is 5.<|eot_id|>", "Blue.<|eot_id|>"],
    "gemma": ["2 plus 3 is 5.<end_of_turn>\n", "Blue.<end_of_turn>\n"],
    "mistral": [" 2 plus 3 is 5.</s>", " Blue.</s>"],
    "plain": [" 2 plus 3 is 5.<eos>\n\n", " Blue.<eos>\n\n"],
}


def test_multi_turn_sft_trains_every_assistant_turn(styled):
    style, tok = styled
    messages = PROMPTS["multi"] + [ASSISTANT("Blue.")]
    example = SFTExample(messages[:-1], "Blue.", messages=messages)
    item = tokenize_sft(example, tok)
    assert item["input_ids"] == reference(tok, messages)
    assert trained_runs(tok, item) == EXPECTED_TURNS[style]
    last = tokenize_sft(example, tok, assistant_turns="last")
    assert last["input_ids"] == item["input_ids"] and trained_runs(tok, last) == EXPECTED_TURNS[style][1:]
    # prompt/completion records keep their prompt as context, assistant turns included
    assert tokenize_sft(SFTExample(messages[:-1], "Blue."), tok) == last
    # prompt truncation keeps the end (the latest turns); labels stay with their tokens
    n_context = max(i for i, x in enumerate(item["labels"]) if x == IGNORE_INDEX) + 1
    cut = tokenize_sft(example, tok, max_prompt_length=n_context - 3)
    assert cut["input_ids"] == item["input_ids"][3:] and cut["labels"] == item["labels"][3:]
    with pytest.raises(ValueError, match="assistant_turns must be one of"):
        tokenize_sft(example, tok, assistant_turns="first")


TOOL_CONVERSATION = [
    USER([{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]),
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "20 C", "tool_call_id": "0"},
    ASSISTANT("It is 20 C."),
]


def test_tool_roles_and_list_content_from_a_messages_row(tmp_path):
    tok = styled_tokenizer("chatml")
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": TOOL_CONVERSATION}])
    (record,), _, _ = load_dataset_records(data, shuffle=False)
    assert record.prompt[0] == USER("Weather in Paris?") and record.prompt[-1]["role"] == "tool"
    item = tokenize_sft(record, tok)
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "Weather in Paris?" if m["content"] else ""}
            for m in TOOL_CONVERSATION]
    assert item["input_ids"] == reference(tok, flat)
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    assert trained_runs(tok, item) == [call, "It is 20 C.<|im_end|>\n"]  # the tool result is context


def test_tool_roles_in_the_plain_layout():
    tok = styled_tokenizer("plain")
    record = SFTExample(TOOL_CONVERSATION[:-1], "It is 20 C.", messages=TOOL_CONVERSATION)
    item = tokenize_sft(record, tok)
    assert tok.decode(item["input_ids"]) == (
        'Human: Weather in Paris?\n\nAssistant: Tool call: {"name": "weather", "arguments": {"city": "Paris"}}<eos>\n\n'
        "Tool: 20 C\n\nAssistant: It is 20 C.<eos>\n\n")
    assert trained_runs(tok, item)[0].startswith(' Tool call: {"name": "weather"')


@pytest.mark.parametrize("row, message", [
    ({"messages": [USER([{"type": "image", "url": "x.png"}]), ASSISTANT("a")]},
     r"field 'messages\[0\]\.content\[0\]' is a 'image' part; only text parts"),
    ({"messages": [USER("u"), {"role": "assistant", "content": "", "tool_calls": "weather()"}]},
     r"field 'messages\[1\]\.tool_calls' must be a list of calls"),
    ({"messages": [{"role": "tool", "content": "x", "tool_calls": []}, ASSISTANT("a")]},
     r"field 'messages\[0\]\.tool_calls' must be a list of calls .* on an assistant message"),
    ({"prompt": "p", "chosen": [USER("p"), {"role": "assistant", "content": "a", "tool_calls": [{"function": {"name": "f"}}]}],
      "rejected": "b"}, r"field 'chosen' ends with tool calls"),
])
def test_malformed_tool_and_list_fields_are_clear_errors(tmp_path, row, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: " + message):
        load_dataset_records(data)


def test_a_token_merging_across_the_boundary_keeps_the_prompt_exact():
    from alignkit.models.factory import train_tokenizer

    # "Assistant:" then a reply starting with "!!": trained so that ":!!" is one token
    tok = train_tokenizer(["Assistant:!! yes :!! ok"] * 200 + ["Human: hi there"] * 20, vocab_size=300)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Human: {{ m['content'] }}\n"
                         "{% else %}Assistant:{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}Assistant:{% endif %}")
    prompt, reply = [USER("hi there")], "!! yes"
    assert ":!!" in tok.convert_ids_to_tokens(reference(tok, prompt + [ASSISTANT(reply)]))  # the merge happens
    item = tokenize_sft(SFTExample(prompt, reply), tok)
    n = len(reference(tok, prompt, add_generation_prompt=True))
    assert item["input_ids"][:n] == reference(tok, prompt, add_generation_prompt=True)  # the prompt as generation sees it
    assert item["labels"][:n] == [IGNORE_INDEX] * n and IGNORE_INDEX not in item["labels"][n:]
    assert item["input_ids"][n:] == tok(reply + "<eos>", add_special_tokens=False)["input_ids"]  # the reply on its own
    assert tok.decode(item["input_ids"]) == tok.apply_chat_template(prompt + [ASSISTANT(reply)], tokenize=False)


class _EndAfter:
    """A forward hook on the LM head that makes ``token`` the argmax at decoding step ``step``."""

    def __init__(self, token: int, step: int):
        self.token, self.step, self.calls = token, step, 0

    def __call__(self, module, args, out):
        self.calls += 1
        if self.calls == self.step:
            out = out.clone()
            out[:, -1, self.token] = 1e4
        return out


@pytest.mark.parametrize("stop", ["end_of_turn", "eos"])
def test_generation_stops_at_the_end_of_turn_or_eos(stop):
    from alignkit.models.factory import TinyModelConfig, tiny_llama
    from alignkit.rollout.batch import build_rollout_batch
    from alignkit.rollout.generate import HFGenerator, SamplingConfig

    tok = styled_tokenizer("chatml")
    fmt = chat_format(tok)
    model = tiny_llama(tok, TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2))
    token = fmt.end_of_turn_id if stop == "end_of_turn" else tok.eos_token_id
    bad = [fmt.end_of_turn_id, tok.eos_token_id]
    model.lm_head.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor(bad), -1e4))  # never by chance
    model.lm_head.register_forward_hook(_EndAfter(token, step=4))  # the prompt pass, then 3 tokens
    gen = HFGenerator(model, tok, SamplingConfig(max_new_tokens=12, temperature=0))
    out = gen.generate([[USER("What colour is item 3?")]])
    assert out.response_ids[0][-1] == token and len(out.response_ids[0]) == 4 and out.finished == [True]
    assert "<|im_end|>" not in out.texts[0] and "<|endoftext|>" not in out.texts[0]
    assert out.texts[0] == tok.decode(out.response_ids[0][:3]).strip()
    batch = build_rollout_batch(out, tok.pad_token_id, stop_token_ids(tok))
    assert batch.finished.tolist() == [True] and batch.response_mask.sum().item() == 4


def test_the_factory_template_is_the_plain_layout():
    from alignkit.data import render_prompt

    tok = styled_tokenizer("plain")
    tok.chat_template = __import__("alignkit.models.factory", fromlist=["CHAT_TEMPLATE"]).CHAT_TEMPLATE
    for messages in list(PROMPTS.values()) + [TOOL_CONVERSATION]:
        bare = styled_tokenizer("plain")
        assert render_prompt(tok, messages) == render_prompt(bare, messages)
        assert json.dumps(tokenize_sft(SFTExample(messages, "x"), tok)) == json.dumps(tokenize_sft(SFTExample(messages, "x"), bare))
