"""Shared fixtures: a tiny tokenizer and model built locally (no hub), and small data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's references are exact CPU computations (float64, or float32 with bounds set by the
# CPU's kernels), and a visible GPU would move every trainer onto it (bf16 under
# mixed_precision=auto). So the suite hides GPUs unless ALIGNKIT_TEST_GPU=1, which runs
# tests/test_gpu.py there (README, Tests on a GPU). Before torch starts CUDA, which reads it once.
if os.environ.get("ALIGNKIT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

# The tiny test models run fastest on one thread; two threads on a busy 2-core machine were
# 5-40x slower (OpenMP threads spinning against each other), which would make CI time erratic.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_SAMPLE = SHARED_DATA / "hh-rlhf-harmless-sample.jsonl"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama + byte-level BPE tokenizer saved as a plain HF directory."""
    from alignkit.models.factory import DEFAULT_CORPUS, TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("tiny")
    corpus = DEFAULT_CORPUS * 20 + [f"The colour of item {i} is {c}." for i in range(30) for c in ("red", "blue")]
    return build_tiny_model(out, corpus, TinyModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=2))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from alignkit.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_dir))


def load_script(path: Path, name: str):
    """A script that is not part of the package (benchmarks/, examples/) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
