"""Policy measurements: KL from samples, best-of-N KL, win rate, LM loss."""

import math

import pytest
import torch

from alignkit.eval.metrics import best_of_n_kl, kl_to_reference, lm_loss, response_logprobs, win_rate


def test_kl_of_a_policy_to_itself_is_zero_and_to_another_is_not(tiny_dir, tiny_tokenizer):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    a = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False)
    b = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 1], [12, 1]]
    assert kl_to_reference(a, b, prompts, responses, 0) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        b.lm_head.weight.add_(0.5 * torch.randn_like(b.lm_head.weight))
    diff = response_logprobs(a, prompts, responses, 0) - response_logprobs(b, prompts, responses, 0)
    assert kl_to_reference(a, b, prompts, responses, 0) == pytest.approx(float(diff.mean()), rel=1e-6)
    assert abs(float(diff.mean())) > 1e-3
    # per-token log-probs of the responses only: 3 and 2 tokens, each log p < 0
    assert (response_logprobs(a, prompts, responses, 0) < 0).all()


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def test_win_rate_counts_ties_half():
    score = lambda p, r: len(r)  # noqa: E731
    assert win_rate(score, ["p"] * 3, ["aaa", "a", "aa"], ["a", "aaa", "aa"]) == pytest.approx(0.5)
    assert win_rate(score, ["p"] * 2, ["aaa", "aa"], ["a", "a"]) == 1.0


def test_lm_loss_is_mean_token_nll(tiny_dir, tiny_tokenizer):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)), trainable=False)
    loss = lm_loss(model, tiny_tokenizer, ["The colour of item 3 is red."])
    ids = tiny_tokenizer("The colour of item 3 is red.", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert loss == pytest.approx(float(ref), rel=1e-5)
