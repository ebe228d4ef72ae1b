"""Records -> token ids, with the prompt/response boundary exact and truncation counted.

The prompt is rendered with the tokenizer's chat template (``add_generation_prompt=True``), or
with the plain default below when the tokenizer has none, and tokenised on its own; each response
is tokenised on its own as ``" " + response`` (no space when the rendered prompt already ends in
whitespace, as some templates end with a newline) followed by EOS. Concatenating the two gives
the training sequence, so the prompt mask is exact whatever the tokenizer merges across the
boundary. If the tokenizer adds a BOS token by itself and the rendered prompt does not start with
it, BOS is put in front of the prompt.

Truncation (``max_length`` for the whole sequence, ``max_prompt_length`` for the prompt):

1. the prompt keeps its END (the latest turns): its beginning is cut to ``max_prompt_length``;
2. if prompt + longest response is still over ``max_length``, responses keep their beginning and
   lose their end (a cut response has no EOS); if the prompt alone leaves no room, it is cut
   further so one response token remains. Set ``max_prompt_length`` to reserve response room.

Every example that lost a token is counted in the :class:`DataReport`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from alignkit.data.records import (
    Messages,
    PreferencePair,
    RatedExample,
    Record,
    SFTExample,
    TextExample,
    UnpairedExample,
)
from alignkit.data.report import DataReport

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, padding), as in PyTorch's cross-entropy."""


def plain_chat(messages: Messages, eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """The default chat format, identical to ``alignkit.models.factory.CHAT_TEMPLATE``.

    ``system\\n\\nHuman: ...\\n\\nAssistant: ...<eos>\\n\\n`` and, for generation, a final
    ``Assistant:`` (Anthropic's HH-RLHF layout, so HH data reads as it was written).
    """
    parts = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"Human: {content}\n\n")
        elif role == "assistant":
            parts.append(f"Assistant: {content}{eos_token}\n\n")
        else:
            raise ValueError(f"unknown chat role {role!r}; expected system, user or assistant")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render_prompt(tokenizer, messages: Messages) -> str:
    """The prompt text the model sees: the chat template with the generation prompt, else
    :func:`plain_chat`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_chat(messages, tokenizer.eos_token or "")


class _Encoder:
    """Tokenises prompts and responses; remembers the last prompt, which the consecutive pairs
    of one ranking share."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses must end with one")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos = bos if adds_bos else None
        self._last: tuple[tuple, list[int], str] | None = None

    def prompt(self, messages: Messages) -> tuple[list[int], str]:
        key = tuple((m["role"], m["content"]) for m in messages)
        if self._last is None or self._last[0] != key:
            text = render_prompt(self.tokenizer, messages)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.bos is not None and ids[:1] != [self.bos]:
                ids = [self.bos] + ids
            self._last = (key, ids, text)
        _, ids, text = self._last
        return list(ids), text  # a copy: items never share a list

    def response(self, text: str, prompt_text: str) -> list[int]:
        sep = "" if prompt_text[-1:].isspace() else " "
        return self.tokenizer(sep + text, add_special_tokens=False)["input_ids"] + [self.eos]


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Prompt token ids exactly as the training items start (before truncation): for generation,
    so a policy samples from the same context it was trained on."""
    return _Encoder(tokenizer).prompt(messages)[0]


@dataclass(frozen=True)
class _Limits:
    max_length: int | None = None
    max_prompt_length: int | None = None

    def __post_init__(self):
        n, p = self.max_length, self.max_prompt_length
        if n is not None and n < 2:
            raise ValueError(f"max_length must be at least 2 (prompt + response), got {n}")
        if p is not None and p < 1:
            raise ValueError(f"max_prompt_length must be at least 1, got {p}")
        if n is not None and p is not None and p >= n:
            raise ValueError(
                f"max_prompt_length ({p}) must be below max_length ({n}) "
                "to leave room for the response"
            )


def _encode(
    enc: _Encoder,
    prompt: Messages,
    responses: list[str],
    limits: _Limits,
    report: DataReport | None,
    source: str,
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prompt and of each response to it, truncated as the module doc says."""
    prompt_ids, text = enc.prompt(prompt)
    response_ids = [enc.response(r, text) for r in responses]
    cut_prompt = cut_response = False
    if limits.max_prompt_length is not None and len(prompt_ids) > limits.max_prompt_length:
        prompt_ids, cut_prompt = prompt_ids[-limits.max_prompt_length :], True  # latest turns
    if limits.max_length is not None:
        room = limits.max_length - len(prompt_ids)
        if room < 1:
            prompt_ids, cut_prompt, room = prompt_ids[-(limits.max_length - 1) :], True, 1
        if any(len(r) > room for r in response_ids):
            response_ids, cut_response = [r[:room] for r in response_ids], True
    if report is not None:
        report.tokenized += 1
        if cut_prompt or cut_response:
            report.truncate(source, prompt=cut_prompt, response=cut_response)
    return prompt_ids, response_ids


