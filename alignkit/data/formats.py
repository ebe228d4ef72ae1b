"""Input formats: detect which one a row is in and normalise it into records.

=========  ==============================================  ===================================
format     fields                                          becomes
=========  ==============================================  ===================================
pairwise   ``prompt``, ``chosen``, ``rejected`` [,          one :class:`PreferencePair`
           ``margin``]; ``prompt`` may be omitted when
           ``chosen``/``rejected`` are full conversations
hh         ``chosen``, ``rejected``: HH-RLHF transcripts   one :class:`PreferencePair`
           (``\\n\\nHuman: ...\\n\\nAssistant: ...``)
ranked     ``prompt``, ``responses`` (k strings) and       k(k-1)/2 :class:`PreferencePair`
           ``ranking`` or ``ranks``
unpaired   ``prompt``, ``completion``, ``label``            one :class:`UnpairedExample`
ratings    ``prompt``, ``response``, ``score``              one :class:`RatedExample`
sft        ``prompt``, ``completion``; or ``messages``      one :class:`SFTExample`
critique_  ``prompt``, ``response_a``, ``response_b``,      one :class:`CritiquePair`
pair       ``critique``, ``verdict`` (``"A"``/``"B"``)
critique_  ``prompt``, ``response``, ``critique``,          one :class:`CritiquePoint`
point      ``score`` (an integer)
=========  ==============================================  ===================================

Conventions shared by all formats:

* A prompt is a string (one user turn), a list of chat messages, or an HH-style transcript string
  (``"\\n\\nHuman: hi\\n\\nAssistant:"``), which is parsed into messages. It must end with a
  user turn.
* A response is a string, or a list of messages whose last one is the assistant reply; when that
  list repeats the prompt first, the repeated prompt is stripped. Responses are stripped of
  surrounding whitespace (tokenisation adds the single separating space).
* Numbers (``margin``, ``score``) may be numeric strings, as CSV files hold them.
* Rankings: ``ranking`` lists response indices best first (``[2, 0, 1]``: response 2 is best);
  ``ranks`` gives each response its rank, lower is better (``[2, 3, 1]`` or ``[1, 2, 0]``: the
  same order). Either must be a permutation.

Bad rows are handled on purpose: a missing field or a wrong type is a :class:`DataError` naming
the location, the field and the expected type. Content problems are counted skips in the
:class:`DataReport` (empty responses, identical chosen/rejected, empty prompts). Pairs whose two
conversations do not share the prompt are skipped and listed in ``report.mismatched``;
``strict=True`` makes them (and malformed HH transcripts) errors instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from alignkit.data.records import (
    CritiquePair,
    CritiquePoint,
    Messages,
    PreferencePair,
    RatedExample,
    Record,
    SFTExample,
    UnpairedExample,
    message_text,
)
from alignkit.data.report import (
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL,
    MALFORMED_TRANSCRIPT,
    PREFIX_MISMATCH,
    STRUCTURAL,
    DataError,
    DataReport,
)

#: Llama 2's comparison labels mapped to a margin m(r) in the reward model loss
#: ``-log sigmoid(r_chosen - r_rejected - m(r))`` (Touvron et al. 2023, section 3.2.2), in units
#: of reward: a pair labelled "significantly better" asks for a reward gap of at least 3,
#: "negligibly better" / "unsure" ask for none. These are the paper's "margin large" values
#: (Table 28); :data:`LLAMA2_MARGIN_SMALL` is its other variant. Pass ``margin_labels`` to use
#: another scale; keys match case- and space-insensitively.
DEFAULT_MARGIN_LABELS: dict[str, float] = {
    "significantly better": 3.0,
    "better": 2.0,
    "slightly better": 1.0,
    "negligibly better": 0.0,
    "unsure": 0.0,
}

#: Llama 2's "margin small" variant: the same ordering at a third of the scale.
LLAMA2_MARGIN_SMALL: dict[str, float] = {
    "significantly better": 1.0,
    "better": 2.0 / 3.0,
    "slightly better": 1.0 / 3.0,
    "negligibly better": 0.0,
    "unsure": 0.0,
}

ROLES = ("system", "user", "assistant", "tool")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class _Skip(Exception):
    """Raised inside a normaliser to skip a row (or one pair of a ranking) for a reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason


