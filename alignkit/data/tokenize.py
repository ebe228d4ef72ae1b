"""Records -> token ids, rendered by the tokenizer's chat template, with the prompt mask exact and
truncation counted. docs/templates.md explains the conventions with examples.

**Rendering.** A conversation is rendered with the tokenizer's chat template, or with the plain
HH layout of :func:`plain_chat` when the tokenizer has none. The prompt is the template's
rendering with the generation prompt (``add_generation_prompt=True``); a response is what the
template renders after that prompt when the reply is appended as an assistant turn: its text,
then the template's **end of turn** and the text the template puts after it (the *trailer*). For
ChatML the response of ``Hi`` is ``Hi<|im_end|>\\n``, for Llama 3 ``Hi<|eot_id|>``, for Gemma
``Hi<end_of_turn>\\n``, for Mistral ``Hi</s>``, for the plain layout `` Hi<eos>\\n\\n``. The end of
turn is read from the template once (:func:`chat_format`): the first special (added) token it
renders after a reply. A template that renders none gets EOS inserted after every reply, since
a model must learn some way to stop (the one case where the tokens differ from the template's).

**Token-exactness.** The prompt is tokenised on its own (``add_special_tokens=False``, so a BOS
the template renders is not doubled; BOS is put in front only when the tokenizer adds one by
itself and the template does not render it). The response's ids are the tokens that tokenising
prompt + response as one text adds after the prompt's ids, so prompt ids + response ids equal
``tokenizer.apply_chat_template(prompt + [reply], tokenize=True)``, trailer included. When a
token merges across the boundary (the whole text's ids do not start with the prompt's), the
response is tokenised on its own instead: the prompt ids stay exactly those a policy is sampled
from (:func:`encode_prompt`), so the prompt mask is exact and the training sequence is one that
generation could produce; only that boundary token differs from the template's tokens.

**What is trained.** The response tokens of every item, end of turn and trailer included (as in
TRL's DPO and prompt/completion SFT). A multi-turn ``messages`` SFT record (``SFTExample`` with
``messages``) trains every assistant turn by default (``assistant_turns="all"``: each turn's
tokens from the end of its generation prompt through its end of turn and trailer; system, user
and tool turns are context). Every assistant turn of such a record was written as a response to
its context, so training only the last one discards most of the demonstrations; this is TRL's
``assistant_only_loss``. ``assistant_turns="last"`` trains the final reply only.

**Truncation** (``max_length`` for the whole sequence, ``max_prompt_length`` for the prompt):

1. the prompt keeps its END (the latest turns): its beginning is cut to ``max_prompt_length``;
2. if prompt + longest response is still over ``max_length``, responses keep their beginning and
   lose their end (a cut response has no end of turn); if the prompt alone leaves no room, it is
   cut further so one response token remains. Set ``max_prompt_length`` to reserve response room.

Every example that lost a token is counted in the :class:`DataReport`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
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
    message_text,
)
from alignkit.data.report import DataReport

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, padding), as in PyTorch's cross-entropy."""

ASSISTANT_TURNS = ("all", "last")
"""Which assistant turns of a multi-turn ``messages`` SFT record are trained."""

#: Reply text used to find where a template puts a reply and what it renders after it.
_SENTINEL = "ALIGNKIT7REPLY7SENTINEL"
_WARNED: set[str] = set()


# ---- rendering ---------------------------------------------------------------------------------


def _key(value) -> str:
    """A hashable key of a prompt (messages) or a reply: equal exactly when the values are."""
    return json.dumps(value, sort_keys=True, default=str)


def clean_messages(messages: Messages) -> Messages:
    """Copies of ``messages`` with list-valued content flattened to text
    (:func:`~alignkit.data.records.message_text`); other keys (``tool_calls``, ``tool_call_id``,
    ``name``) are kept for the template."""
    return [{**m, "content": message_text(m.get("content"), f"messages[{i}].content")}
            for i, m in enumerate(messages)]


def _tool_call_lines(message: dict) -> list[str]:
    calls = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        calls.append("Tool call: " + json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")},
                                                ensure_ascii=False))
    return calls


