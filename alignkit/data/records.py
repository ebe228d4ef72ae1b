"""Normalised records: what every input format becomes before tokenisation.

A prompt is always a list of chat messages ``{"role": "system"|"user"|"assistant"|"tool",
"content": str}`` ending with a user (or tool) turn; an assistant message may also carry
``tool_calls`` and a tool message ``tool_call_id`` / ``name``, passed to the chat template as they
are. Responses are plain strings (the final assistant reply). ``source`` says
where the record came from (``"data.jsonl:17"``, ``"data.parquet[16]"``) so that errors and reports
can point at the offending input.
"""

from __future__ import annotations

from dataclasses import dataclass

Messages = list[dict]
"""A chat conversation: ``[{"role": "user", "content": "..."}, ...]``."""


def message_text(content, where: str = "content") -> str:
    """A message's content as text: a string as is, ``None`` (an assistant message that only
    calls tools) as ``""``, and OpenAI/Hugging Face list content ``[{"type": "text", "text":
    ...}, ...]`` as its text parts joined with nothing between them, which is how text-only and
    multimodal chat templates render such lists. Other part types (images, audio) raise
    ``ValueError``: alignkit trains on text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"'{where}[{i}]' is a {kind!r} part; only text parts "
                                 '({"type": "text", "text": "..."}) can be trained on')
        return "".join(texts)
    raise ValueError(f"'{where}' must be a string or a list of text parts, got {type(content).__name__}")


@dataclass
class PreferencePair:
    """One human comparison: ``chosen`` was preferred to ``rejected`` as a reply to ``prompt``."""

    prompt: Messages
    chosen: str
    rejected: str
    margin: float = 0.0
    """How much better ``chosen`` is (Llama 2's margin term); 0 when the data says nothing."""
    group: int = -1
    """Id shared by the pairs expanded from one k-way ranking when kept together, else -1."""
    weight: float = 1.0
    """Loss weight: 1, or 1/(number of pairs) for the pairs of one ranking kept together."""
    source: str = ""


@dataclass
class UnpairedExample:
    """One completion judged good (``label=True``) or bad on its own (KTO's data)."""

    prompt: Messages
    completion: str
    label: bool
    source: str = ""


@dataclass
class RatedExample:
    """One response with a scalar score (regression reward models)."""

    prompt: Messages
    response: str
    score: float
    source: str = ""


@dataclass
class SFTExample:
    """One demonstration: the model learns ``completion`` given ``prompt``."""

    prompt: Messages
    completion: str
    source: str = ""
    messages: Messages | None = None
    """The whole conversation when the record came from a ``messages`` row (``prompt`` then the
    final assistant message, tool calls included): its earlier assistant turns are
    demonstrations too (trained with ``assistant_turns="all"``, see
    :mod:`alignkit.data.tokenize`). None for prompt/completion rows, whose prompt is context."""


@dataclass
class TextExample:
    """One plain text for language modelling: every token is a target (pretraining, PPO-ptx)."""

    text: str
    source: str = ""


@dataclass
class PromptExample:
    """A prompt with no response: what the online methods (PPO, GRPO, RLOO, rejection sampling)
    sample from."""

    prompt: Messages
    source: str = ""


@dataclass
class ResponseExample:
    """One response with no score or label: what `alignkit score` scores."""

    prompt: Messages
    response: str
    source: str = ""


@dataclass
class CritiquePair:
    """One written comparison: a critique of two responses to ``prompt`` ending in a verdict,
    the training data of a pairwise critique (generative) reward model."""

    prompt: Messages
    response_a: str
    response_b: str
    critique: str
    """Free text that evaluates both responses (the verdict itself is kept in ``verdict``)."""
    verdict: str
    """``"A"`` or ``"B"``: the better response."""
    source: str = ""


@dataclass
class CritiquePoint:
    """One written evaluation of a single response, ending in an integer score (pointwise critic)."""

    prompt: Messages
    response: str
    critique: str
    """Free text that evaluates the response (the score itself is kept in ``score``)."""
    score: int
    """The grade, an integer on the critic's scale (1..max_score, see ``alignkit critic``)."""
    source: str = ""


Record = (
    PreferencePair | UnpairedExample | RatedExample | SFTExample | TextExample | PromptExample
    | ResponseExample | CritiquePair | CritiquePoint
)
