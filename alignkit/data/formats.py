"""Input formats: detect which one a row is in and normalise it into records.

=========  ==============================================  ===================================
format     fields                                          becomes
=========  ==============================================  ===================================
pairwise   ``prompt``, ``chosen``, ``rejected`` [,          one :class:`PreferencePair`
           ``margin``]; without ``prompt``: full
           conversations (the prompt is what they share
           before the replies) or plain strings (the
           prompt is their longest common prefix, cut
           back to whitespace so no word is split)
hh         ``chosen``, ``rejected``: HH-RLHF transcripts   one :class:`PreferencePair`
           (``\\n\\nHuman: ...\\n\\nAssistant: ...``)
ranked     ``prompt``, ``responses`` (k strings) and       k(k-1)/2 :class:`PreferencePair`
           ``ranking`` or ``ranks``
unpaired   ``prompt``, ``completion``, ``label``            one :class:`UnpairedExample`
ratings    ``prompt``, ``response``, ``score``              one :class:`RatedExample`
response   ``prompt``, ``response`` (no score)             one :class:`ResponseExample`
sft        ``prompt``, ``completion``; or ``messages``      one :class:`SFTExample`
text       ``text``                                        one :class:`TextExample`
prompt     ``prompt`` alone                                one :class:`PromptExample`
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

Mixed files: with the format detected (no ``format=``), each row's format is detected too. A row
of another format is read as what it is when both formats give records the caller reads
(``NormaliseOptions.kinds``; by default the same record type: HH rows and pairwise rows mix);
otherwise it is an error naming the row, the first row and both formats. A row whose fields are
all fields of the file's format (a ratings row without its score reads as format ``response``) is
read as the file's format, so that the error names the missing field.

Demonstrations from comparisons: with ``NormaliseOptions.chosen_as_sft`` each comparison row
(pairwise, hh, ranked) becomes one :class:`SFTExample` of its chosen reply (a ranking's best
non-empty reply), counted and skipped as the comparison would be.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from alignkit.data.readers import read_rows
from alignkit.data.records import (
    CritiquePair,
    CritiquePoint,
    Messages,
    PreferencePair,
    PromptExample,
    RatedExample,
    Record,
    ResponseExample,
    SFTExample,
    TextExample,
    UnpairedExample,
    message_text,
)
from alignkit.data.report import (
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    EMPTY_TEXT,
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
    detect_each_row: bool = False
    """Detect every row's format (the file's format was detected, not given): see the module doc."""
    kinds: tuple[type, ...] = ()
    """Record types the caller reads: rows whose formats give any of these may mix in one file
    (empty: only rows giving the first row's record type)."""
    first: str = ""
    """Location of the file's first row, named when a later row is of an incompatible format."""
    chosen_as_sft: bool = False
    """Read comparisons as demonstrations of their chosen reply (see the module doc)."""


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
    if not isinstance(value, (int, float, str)):
        raise _wrong_type(loc, name, "a number", value)
    try:
        x = float(value)
    except ValueError:
        raise _wrong_type(loc, name, "a number", value) from None
    except OverflowError:  # an integer beyond any float
        x = math.inf
    if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        raise _wrong_type(loc, name, "a finite number within float32's range (|x| <= 3.4e38: the "
                          "losses compute in float32; rescale the values)", value)
    return x


_FLOAT32_MAX = 3.4028234663852886e38


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


def _hh_like(text: str) -> bool:
    """Has a Human turn: an HH-RLHF transcript, if perhaps a malformed one (which is a counted
    skip, while text with no turn at all is another format)."""
    return text.lstrip().startswith("Human:") or "\n\nHuman:" in text


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


def _pairwise_split(row: dict, loc: str) -> tuple[Messages, str, str]:
    """``(prompt, chosen, rejected)`` of a pairwise row, the prompt given or implicit."""
    chosen = _get(row, "chosen", _RESPONSE, loc, "pairwise")
    rejected = _get(row, "rejected", _RESPONSE, loc, "pairwise")
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], loc)
        c = _reply_to(prompt, chosen, "chosen", loc)
        return prompt, c, _reply_to(prompt, rejected, "rejected", loc)
    if isinstance(chosen, str) and isinstance(rejected, str):
        return implicit_prompt(chosen, rejected, loc)
    # Full conversations: the prompt is what they share before the final replies.
    before_c, c = _reply(chosen, "chosen", loc)
    before_r, r = _reply(rejected, "rejected", loc)
    if before_c is None or before_r is None:
        raise DataError(
            f"{loc}: missing field 'prompt' (expected {_PROMPT}) for format 'pairwise'; "
            "without it 'chosen' and 'rejected' must both be full conversations, or both "
            "plain strings that start with the prompt"
        )
    if before_c != before_r:
        raise _Skip(PREFIX_MISMATCH, _difference(before_c, before_r))
    return _prompt(before_c, loc, "chosen"), c, r