def plain_chat(messages: Messages, eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """The default chat format, identical to ``alignkit.models.factory.CHAT_TEMPLATE``.

    ``system\\n\\nHuman: ...\\n\\nAssistant: ...<eos>\\n\\n`` and, for generation, a final
    ``Assistant:`` (Anthropic's HH-RLHF layout, so HH data reads as it was written). A tool
    result is a ``Tool: ...\\n\\n`` turn; an assistant's tool calls follow its text, one line each:
    ``Tool call: {"name": ..., "arguments": ...}`` (JSON).
    """
    parts = []
    for m in messages:
        role, content = m["role"], message_text(m.get("content"))
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"Human: {content}\n\n")
        elif role == "assistant":
            body = "\n".join(([content] if content else []) + _tool_call_lines(m))
            parts.append(f"Assistant: {body}{eos_token}\n\n")
        elif role == "tool":
            parts.append(f"Tool: {content}\n\n")
        else:
            raise ValueError(f"unknown chat role {role!r}; expected system, user, assistant or tool")
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


def render(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    """A conversation as the model sees it: the chat template, else :func:`plain_chat`."""
    messages = clean_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return plain_chat(messages, tokenizer.eos_token or "", add_generation_prompt)


def render_prompt(tokenizer, messages: Messages) -> str:
    """The prompt text the model sees: the chat template with the generation prompt, else
    :func:`plain_chat`."""
    return render(tokenizer, messages, add_generation_prompt=True)


# ---- the template's end of turn ------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """How a tokenizer's template ends an assistant turn (read by :func:`chat_format`)."""

    end_of_turn: str
    """Text that ends a reply: the template's first special token after it (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``; the plain layout's EOS), with any text the template
    puts before that token; EOS when the template renders no special token there."""
    trailer: str
    """What the template renders after the end of turn of a final reply (ChatML's and Gemma's
    ``"\\n"``, the plain layout's ``"\\n\\n"``); part of every response's tokens."""
    end_of_turn_id: int
    """Token id of the end-of-turn token: the one a sampled response ends with."""
    stop_ids: tuple[int, ...]
    """Generation stops at any of these: the end of turn and EOS."""
    inserted: bool
    """True when the template renders no special token after a reply, so alignkit inserts EOS
    after every reply."""


def _added_tokens(tokenizer) -> list[str]:
    """Special and added token strings, longest first (so the longest match wins a position)."""
    tokens = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _first_token(text: str, tokens: list[str]) -> tuple[int, str] | None:
    """(position, token) of the earliest added token in ``text`` (the longest at a position)."""
    found = [(text.find(t), t) for t in tokens if t in text]
    return min(found, key=lambda x: (x[0], -len(x[1]))) if found else None


def chat_format(tokenizer) -> ChatFormat:
    """The end of turn of ``tokenizer``'s chat template (or of :func:`plain_chat`).

    Renders ``[user, assistant=SENTINEL]`` without a generation prompt and reads what follows the
    reply: the end of turn is everything through the first special or added token there, the
    trailer the rest.
    """
    eos = tokenizer.eos_token
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    full = render(tokenizer, conversation, add_generation_prompt=False)
    at = full.rfind(_SENTINEL)
    if at < 0:
        raise ValueError("the chat template does not render the assistant's reply (rendering a user turn and "
                         f"an assistant turn gave {full!r}); alignkit needs a template that renders assistant turns")
    after = full[at + len(_SENTINEL):]
    hit = _first_token(after, _added_tokens(tokenizer))
    if hit is None:
        if eos is None:
            raise ValueError("the tokenizer has no EOS token and its chat template renders no special token after "
                             "a reply; responses must end with a token the model can learn to stop at")
        if after not in _WARNED:  # once per template, not once per prompt encoded
            _WARNED.add(after)
            log.warning("the chat template renders no special token after a reply (%r); alignkit ends every reply "
                        "with EOS %r, inserted before that text", after, eos)
        end, trailer, inserted = eos, after, True
    else:
        pos, token = hit
        end, trailer, inserted = after[: pos + len(token)], after[pos + len(token):], False
    token = end if inserted else hit[1]
    end_id = tokenizer.convert_tokens_to_ids(token)
    stops = [end_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return ChatFormat(end, trailer, end_id, tuple(dict.fromkeys(stops)), inserted)


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids generation stops at: the template's end of turn and EOS."""
    return list(chat_format(tokenizer).stop_ids)


def reply_prefix(tokenizer, messages: Messages) -> str:
    """The text a template puts between the rendered prompt ``messages`` and a reply's content
    (``" "`` in the plain layout, ``""`` in ChatML; a thinking template's empty think block)."""
    prompt = render_prompt(tokenizer, messages)
    full = render(tokenizer, list(messages) + [{"role": "assistant", "content": _SENTINEL}], False)
    at = full.find(_SENTINEL)
    if full.startswith(prompt) and at >= len(prompt):
        return full[len(prompt):at]
    return "" if prompt[-1:].isspace() else " "


# ---- encoding ----------------------------------------------------------------------------------


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class _Encoder:
    """Tokenises prompts and responses, remembering each prompt's ids and the ids of the responses
    to it already tokenised: the responses of one pair share a prompt, and a ranking of k responses
    expanded to k-choose-2 pairs holds each response k−1 times (rendering a reply through the chat
    template costs more than the rest of tokenising). Ids are a function of the prompt and the
    reply alone, so remembering them changes no item.

    How long a prompt is remembered: by default until another prompt comes; when :meth:`expect`
    has been given every use of each prompt (as :func:`tokenize_records` does with the whole list,
    so the shuffled pairs of one prompt still meet), until its last use is :meth:`done`."""

    def __init__(self, tokenizer, assistant_turns: str = "all"):
        if assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {assistant_turns!r}")
        self.tokenizer, self.assistant_turns = tokenizer, assistant_turns
        self.fmt = chat_format(tokenizer)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos = bos if adds_bos else None
        self._prompts: dict[str, tuple[str, list[int]]] = {}  # prompt key -> (its text, its ids)
        self._replies: dict[str, dict[str, list[int]]] = {}  # prompt key -> reply key -> the reply's ids
        self._uses: Counter | None = None  # records still to come per prompt key (None: keep the last prompt)
        self._warned = False

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos] + ids if self.bos is not None and ids[:1] != [self.bos] else ids

    def _continue(self, before: str, before_ids: list[int], text: str) -> tuple[list[int], list[int]]:
        """``(ids of text as it continues before, ids of before + text)``: the tokens that
        tokenising the whole adds after ``before_ids``, or ``text``'s own tokens when a token
        merges across the boundary (module doc)."""
        whole = self._ids(before + text)
        if whole[: len(before_ids)] == before_ids:
            return whole[len(before_ids):], whole
        return self._ids(text), whole

    def expect(self, prompts: Iterable[Messages | None]) -> None:
        """Remember each prompt until the last of its uses in ``prompts`` is :meth:`done`."""
        self._uses = Counter(_key(p) for p in prompts if p is not None)

    def done(self, prompt: Messages | None) -> None:
        """One use of ``prompt`` is tokenised: forget it when no use is still to come."""
        if self._uses is None or prompt is None:
            return
        key = _key(prompt)
        self._uses[key] -= 1
        if self._uses[key] <= 0:
            self._prompts.pop(key, None)
            self._replies.pop(key, None)

    def _prompt(self, messages: Messages) -> tuple[str, str, list[int]]:
        """``(key, text, ids)`` of a prompt."""
        key = _key(messages)
        if key not in self._prompts:
            if self._uses is None:  # remember the last prompt only
                self._prompts.clear()
                self._replies.clear()
            text = render_prompt(self.tokenizer, messages)
            self._prompts[key], self._replies[key] = (text, self._ids(text)), {}
        return (key, *self._prompts[key])

    def prompt(self, messages: Messages) -> list[int]:
        return self._with_bos(list(self._prompt(messages)[2]))  # a copy: items never share a list

    def _eos_after_content(self, text: str, content: str) -> str:
        """With a template that renders no end of turn: ``text`` (a final reply as rendered) with
        EOS inserted after the reply's content, before the template's trailing text."""
        at = text.find(content) if content else -1
        cut = at + len(content) if at >= 0 else len(text) - _common_prefix(text[::-1], self.fmt.trailer[::-1])
        return text[:cut] + self.fmt.end_of_turn + text[cut:]

    def _reply_text(self, prompt: Messages, reply: dict, prompt_text: str) -> str:
        """What the template renders after ``prompt_text`` for ``reply``: reply, end of turn, trailer."""
        full = render(self.tokenizer, list(prompt) + [reply], add_generation_prompt=False)
        content = message_text(reply.get("content"))
        if not full.startswith(prompt_text):
            if not self._warned:
                log.warning("the chat template renders a conversation's start differently when a reply follows; "
                            "responses are rendered as prompt + reply + end of turn instead")
                self._warned = True
            sep = "" if prompt_text[-1:].isspace() else " "
            return sep + content + self.fmt.end_of_turn + self.fmt.trailer
        text = full[len(prompt_text):]
        return self._eos_after_content(text, content) if self.fmt.inserted else text

    def response(self, prompt: Messages, reply: dict | str) -> list[int]:
        if isinstance(reply, str):
            reply = {"role": "assistant", "content": reply}
        key, prompt_text, prompt_ids = self._prompt(prompt)
        known = self._replies[key]
        reply_key = _key(reply)
        if reply_key not in known:
            known[reply_key] = self._continue(prompt_text, prompt_ids, self._reply_text(prompt, reply, prompt_text))[0]
        return list(known[reply_key])  # a copy: items never share a list

    def conversation(self, messages: Messages) -> tuple[list[int], list[int], list[int]]:
        """A multi-turn SFT conversation whose assistant turns are all trained:
        ``(context ids, their labels, final reply ids)``; the context is the prompt of the final
        reply, with the earlier assistant turns labelled."""
        segments = self._turn_segments(clean_messages(messages))
        ids, labels, text, text_ids = [], [], "", []
        for segment, trained in segments[:-1]:
            new, text_ids = self._continue(text, text_ids, segment)
            text += segment
            ids += new
            labels += new if trained else [IGNORE_INDEX] * len(new)
        ids = self._with_bos(ids)
        labels = [IGNORE_INDEX] * (len(ids) - len(labels)) + labels
        return ids, labels, self._continue(text, text_ids, segments[-1][0])[0]

    def _turn_segments(self, messages: Messages) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, trained) pieces; the last piece is the final
        reply. Each assistant turn's piece starts where its generation prompt ends and runs
        through its end of turn and the trailer the template puts after it."""
        tok, fmt = self.tokenizer, self.fmt
        full = render(tok, messages, add_generation_prompt=False)
        segments, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = render(tok, messages[:i], add_generation_prompt=True)
            if not full.startswith(head) or len(head) < pos:
                raise ValueError(
                    f"the chat template renders the conversation before assistant turn {i} differently from its "
                    "generation prompt, so the turn's tokens cannot be found; train the final reply only "
                    "(data.assistant_turns=last)")
            start = len(head)
            if i == len(messages) - 1:  # the final reply runs to the end of the rendering
                piece, end = full[start:], len(full)
                if fmt.inserted:
                    piece = self._eos_after_content(piece, m["content"])
            else:
                # the turn ends at its end of turn (after the content: EOS inserted there when the
                # template renders none), then whatever of the trailer the template renders next
                mark = m["content"] if fmt.inserted else fmt.end_of_turn
                at = full.find(mark, start) if mark else -1
                if at < 0:
                    raise ValueError(f"cannot find where assistant turn {i} ends in the rendered conversation; "
                                     "train the final reply only (data.assistant_turns=last)")
                cut = at + len(mark)
                end = cut + _common_prefix(full[cut:], fmt.trailer)
                piece = full[start:cut] + (fmt.end_of_turn if fmt.inserted else "") + full[cut:end]
            segments += [(full[pos:start], False), (piece, True)]
            pos = end
        return segments


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


def _truncate(
    prompt_ids: list[int],
    response_ids: list[list[int]],
    limits: _Limits,
    report: DataReport | None,
    source: str,
    prompt_labels: list[int] | None = None,
) -> tuple[list[int], list[list[int]], list[int] | None]:
    """Prompt ids (and their labels, for multi-turn SFT) and response ids cut as the module doc
    says; the example is counted in ``report``."""
    cut_prompt = cut_response = False
    keep = len(prompt_ids)
    if limits.max_prompt_length is not None and keep > limits.max_prompt_length:
        keep, cut_prompt = limits.max_prompt_length, True  # the latest turns
    if limits.max_length is not None:
        room = limits.max_length - keep
        if room < 1:
            keep, cut_prompt, room = limits.max_length - 1, True, 1
        if any(len(r) > room for r in response_ids):
            response_ids, cut_response = [r[:room] for r in response_ids], True
    if cut_prompt:
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
        prompt_labels = None if prompt_labels is None else prompt_labels[len(prompt_labels) - keep:]
    if report is not None:
        report.tokenized += 1
        if cut_prompt or cut_response:
            report.truncate(source, prompt=cut_prompt, response=cut_response)
    return prompt_ids, response_ids, prompt_labels


def _encode(enc: _Encoder, prompt: Messages, responses: list, limits: _Limits, report, source: str):
    """Token ids of the prompt and of each response to it, truncated as the module doc says."""
    prompt_ids = enc.prompt(prompt)
    prompt_ids, response_ids, _ = _truncate(prompt_ids, [enc.response(prompt, r) for r in responses],
                                            limits, report, source)
    return prompt_ids, response_ids


def _sft(ex: SFTExample, enc: _Encoder, limits: _Limits, report: DataReport | None) -> dict:
    messages = ex.messages
    earlier = messages is not None and any(m["role"] == "assistant" for m in messages[:-1])
    if earlier and enc.assistant_turns == "all":
        try:
            context, labels, completion = enc.conversation(messages)
        except ValueError as e:
            raise ValueError(f"{ex.source or 'an SFT record'}: {e}") from None
        prompt, (completion,), labels = _truncate(context, [completion], limits, report, ex.source, labels)
    else:
        reply = messages[-1] if messages is not None else ex.completion
        prompt, (completion,) = _encode(enc, ex.prompt, [reply], limits, report, ex.source)
        labels = [IGNORE_INDEX] * len(prompt)
    return {
        "input_ids": prompt + completion,
        "labels": labels + completion,
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
    # A document ends with the tokenizer's EOS (pretraining text), not a chat template's end of turn.
    eos = enc.tokenizer.eos_token_id
    ids = enc.tokenizer(ex.text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
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


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Prompt token ids exactly as the training items start (before truncation): for generation,
    so a policy samples from the same context it was trained on."""
    return _Encoder(tokenizer).prompt(messages)