@dataclass
class _SkipRecord:
    """A skipped part of a multi-record row (one pair of a ranking), counted by the caller."""

    reason: str
    source: str


@dataclass
class NormaliseOptions:
    """Knobs of normalisation (see :func:`normalise_rows`)."""

    margin_labels: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MARGIN_LABELS))
    group_rankings: bool = False
    strict: bool = False
    next_group: int = 0
    """Next ranking-group id; advanced as groups are made so ids stay unique across calls."""


# ---------------------------------------------------------------------------------------------
# Field access with errors that name the location, the field and the expected type.


def _get(row: dict, name: str, expected: str, loc: str, fmt: str):
    value = row.get(name)
    if value is None:
        raise DataError(
            f"{loc}: missing field '{name}' (expected {expected}) for format '{fmt}'; "
            f"the row has fields {sorted(row)}"
        )
    return value


def _wrong_type(loc: str, name: str, expected: str, value) -> DataError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return DataError(
        f"{loc}: field '{name}' must be {expected}, got {type(value).__name__} {shown}"
    )


def _number(value, name: str, loc: str) -> float:
    if isinstance(value, bool):
        raise _wrong_type(loc, name, "a number", value)
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            raise _wrong_type(loc, name, "a number", value) from None
    else:
        raise _wrong_type(loc, name, "a number", value)
    if not math.isfinite(x):
        raise _wrong_type(loc, name, "a finite number", value)
    return x