def _sft(ex: SFTExample, enc: _Encoder, limits: _Limits, report: DataReport | None) -> dict:
    prompt, (completion,) = _encode(enc, ex.prompt, [ex.completion], limits, report, ex.source)
    return {
        "input_ids": prompt + completion,
        "labels": [IGNORE_INDEX] * len(prompt) + completion,
        "length": len(prompt) + len(completion),
    }


def _pair(ex: PreferencePair, enc: _Encoder, limits: _Limits, report: DataReport | None) -> dict:
    prompt, (chosen, rejected) = _encode(
        enc, ex.prompt, [ex.chosen, ex.rejected], limits, report, ex.source
    )
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "margin": float(ex.margin),
        "weight": float(ex.weight),
        "group": int(ex.group),
        "length": len(prompt) + max(len(chosen), len(rejected)),
    }


def _unpaired(ex: UnpairedExample, enc: _Encoder, limits: _Limits, report) -> dict:
    prompt, (completion,) = _encode(enc, ex.prompt, [ex.completion], limits, report, ex.source)
    return {
        "prompt_ids": prompt,
        "completion_ids": completion,
        "label": bool(ex.label),
        "length": len(prompt) + len(completion),
    }


def _rated(ex: RatedExample, enc: _Encoder, limits: _Limits, report) -> dict:
    prompt, (response,) = _encode(enc, ex.prompt, [ex.response], limits, report, ex.source)
    return {
        "prompt_ids": prompt,
        "response_ids": response,
        "score": float(ex.score),
        "length": len(prompt) + len(response),
    }


def _text(ex: TextExample, enc: _Encoder, limits: _Limits, report) -> dict:
    """An SFT item with every token a target (language modelling): [BOS where the tokenizer adds
    one] text EOS; a text over ``max_length`` keeps its beginning (and loses EOS), counted."""
    ids = enc.tokenizer(ex.text, add_special_tokens=False)["input_ids"] + [enc.eos]
    if enc.bos is not None and ids[:1] != [enc.bos]:
        ids = [enc.bos] + ids
    cut = limits.max_length is not None and len(ids) > limits.max_length
    if cut:
        ids = ids[: limits.max_length]
    if report is not None:
        report.tokenized += 1
        if cut:
            report.truncate(ex.source, prompt=False, response=True)
    # Nothing predicts the first token; the shift in the loss pairs labels[t] with logits[t-1].
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:], "length": len(ids)}


#: Record type -> item builder.
_BUILDERS = {
    SFTExample: _sft,
    TextExample: _text,
    PreferencePair: _pair,
    UnpairedExample: _unpaired,
    RatedExample: _rated,
}


def _one(kind: type, record, tokenizer, max_length, max_prompt_length, report) -> dict:
    if not isinstance(record, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(record).__name__}")
    limits = _Limits(max_length, max_prompt_length)
    return _BUILDERS[kind](record, _Encoder(tokenizer), limits, report)


def tokenize_sft(
    example: SFTExample,
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    report: DataReport | None = None,
) -> dict:
    """``{"input_ids", "labels", "length"}``; labels are -100 on the prompt."""
    return _one(SFTExample, example, tokenizer, max_length, max_prompt_length, report)


def tokenize_pair(
    pair: PreferencePair,
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    report: DataReport | None = None,
) -> dict:
    """``{"prompt_ids", "chosen_ids", "rejected_ids", "margin", "weight", "group", "length"}``."""
    return _one(PreferencePair, pair, tokenizer, max_length, max_prompt_length, report)


def tokenize_unpaired(
    example: UnpairedExample,
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    report: DataReport | None = None,
) -> dict:
    """``{"prompt_ids", "completion_ids", "label", "length"}``."""
    return _one(UnpairedExample, example, tokenizer, max_length, max_prompt_length, report)


def tokenize_rated(
    example: RatedExample,
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    report: DataReport | None = None,
) -> dict:
    """``{"prompt_ids", "response_ids", "score", "length"}``."""
    return _one(RatedExample, example, tokenizer, max_length, max_prompt_length, report)


def tokenize_records(
    records: Iterable[Record],
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    report: DataReport | None = None,
) -> tuple[list[dict], DataReport]:
    """Tokenise any mix of records; returns the items and the report (a new one if none given)."""
    limits = _Limits(max_length, max_prompt_length)
    report = report if report is not None else DataReport()
    enc = _Encoder(tokenizer)
    items = []
    for record in records:
        build = _BUILDERS.get(type(record))
        if build is None:
            raise TypeError(f"cannot tokenize a {type(record).__name__}; expected a data record")
        items.append(build(record, enc, limits, report))
    return items, report