def encode_responses(tokenizer, prompts: list[Messages], responses: list[str]) -> list[list[int]]:
    """Token ids of each response to its prompt exactly as the training items hold them (before
    truncation): reply, end of turn and trailer."""
    enc = _Encoder(tokenizer)
    prompts = list(prompts)  # counted first, then read again: an iterator would be spent by the count
    enc.expect(prompts)
    out = []
    for p, r in zip(prompts, responses):
        out.append(enc.response(p, r))
        enc.done(p)
    return out


def _one(kind: type, record, tokenizer, max_length, max_prompt_length, report, assistant_turns="all") -> dict:
    if not isinstance(record, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(record).__name__}")
    limits = _Limits(max_length, max_prompt_length)
    return _BUILDERS[kind](record, _Encoder(tokenizer, assistant_turns), limits, report)


def tokenize_sft(
    example: SFTExample,
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    report: DataReport | None = None,
    assistant_turns: str = "all",
) -> dict:
    """``{"input_ids", "labels", "length"}``; labels are -100 on the prompt (and, for a
    ``messages`` record, on every non-assistant turn; see ``assistant_turns`` in the module doc)."""
    return _one(SFTExample, example, tokenizer, max_length, max_prompt_length, report, assistant_turns)


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
    assistant_turns: str = "all",
) -> tuple[list[dict], DataReport]:
    """Tokenise any mix of records; returns the items and the report (a new one if none given).
    ``assistant_turns`` ("all" or "last"): which assistant turns of multi-turn ``messages`` SFT
    records are trained (module doc)."""
    limits = _Limits(max_length, max_prompt_length)
    report = report if report is not None else DataReport()
    enc = _Encoder(tokenizer, assistant_turns)
    records = list(records)
    enc.expect(getattr(r, "prompt", None) for r in records)
    items = []
    for record in records:
        build = _BUILDERS.get(type(record))
        if build is None:
            raise TypeError(f"cannot tokenize a {type(record).__name__}; expected a data record")
        items.append(build(record, enc, limits, report))
        enc.done(getattr(record, "prompt", None))
    return items, report
