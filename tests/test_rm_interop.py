"""Reward models score the same in alignkit and in plain transformers.

A saved reward model, loaded with ``AutoModelForSequenceClassification`` and given the text its own
saved chat template renders (``apply_chat_template(conversation, tokenize=False)`` → tokenizer →
model), must return alignkit's score, alone and in a padded batch made by the saved tokenizer,
whatever the pad token was (docs/templates.md).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from alignkit.config import build_config
from alignkit.models.factory import TinyModelConfig, tiny_llama
from alignkit.rollout.rewards import RewardModel
from alignkit.train.rm import RMConfig, run_rm, save_reward_model

from chat_styles import END_OF_TURN, styled_tokenizer
from conftest import write_jsonl

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

#: style -> the pad token its base model has: pad == EOS (ChatML as SmolLM2/Qwen2.5 ship it, and a
#: template-less tokenizer), and pad == the end of turn (Llama 3 fine-tunes often set it so).
CASES = {"chatml": "<|endoftext|>", "llama3": "<|eot_id|>", "plain": "<eos>"}

CONVERSATIONS = [
    ([USER("What colour is item 3?")], "The colour of item 3 is red."),
    ([{"role": "system", "content": "Be brief."}, USER("What colour is item 11?")], "No."),
    ([USER("What is 2 plus 3?"), {"role": "assistant", "content": "5."}, USER("And item 4?")], "Item 4 is blue, I think."),
]


def pair_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randint(0, 29)
        rows.append({"prompt": f"What colour is item {i}?", "chosen": f"The colour of item {i} is red.",
                     "rejected": rng.choice(["No. Go away.", "Whatever."])})
    return rows


def base_model(path, style, pad):
    tok = styled_tokenizer(style)
    tok.pad_token = pad
    model = tiny_llama(tok, SHAPE)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    style = request.param
    tmp = tmp_path_factory.mktemp(f"rm-{style}")
    base = base_model(tmp / "base", style, CASES[style])
    cfg = build_config(RMConfig, overrides=[
        f"model.path={base}", f"data.path={write_jsonl(tmp / 'pairs.jsonl', pair_rows(32))}", "optim.lr=3e-3",
        "optim.batch_size=8", "optim.max_steps=3", f"run.output_dir={tmp / 'rm'}", "run.progress=false"])
    run_rm(cfg)
    return style, tmp / "rm"


def plain_scores(path, texts: list[str], batched: bool) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        if batched:  # padded by the saved tokenizer, as a reward server would
            enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
            return model(**enc).logits[:, 0]
        return torch.stack([model(**tok(t, add_special_tokens=False, return_tensors="pt")).logits[0, 0] for t in texts])


def test_saved_rm_scores_as_plain_transformers_on_template_text(trained):
    style, path = trained
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False) for p, r in CONVERSATIONS]
    eot, trailer = END_OF_TURN[style]
    assert all(t.endswith(r + eot + trailer) for t, (_, r) in zip(texts, CONVERSATIONS))
    ours = RewardModel(str(path))([p for p, _ in CONVERSATIONS], [r for _, r in CONVERSATIONS])
    single, batched = plain_scores(path, texts, batched=False), plain_scores(path, texts, batched=True)
    assert torch.allclose(ours, single, atol=1e-4), (ours, single)
    assert torch.allclose(ours, batched, atol=1e-4), (ours, batched)
    assert len(set(ours.tolist())) == len(texts)  # a real comparison: the scores differ


def test_saved_rm_pads_with_a_token_that_cannot_end_a_conversation(trained):
    style, path = trained
    from transformers import AutoConfig, AutoTokenizer

    tok, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    eot, trailer = END_OF_TURN[style]
    ending = set(tok(eot + trailer, add_special_tokens=False)["input_ids"]) | {tok.eos_token_id}
    assert config.pad_token_id == tok.pad_token_id and tok.pad_token_id not in ending
    assert tok.pad_token != CASES[style]
    saved = json.loads((path / "config.json").read_text())
    assert "reward_offset" not in saved and "reward_scale" not in saved
    assert isinstance(saved["alignkit_reward_mean"], float) and saved["alignkit_reward_mean_folded"] is False


def test_reward_scale_is_folded_into_the_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = base_model(tmp_path / "base", "chatml", "<|endoftext|>")
    tok = styled_tokenizer("chatml")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    ids = tok("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        raw = model(input_ids=ids).logits[0, 0]
    save_reward_model(model, tok, tmp_path / "rm", reward_scale=2.5, reward_mean=0.3)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits[0, 0], 2.5 * raw, atol=1e-5)
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["alignkit_reward_mean"] == pytest.approx(0.75) and saved["alignkit_reward_mean_folded"] is False


def test_a_head_with_a_bias_absorbs_the_mean_exactly(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    tok = styled_tokenizer("gemma")
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                     pad_token_id=tok.pad_token_id)).eval()
    ids = tok("<start_of_turn>user\nHi<end_of_turn>\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        raw = model(input_ids=ids).logits[0, 0]
    save_reward_model(model, tok, tmp_path / "rm", reward_scale=2.0, reward_mean=0.3)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits[0, 0], 2.0 * raw - 0.6, atol=1e-5)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["alignkit_reward_mean_folded"] is True


def test_a_new_pad_token_when_the_vocabulary_has_no_spare_one(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = base_model(tmp_path / "base", "llama3", "<|eot_id|>")
    tok = styled_tokenizer("llama3")
    tok.pad_token = "<|eot_id|>"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rows = model.get_input_embeddings().num_embeddings
    save_reward_model(model, tok, tmp_path / "rm")
    saved = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert saved.pad_token == "<|pad|>" and saved.pad_token_id == rows
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").get_input_embeddings().num_embeddings == rows + 1
    assert tok.pad_token == "<|eot_id|>"  # the caller's tokenizer is left alone
    spare = styled_tokenizer("llama3")
    spare.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_0|>"]})
    spare.pad_token = "<|eot_id|>"
    save_reward_model(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), spare, tmp_path / "rm2")
    assert AutoTokenizer.from_pretrained(tmp_path / "rm2").pad_token == "<|reserved_special_token_0|>"


def test_models_that_calibrated_at_read_time_are_refused(trained):
    _, path = trained
    import shutil

    old = path.parent / "old"
    shutil.copytree(path, old, dirs_exist_ok=True)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "reward_offset": 0.37, "reward_scale": 1.0}))
    with pytest.raises(ValueError, match=r"older alignkit .* reward_offset=0.37.* delete reward_offset and reward_scale"):
        RewardModel(str(old))
