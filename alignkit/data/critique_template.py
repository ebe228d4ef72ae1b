"""The critique template: how critique records become (prompt, completion) text for a critique
(generative) reward model, and how a generated critique is read back. Shared by the critic's
trainer (:mod:`alignkit.train.critic`) and its scorer (:mod:`alignkit.rollout.critique`), so
neither imports the other's machinery."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from alignkit.data.records import Messages

#: File next to a trained critic that holds its :class:`CritiqueTemplate`.
TEMPLATE_FILE = "critic.json"


@dataclass
class CritiqueTemplate:
    """How critique records become (prompt, completion) text, and how a generated critique is read."""

    pair: str = ("Critique responses A and B, then give a verdict: A or B.\n\n"
                 "Conversation: {conversation}\n\nResponse A: {response_a}\n\nResponse B: {response_b}")
    """User turn of a pairwise critique; fields {conversation}, {response_a}, {response_b}."""
    point: str = ("Critique the response, then give a verdict: a score from 1 to {max_score}.\n\n"
                  "Conversation: {conversation}\n\nResponse: {response}")
    """User turn of a pointwise critique; fields {conversation}, {response}, {max_score}."""
    verdict_prefix: str = "Verdict:"
    """Marker between the critique and the verdict; generation is read up to it."""
    max_score: int = 5
    """Pointwise scores are the integers 1..max_score."""

    def validate(self) -> None:
        if self.max_score < 2:
            raise ValueError(f"template.max_score must be at least 2, got {self.max_score}")
        for name, fields in (("pair", ("{conversation}", "{response_a}", "{response_b}")),
                             ("point", ("{conversation}", "{response}"))):
            missing = [f for f in fields if f not in getattr(self, name)]
            if missing:
                raise ValueError(f"template.{name} must contain {', '.join(fields)}; missing {', '.join(missing)}")
        if not self.verdict_prefix.strip():
            raise ValueError("template.verdict_prefix must not be empty")

    # ---- options -----------------------------------------------------------------------------
    @property
    def pair_options(self) -> tuple[str, ...]:
        return ("A", "B")

    @property
    def point_options(self) -> tuple[str, ...]:
        return tuple(str(s) for s in range(1, self.max_score + 1))

    # ---- rendering -----------------------------------------------------------------------------
    def pair_prompt(self, prompt: Messages, a: str, b: str) -> Messages:
        text = self.pair.format(conversation=conversation_text(prompt), response_a=a, response_b=b)
        return [{"role": "user", "content": text}]

    def point_prompt(self, prompt: Messages, response: str) -> Messages:
        text = self.point.format(conversation=conversation_text(prompt), response=response, max_score=self.max_score)
        return [{"role": "user", "content": text}]

    def completion(self, critique: str, verdict: str) -> str:
        """The training target: the critique, a new line, the verdict prefix and the verdict."""
        return f"{critique.strip()}\n{self.verdict_prefix} {verdict}"

    def critique_of(self, generated: str) -> str:
        """The critique part of a generated completion: everything before the verdict prefix (all
        of it when generation stopped before reaching one)."""
        return generated.split(self.verdict_prefix, 1)[0].strip()

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / TEMPLATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> CritiqueTemplate:
        """The template saved with a critic, or the default one if the directory has none."""
        path = Path(model_dir) / TEMPLATE_FILE
        if not path.exists():
            return cls()
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def conversation_text(prompt: Messages) -> str:
    """A prompt as the critic reads it: a single user turn as is, a longer conversation as
    ``Human: ...`` / ``Assistant: ...`` lines (``System: ...`` first if any)."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    names = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool"}
    return "\n".join(f"{names[m['role']]}: {m['content']}" for m in prompt)
