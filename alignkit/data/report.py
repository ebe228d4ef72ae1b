"""What happened to the data: the error type for bad input and the :class:`DataReport` counts."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Input data that alignkit cannot use; the message names the file, the row and the fix."""


# Skip reasons, one vocabulary for the formats, the report and the docs.
EMPTY_RESPONSE = "empty_response"
"""A reply (chosen, rejected, completion, response) is empty or only whitespace."""
EMPTY_PROMPT = "empty_prompt"
"""The prompt is empty or only whitespace."""
IDENTICAL = "identical_responses"
"""Chosen and rejected are the same text: the pair carries no preference."""
PREFIX_MISMATCH = "prefix_mismatch"
"""The two conversations of a pair do not share the prompt (HH-RLHF or full-conversation pairs)."""
MALFORMED_TRANSCRIPT = "malformed_transcript"
"""An HH-RLHF transcript whose last turn is not an assistant reply to a Human turn."""
EMPTY_TEXT = "empty_text"
"""A language-modelling ``text`` row is empty or only whitespace."""
DUPLICATE_PROMPT = "duplicate_prompt"
"""A prompt already read from an earlier row (the online methods sample each distinct prompt)."""

_LISTED = 20
"""Mismatched locations printed by :meth:`DataReport.summary` (all are kept in the report)."""

#: Reasons that are structural problems: ``strict=True`` turns them into errors.
STRUCTURAL = (PREFIX_MISMATCH, MALFORMED_TRANSCRIPT)


@dataclass
class DataReport:
    """Counts of everything read, kept, skipped and truncated, for the CLI and the metrics log.

    ``read`` counts input rows; ``kept`` counts records, which can exceed ``read`` because a
    k-way ranking becomes k(k-1)/2 pairs. Skips of expanded pairs are counted per pair.
    """

    source: str = ""
    format: str = ""
    """The format of the first row (the file's format)."""
    formats: dict[str, int] = field(default_factory=dict)
    """Rows read as each format; more than one when rows of compatible formats are mixed."""
    read: int = 0
    """Rows read from the source (after ``limit``)."""
    kept: int = 0
    """Records produced (train + eval)."""
    train: int = 0
    eval: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped rows or pairs by reason (see the reason constants in this module)."""
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    """Up to ``max_examples`` locations per skip reason."""
    mismatched: list[str] = field(default_factory=list)
    """Every location whose two conversations do not share a prompt (all of them, not a sample)."""
    tokenized: int = 0
    """Records turned into token ids."""
    truncated: int = 0
    """Tokenised examples that lost any token to ``max_length`` / ``max_prompt_length``."""
    truncated_prompt: int = 0
    """... of which the prompt was cut (its beginning is dropped)."""
    truncated_response: int = 0
    """... of which a response was cut (its end is dropped, EOS included)."""
    truncated_examples: list[str] = field(default_factory=list)
    """Up to ``max_examples`` locations of truncated examples."""
    max_examples: int = 5

    def skip(self, reason: str, location: str) -> None:
        """Count one skipped row or pair and remember a few locations."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.skip_examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(location)
        if reason == PREFIX_MISMATCH:
            self.mismatched.append(location)

    def truncate(self, location: str, prompt: bool, response: bool) -> None:
        """Count one truncated example (``prompt``/``response``: which part lost tokens)."""
        self.truncated += 1
        self.truncated_prompt += int(prompt)
        self.truncated_response += int(response)
        if len(self.truncated_examples) < self.max_examples:
            self.truncated_examples.append(location)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """A few human-readable lines, printed by the CLI."""
        if len(self.formats) > 1:
            first = sorted(self.formats.items(), key=lambda kv: (kv[0] != self.format, kv[0]))
            fmt = "formats " + ", ".join(f"{name} {n} rows" for name, n in first)
        else:
            fmt = f"format {self.format or '?'}"
        head = f"data {self.source or '?'} ({fmt}): "
        head += f"read {self.read} rows, kept {self.kept} records"
        if self.kept:
            head += f" (train {self.train}, eval {self.eval})"
        lines = [head]
        if self.skipped:
            lines.append(f"  skipped {self.total_skipped}:")
            for reason, count in sorted(self.skipped.items()):
                where = ", ".join(self.skip_examples.get(reason, []))
                more = " ..." if count > len(self.skip_examples.get(reason, [])) else ""
                lines.append(f"    {reason}: {count} (e.g. {where}{more})")
        if self.mismatched:
            shown = self.mismatched[:_LISTED]
            hidden = len(self.mismatched) - len(shown)
            rest = f" ... ({hidden} more)" if hidden else ""
            lines.append(
                f"  {len(self.mismatched)} pair(s) whose conversations do not share a prompt "
                f"were skipped (strict=True makes this an error): {', '.join(shown)}{rest}"
            )
        if self.tokenized:
            line = f"  tokenized {self.tokenized}, truncated {self.truncated}"
            if self.truncated:
                line += (
                    f" (prompt {self.truncated_prompt}, response {self.truncated_response}; "
                    f"e.g. {', '.join(self.truncated_examples)})"
                )
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, int]:
        """Flat numeric form for the metrics log, every key under ``data/``."""
        out = {
            "data/read": self.read,
            "data/kept": self.kept,
            "data/train": self.train,
            "data/eval": self.eval,
            "data/skipped": self.total_skipped,
            "data/tokenized": self.tokenized,
            "data/truncated": self.truncated,
            "data/truncated_prompt": self.truncated_prompt,
            "data/truncated_response": self.truncated_response,
        }
        for reason, count in sorted(self.skipped.items()):
            out[f"data/skipped/{reason}"] = count
        return out
