"""Dropout off everywhere (modules, functional dropout, attention dropout, layerdrop, configs),
for every family and through peft, so that PPO's first ratio π_θ/π_old is exactly 1."""

from __future__ import annotations

import pytest
import torch

from alignkit.models.dropout import disable_dropout
from alignkit.models.factory import tiny_family_model

#: family -> dropout settings > 0 in that family's own names (functional and attention dropout included)
DROPOUTS = {
    "opt": dict(dropout=0.2, attention_dropout=0.2, activation_dropout=0.2, layerdrop=0.3),
    "gpt2": dict(resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2),
    "llama": dict(attention_dropout=0.3),
    "gpt_neox": dict(attention_dropout=0.2, hidden_dropout=0.2),
    "phi3": dict(attention_dropout=0.2, resid_pdrop=0.2, embd_pdrop=0.2),
    "bert": dict(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2),
}


def _two_train_forwards(model, ids):
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(DROPOUTS))
def test_disable_dropout_makes_train_mode_forwards_identical(family, attn, tiny_tokenizer):
    head = "scalar" if family == "bert" else "causal_lm"
    model = tiny_family_model(family, tiny_tokenizer, head=head, attn_implementation=attn, **DROPOUTS[family])
    ids = torch.randint(4, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = _two_train_forwards(model, ids)
    assert not torch.equal(a, b), "the settings above must make this model stochastic in train mode"
    disable_dropout(model)
    a, b = _two_train_forwards(model, ids)
    assert torch.equal(a, b)
    # the config records it too (what is saved is what was trained)
    assert all(getattr(model.config, k) == 0 for k in DROPOUTS[family])


def test_disable_dropout_through_peft(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_family_model("opt", tiny_tokenizer, **DROPOUTS["opt"])
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(4, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    disable_dropout(model)
    a, b = _two_train_forwards(model, ids)
    assert torch.equal(a, b)


def test_ppo_first_update_ratio_is_exactly_one_on_opt(tiny_tokenizer, tmp_path):
    """OPT applies `nn.functional.dropout(p=config.dropout)`; switching only nn.Dropout modules
    off left a mean first-update ratio of 0.99873 here (0.994 in the issue's run) where it must be exactly 1."""
    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.rollout.rewards import FunctionReward
    from alignkit.train.online import RolloutConfig
    from alignkit.train.ppo import PPOConfig, run_ppo

    model = tiny_family_model("opt", tiny_tokenizer, dropout=0.2, attention_dropout=0.2, activation_dropout=0.2)
    model.save_pretrained(tmp_path / "opt")
    tiny_tokenizer.save_pretrained(tmp_path / "opt")
    cfg = PPOConfig(
        model=ModelConfig(path=str(tmp_path / "opt")),
        optim=OptimConfig(lr=1e-3, batch_size=4, warmup_ratio=0.0, schedule="constant"),
        run=RunConfig(output_dir=str(tmp_path / "out"), progress=False, report_to="jsonl"),
        sampling=SamplingConfig(max_new_tokens=6),
        rollout=RolloutConfig(prompts_per_rollout=4, num_rollouts=1, ppo_epochs=1),
        value_model="shared",
    )
    prompts = [[{"role": "user", "content": f"Item {i}?"}] for i in range(4)]
    result = run_ppo(cfg, prompts, reward=FunctionReward(lambda p, r: float(len(r))))
    first = result.history[0]
    assert (first["ratio"], first["approx_kl"]) == (1.0, 0.0)