def implicit_prompt(chosen: str, rejected: str, loc: str = "") -> tuple[Messages, str, str]:
    """Split two plain texts that start with the same prompt into ``(prompt, chosen, rejected)``.

    The prompt is their longest common prefix (as TRL's ``extract_prompt``), cut back to the last
    whitespace in it so that a word the two replies begin alike ("Four" / "Five") stays whole in
    both replies; like any prompt string it may be an HH-style transcript. Two texts that share
    no whole word are skipped as ``prefix_mismatch``.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = len(shared)
    while cut > 0 and not shared[cut - 1].isspace():  # never split the replies' first word
        cut -= 1
    if not shared[:cut].strip():
        raise _Skip(
            PREFIX_MISMATCH,
            "'chosen' and 'rejected' are plain strings with no 'prompt' field, so the prompt is "
            "their shared beginning, but they share no whole word; give a 'prompt' field",
        )
    return _prompt(shared[:cut], loc, "chosen"), chosen[cut:].strip(), rejected[cut:].strip()


def _pairwise(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    prompt, c, r = _pairwise_split(row, loc)
    margin = _margin(row.get("margin"), loc, opt.margin_labels)
    return [_pair(prompt, c, r, margin, loc)]


def _pair(prompt: Messages, chosen: str, rejected: str, margin: float, loc: str) -> PreferencePair:
    _nonempty(chosen, rejected)
    if chosen == rejected:
        raise _Skip(IDENTICAL)
    return PreferencePair(prompt, chosen, rejected, margin=margin, source=loc)


def _hh_split(row: dict, loc: str) -> tuple[Messages, str, str]:
    chosen = _get(row, "chosen", "an HH-RLHF transcript string", loc, "hh")
    rejected = _get(row, "rejected", "an HH-RLHF transcript string", loc, "hh")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise _wrong_type(loc, name, "an HH-RLHF transcript string", value)
        if not _hh_like(value):  # another format's row, not a damaged transcript: never a skip
            raise DataError(
                f"{loc}: field '{name}' is not an HH-RLHF transcript (no 'Human:' turn), but "
                f"format 'hh' reads every row as one; the row has fields {sorted(row)}. Leave "
                "the format to be detected (rows of pairwise and hh formats may mix), or fix "
                "the row"
            )
    return split_hh_pair(chosen, rejected, loc)


def _hh(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    prompt, c, r = _hh_split(row, loc)
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
    if row.get("messages") is None and _present(row, "chosen") and _present(row, "rejected"):
        raise DataError(
            f"{loc}: format 'sft' needs 'prompt' and 'completion' (or 'messages'), but the row "
            f"has fields {sorted(row)}: it is a comparison. Leave data.format=auto: `alignkit "
            "sft` then trains on the chosen reply of each comparison"
        )
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


def _sft_prompt(row: dict, loc: str) -> Messages:
    if row.get("messages") is not None:
        before, _ = _reply(row["messages"], "messages", loc)
        if before is None:
            raise _wrong_type(loc, "messages", "a list of chat messages", row["messages"])
        return _prompt(before, loc, "messages")
    return _field_prompt(row, loc)


def _text(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    text = _get(row, "text", "a string", loc, "text")
    if not isinstance(text, str):
        raise _wrong_type(loc, "text", "a string", text)
    if not text.strip():
        raise _Skip(EMPTY_TEXT)
    return [TextExample(text, source=loc)]  # as written: whitespace can be part of a document


def _prompt_only(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    return [PromptExample(_field_prompt(row, loc), source=loc)]


def _response(row: dict, loc: str, opt: NormaliseOptions) -> list[Record]:
    prompt = _prompt(_get(row, "prompt", _PROMPT, loc, "response"), loc)
    response = _reply_to(prompt, _get(row, "response", _RESPONSE, loc, "response"), "response", loc)
    _nonempty(response)
    return [ResponseExample(prompt, response, source=loc)]


def _field_prompt(row: dict, loc: str) -> Messages:
    return _prompt(_get(row, "prompt", _PROMPT, loc, "prompt"), loc)


@dataclass(frozen=True)
class Format:
    """One input format: its fields (shown in error messages), its normaliser, the record type it
    gives, and how to read just its prompt (None: the format has no prompt)."""

    fields: str
    normalise: Callable[[dict, str, NormaliseOptions], list[Record | _SkipRecord]]
    kind: type
    names: frozenset[str]
    """Every field the format reads."""
    prompt: Callable[[dict, str], Messages] | None = _field_prompt


def _format(fields, normalise, kind, names: str, prompt=_field_prompt) -> Format:
    return Format(fields, normalise, kind, frozenset(names.split()), prompt)


#: Every format by name, in the order :func:`detect_format` considers them.
FORMATS: dict[str, Format] = {
    "ranked": _format(
        "prompt, responses, ranking|ranks", _ranked, PreferencePair,
        "prompt responses ranking ranks",
    ),
    "pairwise": _format(
        "prompt, chosen, rejected [, margin]", _pairwise, PreferencePair,
        "prompt chosen rejected margin", lambda row, loc: _pairwise_split(row, loc)[0],
    ),
    "hh": _format(
        "chosen, rejected as HH-RLHF transcripts [, margin]", _hh, PreferencePair,
        "chosen rejected margin", lambda row, loc: _hh_split(row, loc)[0],
    ),
    "unpaired": _format(
        "prompt, completion, label", _unpaired, UnpairedExample, "prompt completion label"
    ),
    "critique_pair": _format(
        "prompt, response_a, response_b, critique, verdict", _critique_pair, CritiquePair,
        "prompt response_a response_b critique verdict",
    ),
    "critique_point": _format(
        "prompt, response, critique, score", _critique_point, CritiquePoint,
        "prompt response critique score",
    ),
    "ratings": _format("prompt, response, score", _ratings, RatedExample, "prompt response score"),
    "response": _format(
        "prompt, response (no score)", _response, ResponseExample, "prompt response"
    ),
    "sft": _format(
        "prompt, completion | messages", _sft, SFTExample, "prompt completion messages", _sft_prompt
    ),
    "text": _format("text", _text, TextExample, "text", None),
    "prompt": _format("prompt", _prompt_only, PromptExample, "prompt"),
}


def _present(row: dict, name: str) -> bool:
    return row.get(name) is not None


def detect_format(row: dict, loc: str = "the first row") -> str:
    """Name the format of ``row`` from its fields (see the module doc for mixed files)."""
    has = lambda *names: all(_present(row, n) for n in names)  # noqa: E731
    if has("responses") and (has("ranking") or has("ranks")):
        return "ranked"
    if has("chosen", "rejected"):
        if has("prompt") or not isinstance(row["chosen"], str):
            return "pairwise"
        return "hh" if _hh_like(row["chosen"]) or _hh_like(str(row["rejected"])) else "pairwise"
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
    if has("prompt", "response"):
        return "response"
    if has("text") and not has("prompt"):
        return "text"
    if has("prompt"):
        return "prompt"
    formats = "; ".join(f"{name}: {f.fields}" for name, f in FORMATS.items())
    empty = sorted(k for k, v in row.items() if v is None)
    raise DataError(
        f"{loc}: cannot tell the data format from the fields {sorted(row)}"
        + (f" (empty or null: {empty}, which count as missing)" if empty else "")
        + f". Known formats and their fields: {formats}. Rename the fields or pass format= "
        "explicitly"
    )


def read_source(
    path, format: str | None = None, split: str = "train", limit: int | None = None
) -> tuple[list[tuple[str, dict]], DataReport]:
    """Every ``(location, row)`` of ``path`` and a report holding the count and the file's format
    (``format``, or the first row's detected one)."""
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format '{format}'; known formats: {', '.join(FORMATS)}")
    from alignkit.context import note_data_report

    report = DataReport(source=str(path))
    note_data_report(str(path), report)  # the run's model card states it (counts filled in as it is read)
    rows = list(read_rows(path, split=split, limit=limit))
    if not rows:
        raise DataError(f"{path}: no rows to read")
    report.read = len(rows)
    report.format = format or detect_format(rows[0][1], rows[0][0])
    return rows, report


def record_kind(format: str, options: NormaliseOptions | None = None) -> type:
    """The record type rows of ``format`` become (comparisons become demonstrations with
    ``chosen_as_sft``)."""
    kind = FORMATS[format].kind
    if options is not None and options.chosen_as_sft and kind is PreferencePair:
        return SFTExample
    return kind


def _row_format(row: dict, loc: str, file_format: str, opt: NormaliseOptions) -> str:
    """The format to read ``row`` as, in a file whose first row is ``file_format``."""
    try:
        fmt = detect_format(row, loc)
    except DataError:
        return file_format  # its normaliser names the missing field
    if fmt == file_format:
        return fmt
    kind, file_kind = record_kind(fmt, opt), record_kind(file_format, opt)
    if kind is file_kind or (kind in opt.kinds and file_kind in opt.kinds):
        return fmt
    if {n for n in FORMATS[fmt].names if _present(row, n)} <= FORMATS[file_format].names:
        return file_format  # a row of the file's format missing a field: its normaliser names it
    raise DataError(
        f"{loc}: this row is in format '{fmt}' ({FORMATS[fmt].fields}; the row has fields "
        f"{sorted(row)}), but the file's first row ({opt.first or 'the first row'}) is in format "
        f"'{file_format}' ({FORMATS[file_format].fields}), and the two give different records "
        f"({kind.__name__} vs {file_kind.__name__}). Keep one kind of record per file (split "
        "the file by format), or fix this row"
    )


def _read_as(row: dict, loc: str, file_format: str, report: DataReport, opt: NormaliseOptions) -> str:
    """The format ``row`` is read as, counted in ``report.formats``."""
    fmt = _row_format(row, loc, file_format, opt) if opt.detect_each_row else file_format
    report.formats[fmt] = report.formats.get(fmt, 0) + 1
    return fmt


def _check_strict(skip: _Skip, loc: str, opt: NormaliseOptions) -> None:
    if opt.strict and skip.reason in STRUCTURAL:
        raise DataError(f"{loc}: {skip.reason}: {skip} (strict=True)") from None


def _chosen_reply(produced: list[Record | _SkipRecord], loc: str) -> list[Record | _SkipRecord]:
    """A comparison row's records as one demonstration of its chosen reply. A ranking's pairs come
    best first, so the first kept pair's chosen reply is its best non-empty reply; a row with no
    kept pair keeps its skips."""
    pairs = [r for r in produced if isinstance(r, PreferencePair)]
    if not pairs:
        return produced
    return [SFTExample(pairs[0].prompt, pairs[0].chosen, source=loc)]


def normalise_rows(
    rows: Iterable[tuple[str, dict]],
    format: str,
    report: DataReport,
    options: NormaliseOptions | None = None,
) -> list[Record]:
    """Turn ``(location, row)`` pairs into records, counting skips in ``report``.

    ``format`` is the file's format; with ``options.detect_each_row`` each row is read as the
    format it is in, where that is compatible (see the module doc).
    """
    if format not in FORMATS:
        raise DataError(f"unknown format '{format}'; known formats: {', '.join(FORMATS)}")
    opt = options or NormaliseOptions()
    records: list[Record] = []
    for loc, row in rows:
        fmt = _read_as(row, loc, format, report, opt)
        try:
            produced = FORMATS[fmt].normalise(row, loc, opt)
        except _Skip as s:
            _check_strict(s, loc, opt)
            produced = [_SkipRecord(s.reason, loc)]
        if opt.chosen_as_sft and FORMATS[fmt].kind is PreferencePair:
            produced = _chosen_reply(produced, loc)
        for rec in produced:
            if isinstance(rec, _SkipRecord):
                if opt.strict and rec.reason in STRUCTURAL:
                    raise DataError(f"{rec.source}: {rec.reason} (strict=True)")
                report.skip(rec.reason, rec.source)
            else:
                records.append(rec)
    report.kept += len(records)
    return records


def normalise_prompt(
    row: dict, loc: str, format: str, report: DataReport, options: NormaliseOptions
) -> Messages | None:
    """Just the prompt of one row in a file of ``format`` (any format with a prompt: the replies
    are neither needed nor checked), or None when the row is skipped (counted in ``report``)."""
    fmt = _read_as(row, loc, format, report, options)
    read = FORMATS[fmt].prompt
    if read is None:
        with_prompt = ", ".join(name for name, f in FORMATS.items() if f.prompt is not None)
        raise DataError(
            f"{loc}: a row of format '{fmt}' (fields {sorted(row)}) has no prompt to sample "
            f"from; give rows with a 'prompt' field ({{\"prompt\": \"...\"}} or chat messages), "
            f"or of any format with a prompt: {with_prompt}"
        )
    try:
        return read(row, loc)
    except _Skip as s:
        _check_strict(s, loc, options)
        report.skip(s.reason, loc)
        return None