def _messages(value, name: str, loc: str) -> Messages:
    """Validate a list of chat messages and copy it as ``{"role", "content"}`` dicts (plus the
    tool fields ``tool_calls``, ``tool_call_id``, ``name`` where given). List content
    (``[{"type": "text", "text": ...}]``) becomes its text; an assistant message that only
    calls tools may have no content."""
    expected = 'a list of chat messages {"role", "content"}'
    if not isinstance(value, list):
        raise _wrong_type(loc, name, expected, value)
    out = []
    for i, m in enumerate(value):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise _wrong_type(loc, f"{name}[{i}]", 'a message {"role", "content"}', m)
        if m["role"] not in ROLES:
            raise DataError(
                f"{loc}: field '{name}[{i}]' has role {m['role']!r}; expected one of {ROLES}"
            )
        try:
            content = message_text(m.get("content"), f"{name}[{i}].content")
        except ValueError as e:
            raise DataError(f"{loc}: field {e}") from None
        message = {"role": m["role"], "content": content.strip()}
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function", c).get("name"), str) for c in calls
            ):
                raise _wrong_type(loc, f"{name}[{i}].tool_calls", "a list of calls "
                                  '{"type": "function", "function": {"name", "arguments"}} on an assistant message', calls)
            message["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                message[key] = m[key]
        out.append(message)
    return out


def _prompt(value, loc: str, name: str = "prompt") -> Messages:
    """A prompt as messages ending with a user turn (skips an empty one)."""
    if isinstance(value, str):
        if _looks_like_hh(value):
            messages = parse_hh_transcript(value)
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages = messages[:-1]  # "...\n\nAssistant:" awaiting the reply
        else:
            messages = [{"role": "user", "content": value.strip()}]
    else:
        messages = _messages(value, name, loc)
    if not any(m["content"] for m in messages):
        raise _Skip(EMPTY_PROMPT)
    if messages[-1]["role"] not in ("user", "tool"):
        raise DataError(
            f"{loc}: field '{name}' must end with a user turn (or a tool result), it ends with "
            f"{messages[-1]['role']!r}"
        )
    return messages


def _reply(value, name: str, loc: str) -> tuple[Messages | None, str]:
    """A response: ``(conversation before the reply or None, reply text)``."""
    if isinstance(value, str):
        return None, value.strip()
    if not isinstance(value, list):
        raise _wrong_type(loc, name, "a string or a list of chat messages", value)
    messages = _messages(value, name, loc)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{loc}: field '{name}' must end with an assistant message")
    if "tool_calls" in messages[-1]:
        raise DataError(f"{loc}: field '{name}' ends with tool calls; a reply with tool calls is trained only "
                        "from an sft 'messages' row")
    return messages[:-1], messages[-1]["content"]


def _reply_to(prompt: Messages, value, name: str, loc: str) -> str:
    """A response to a known prompt; a conversation must repeat exactly that prompt first."""
    before, text = _reply(value, name, loc)
    if before and before != prompt:
        raise DataError(
            f"{loc}: field '{name}' is a conversation that does not start with the prompt; "
            "give only the assistant reply, or the prompt followed by the reply"
        )
    return text


def _nonempty(*texts: str) -> None:
    if any(not t for t in texts):
        raise _Skip(EMPTY_RESPONSE)


def _margin(value, loc: str, labels: dict[str, float]) -> float:
    if value is None:
        return 0.0
    if isinstance(value, str):
        key = " ".join(value.lower().split())
        if key in labels:
            return labels[key]
        try:
            return _number(value, "margin", loc)
        except DataError:
            raise DataError(
                f"{loc}: field 'margin' {value!r} is neither a number nor a known label; "
                f"labels: {sorted(labels)} (set margin_labels to add more)"
            ) from None
    return _number(value, "margin", loc)


# ---------------------------------------------------------------------------------------------
# HH-RLHF transcripts.


def _looks_like_hh(text: str) -> bool:
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def parse_hh_transcript(text: str) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[user a, assistant b]``.

    Turns start at ``\\n\\nHuman:`` / ``\\n\\nAssistant:``; the leading ``\\n\\n`` may be missing
    at the very start. Contents are stripped. Text before the first turn becomes a system
    message. ``Human:`` inside a turn without the blank line before it is content, not a turn.
    """
    text = text.lstrip()
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    pieces = _HH_TURN.split(text)  # [head, role, content, role, content, ...]
    messages = []
    if pieces[0].strip():
        messages.append({"role": "system", "content": pieces[0].strip()})
    for role, content in zip(pieces[1::2], pieces[2::2]):
        messages.append(
            {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        )
    return messages


def _difference(chosen: Messages, rejected: Messages) -> str:
    """Where two conversations (without their final replies) stop agreeing, for error messages."""
    i = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
    if i is None:
        return (
            f"chosen and rejected do not share the turns before their final replies: chosen has "
            f"{len(chosen)} turns before its reply, rejected {len(rejected)}"
        )
    show = lambda m: f"{m['role']} {m['content'][:50]!r}"  # noqa: E731
    return (
        f"chosen and rejected differ before their final replies, from turn {i + 1}: "
        f"{show(chosen[i])} vs {show(rejected[i])}"
    )


def split_hh_pair(chosen: str, rejected: str, loc: str) -> tuple[Messages, str, str]:
    """Split two HH transcripts at their last assistant turn into (prompt, chosen, rejected).

    Raises :class:`_Skip` with ``malformed_transcript`` when a transcript does not end with an
    assistant reply to a Human turn, and ``prefix_mismatch`` when the two dialogues before their
    final replies differ (compared turn by turn, whitespace-insensitive at turn edges).
    """
    conversations = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        messages = parse_hh_transcript(text)
        if not messages or messages[-1]["role"] != "assistant":
            raise _Skip(MALFORMED_TRANSCRIPT, f"'{name}' does not end with an Assistant turn")
        conversations.append(messages)
    (*prompt_c, reply_c), (*prompt_r, reply_r) = conversations
    if prompt_c != prompt_r:
        raise _Skip(PREFIX_MISMATCH, _difference(prompt_c, prompt_r))
    if not prompt_c or prompt_c[-1]["role"] != "user":
        raise _Skip(MALFORMED_TRANSCRIPT, "the final replies do not follow a Human turn")
    return prompt_c, reply_c["content"], reply_r["content"]


# ---------------------------------------------------------------------------------------------
# One normaliser per format: (row, location, options) -> records. Each raises DataError for
# unusable rows and _Skip for rows to count and drop; a ranking returns a _SkipRecord for each
# of its pairs that is skipped while the others are kept.

_RESPONSE = "a string or a list of chat messages"
_PROMPT = "a string or a list of chat messages"


def _pairwise(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    chosen = _get(row, "chosen", _RESPONSE, loc, "pairwise")
    rejected = _get(row, "rejected", _RESPONSE, loc, "pairwise")
    margin = _margin(row.get("margin"), loc, opt.margin_labels)
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], loc)
        c = _reply_to(prompt, chosen, "chosen", loc)
        r = _reply_to(prompt, rejected, "rejected", loc)
    else:  # full conversations: the prompt is what they share before the final replies
        before_c, c = _reply(chosen, "chosen", loc)
        before_r, r = _reply(rejected, "rejected", loc)
        if before_c is None or before_r is None:
            raise DataError(
                f"{loc}: missing field 'prompt' (expected {_PROMPT}) for format 'pairwise'; "
                "without it 'chosen' and 'rejected' must be full conversations"
            )
        if before_c != before_r:
            raise _Skip(PREFIX_MISMATCH, _difference(before_c, before_r))
        prompt = _prompt(before_c, loc, "chosen")
    return [_pair(prompt, c, r, margin, loc)]


def _pair(prompt: Messages, chosen: str, rejected: str, margin: float, loc: str) -> PreferencePair:
    _nonempty(chosen, rejected)
    if chosen == rejected:
        raise _Skip(IDENTICAL)
    return PreferencePair(prompt, chosen, rejected, margin=margin, source=loc)


def _hh(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    chosen = _get(row, "chosen", "an HH-RLHF transcript string", loc, "hh")
    rejected = _get(row, "rejected", "an HH-RLHF transcript string", loc, "hh")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise _wrong_type(loc, name, "an HH-RLHF transcript string", value)
    prompt, c, r = split_hh_pair(chosen, rejected, loc)
    margin = _margin(row.get("margin"), loc, opt.margin_labels)
    return [_pair(prompt, c, r, margin, loc)]


def _ranking(row: dict, k: int, loc: str) -> list[int]:
    """Response indices best first, from ``ranking`` (indices) or ``ranks`` (rank per response)."""
    if row.get("ranking") is not None:
        name, order = "ranking", row["ranking"]
    elif row.get("ranks") is not None:
        name, order = "ranks", row["ranks"]
    else:
        raise DataError(
            f"{loc}: missing field 'ranking' (expected a list of response indices, best first) "
            f"or 'ranks' (a rank per response, lower is better) for format 'ranked'; "
            f"the row has fields {sorted(row)}"
        )
    if not isinstance(order, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in order
    ):
        raise _wrong_type(loc, name, "a list of integers", order)
    if name == "ranks":
        base = min(order, default=0)
        if len(order) != k or sorted(order) != list(range(base, base + k)) or base not in (0, 1):
            raise DataError(
                f"{loc}: field 'ranks' must give each of the {k} responses a distinct rank "
                f"1..{k} (or 0..{k - 1}), lower is better; got {order}"
            )
        return sorted(range(k), key=lambda i: order[i])
    if sorted(order) != list(range(k)):
        raise DataError(
            f"{loc}: field 'ranking' must be a permutation of the response indices 0..{k - 1}, "
            f"best first; got {order}"
        )
    return order


def _ranked(row: dict, loc: str, opt: NormaliseOptions) -> list[Record | _SkipRecord]:
    prompt = _prompt(_get(row, "prompt", _PROMPT, loc, "ranked"), loc)
    responses = _get(row, "responses", "a list of response strings", loc, "ranked")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _wrong_type(loc, "responses", "a list of at least 2 responses", responses)
    texts = [_reply_to(prompt, r, f"responses[{i}]", loc) for i, r in enumerate(responses)]
    order = _ranking(row, len(texts), loc)
    pairs, skips = [], []
    for a in range(len(order)):  # every (better, worse) combination, best first
        for b in range(a + 1, len(order)):
            where = f"{loc} (responses {order[a]}>{order[b]})"
            try:
                pairs.append(_pair(prompt, texts[order[a]], texts[order[b]], 0.0, where))
            except _Skip as s:
                skips.append((s, where))
    if opt.group_rankings and pairs:
        for p in pairs:  # each prompt weighs as one example (InstructGPT), whatever its k
            p.group, p.weight = opt.next_group, 1.0 / len(pairs)
        opt.next_group += 1
    return pairs + [_SkipRecord(s.reason, where) for s, where in skips]


def _unpaired(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    prompt = _prompt(_get(row, "prompt", _PROMPT, loc, "unpaired"), loc)
    completion = _get(row, "completion", _RESPONSE, loc, "unpaired")
    completion = _reply_to(prompt, completion, "completion", loc)
    label = _label(_get(row, "label", "a bool (true/false, 0/1)", loc, "unpaired"), loc)
    _nonempty(completion)
    return [UnpairedExample(prompt, completion, label, source=loc)]


def _label(value, loc: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
        return value.strip().lower() in ("true", "1")
    raise _wrong_type(loc, "label", "a bool (true/false, or 0/1)", value)


def _ratings(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    prompt = _prompt(_get(row, "prompt", _PROMPT, loc, "ratings"), loc)
    response = _reply_to(prompt, _get(row, "response", _RESPONSE, loc, "ratings"), "response", loc)
    score = _number(_get(row, "score", "a number", loc, "ratings"), "score", loc)
    _nonempty(response)
    return [RatedExample(prompt, response, score, source=loc)]


def _sft(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    if row.get("messages") is not None:
        if not isinstance(row["messages"], list):
            raise _wrong_type(loc, "messages", "a list of chat messages", row["messages"])
        messages = _messages(row["messages"], "messages", loc)
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{loc}: field 'messages' must end with an assistant message")
        before, completion = messages[:-1], messages[-1]["content"]
        if not before:
            raise DataError(
                f"{loc}: field 'messages' needs a user turn before the final assistant reply"
            )
        prompt = _prompt(before, loc, "messages")
        if not completion and "tool_calls" not in messages[-1]:
            raise _Skip(EMPTY_RESPONSE)
        return [SFTExample(prompt, completion, source=loc, messages=messages)]
    expected = "a string or a list of chat messages (or give 'messages' instead)"
    prompt = _prompt(_get(row, "prompt", expected, loc, "sft"), loc)
    completion = _get(row, "completion", expected, loc, "sft")
    completion = _reply_to(prompt, completion, "completion", loc)
    _nonempty(completion)
    return [SFTExample(prompt, completion, source=loc)]


def _critique_pair(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    fmt = "critique_pair"
    prompt = _prompt(_get(row, "prompt", _PROMPT, loc, fmt), loc)
    a = _reply_to(prompt, _get(row, "response_a", _RESPONSE, loc, fmt), "response_a", loc)
    b = _reply_to(prompt, _get(row, "response_b", _RESPONSE, loc, fmt), "response_b", loc)
    critique = _critique_text(row, loc, fmt)
    verdict = _get(row, "verdict", '"A" or "B"', loc, fmt)
    if not isinstance(verdict, str) or verdict.strip().upper() not in ("A", "B"):
        raise _wrong_type(loc, "verdict", '"A" or "B" (the better response)', verdict)
    _nonempty(a, b, critique)
    if a == b:
        raise _Skip(IDENTICAL)
    return [CritiquePair(prompt, a, b, critique, verdict.strip().upper(), source=loc)]


def _critique_point(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    fmt = "critique_point"
    prompt = _prompt(_get(row, "prompt", _PROMPT, loc, fmt), loc)
    response = _reply_to(prompt, _get(row, "response", _RESPONSE, loc, fmt), "response", loc)
    critique = _critique_text(row, loc, fmt)
    score = _number(_get(row, "score", "an integer score", loc, fmt), "score", loc)
    if not score.is_integer():
        raise _wrong_type(loc, "score", "an integer (a grade on the critic's scale)", row["score"])
    _nonempty(response, critique)
    return [CritiquePoint(prompt, response, critique, int(score), source=loc)]


def _critique_text(row: dict, loc: str, fmt: str) -> str:
    critique = _get(row, "critique", "a string", loc, fmt)
    if not isinstance(critique, str):
        raise _wrong_type(loc, "critique", "a string", critique)
    return critique.strip()


@dataclass(frozen=True)
class Format:
    """One input format: its fields (shown in error messages) and its normaliser."""

    fields: str
    normalise: Callable[[dict, str, NormaliseOptions], list[Record | _SkipRecord]]


#: Every format by name, in the order :func:`detect_format` considers them.
FORMATS: dict[str, Format] = {
    "ranked": Format("prompt, responses, ranking|ranks", _ranked),
    "pairwise": Format("prompt, chosen, rejected [, margin]", _pairwise),
    "hh": Format("chosen, rejected as HH-RLHF transcripts [, margin]", _hh),
    "unpaired": Format("prompt, completion, label", _unpaired),
    "critique_pair": Format("prompt, response_a, response_b, critique, verdict", _critique_pair),
    "critique_point": Format("prompt, response, critique, score", _critique_point),
    "ratings": Format("prompt, response, score", _ratings),
    "sft": Format("prompt, completion | messages", _sft),
}


def _present(row: dict, name: str) -> bool:
    return row.get(name) is not None


def detect_format(row: dict, loc: str = "the first row") -> str:
    """Name the format of ``row`` from its fields (the first row decides for a whole file)."""
    has = lambda *names: all(_present(row, n) for n in names)  # noqa: E731
    if has("responses") and (has("ranking") or has("ranks")):
        return "ranked"
    if has("chosen", "rejected"):
        if has("prompt") or not isinstance(row["chosen"], str):
            return "pairwise"
        if _looks_like_hh(row["chosen"]):
            return "hh"
    if has("completion", "label"):
        return "unpaired"
    if has("response_a", "response_b"):
        return "critique_pair"
    if has("response", "critique"):
        return "critique_point"
    if has("response", "score"):
        return "ratings"
    if has("messages") or has("prompt", "completion"):
        return "sft"
    formats = "; ".join(f"{name}: {f.fields}" for name, f in FORMATS.items())
    raise DataError(
        f"{loc}: cannot tell the data format from the fields {sorted(row)}. Known formats and "
        f"their fields: {formats}. Rename the fields or pass format= explicitly"
    )


def normalise_rows(
    rows: Iterable[tuple[str, dict]],
    format: str,
    report: DataReport,
    options: NormaliseOptions | None = None,
) -> list[Record]:
    """Turn ``(location, row)`` pairs into records, counting skips in ``report``."""
    if format not in FORMATS:
        raise DataError(f"unknown format '{format}'; known formats: {', '.join(FORMATS)}")
    opt = options or NormaliseOptions()
    normalise = FORMATS[format].normalise
    records: list[Record] = []
    for loc, row in rows:
        try:
            produced = normalise(row, loc, opt)
        except _Skip as s:
            produced = [_SkipRecord(s.reason, loc)]
            if opt.strict and s.reason in STRUCTURAL:
                raise DataError(f"{loc}: {s.reason}: {s} (strict=True)") from None
        for rec in produced:
            if isinstance(rec, _SkipRecord):
                if opt.strict and rec.reason in STRUCTURAL:
                    raise DataError(f"{rec.source}: {rec.reason} (strict=True)")
                report.skip(rec.reason, rec.source)
            else:
                records.append(rec)
    report.kept += len(records)
    return records
