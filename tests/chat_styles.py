"""Tiny local tokenizers in the chat-template styles of real model families (no hub).

Each style is a byte-level BPE tokenizer from :func:`alignkit.models.factory.train_tokenizer`
with the family's special tokens (and no others) and a chat template written after the family's own:

- ``chatml``: Qwen2.5 (``<|im_start|>``/``<|im_end|>``; EOS ``<|endoftext|>`` is not the end of
  turn, pad == EOS; tool calls in ``<tool_call>`` blocks, tool results as user turns);
- ``llama3``: Llama 3 (``<|begin_of_text|>`` rendered by the template and added by the tokenizer,
  ``<|start_header_id|>``, end of turn ``<|eot_id|>`` ≠ EOS ``<|end_of_text|>``, no pad token);
- ``gemma``: Gemma 3 (``<bos>`` rendered and added, ``<start_of_turn>``, end of turn
  ``<end_of_turn>`` ≠ EOS ``<eos>``, the system prompt folded into the first user turn);
- ``mistral``: Mistral ``[INST]`` (``<s>`` rendered and added, end of turn = EOS ``</s>``, no
  generation prompt, no pad token);
- ``plain``: no template at all (alignkit's plain HH layout), pad == EOS.
"""

from __future__ import annotations

import copy
from functools import lru_cache

from tokenizers import processors

from alignkit.data import IGNORE_INDEX
from alignkit.models.factory import DEFAULT_CORPUS, train_tokenizer

CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)

#: style -> (chat template, special tokens {bos, eos, pad, extra}, whether the tokenizer adds BOS itself)
STYLES = {
    "chatml": (CHATML, dict(bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
                            extra=["<|im_start|>", "<|im_end|>"]), False),
    "llama3": (LLAMA3, dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                            extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]), True),
    "gemma": (GEMMA, dict(bos="<bos>", eos="<eos>", pad="<pad>", extra=["<start_of_turn>", "<end_of_turn>"]), True),
    "mistral": (MISTRAL, dict(bos="<s>", eos="</s>", pad=None, extra=["[INST]", "[/INST]"]), True),
    "plain": (None, dict(bos=None, eos="<eos>", pad="<eos>", extra=[]), False),
}

#: The end of turn and the text each style's template renders after it.
END_OF_TURN = {
    "chatml": ("<|im_end|>", "\n"),
    "llama3": ("<|eot_id|>", ""),
    "gemma": ("<end_of_turn>", "\n"),
    "mistral": ("</s>", ""),
    "plain": ("<eos>", "\n\n"),
}


@lru_cache(maxsize=None)
def _base(style: str, vocab_size: int):
    _, special, _ = STYLES[style]
    corpus = DEFAULT_CORPUS * 20 + [f"The colour of item {i} is {c}." for i in range(30) for c in ("red", "blue")]
    names = {"bos_token": special["bos"], "eos_token": special["eos"], "pad_token": special["pad"],
             "additional_special_tokens": special["extra"]}
    return train_tokenizer(corpus, vocab_size=vocab_size, special_tokens=names)


def styled_tokenizer(style: str, vocab_size: int = 320):
    """A fresh tokenizer in ``style`` (a copy: callers may change it)."""
    template, _, adds_bos = STYLES[style]
    tok = copy.deepcopy(_base(style, vocab_size))
    tok.chat_template = template
    if adds_bos:
        bos = tok.bos_token
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)])
    return tok


def trained_runs(tok, item) -> list[str]:
    """The decoded runs of labelled tokens of an SFT item: what it trains, turn by turn."""
    runs, run = [], []
    for t, label in zip(item["input_ids"], item["labels"]):
        if label != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    return [tok.decode(r) for r in runs + ([run] if run else [])]
