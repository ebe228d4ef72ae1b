"""Rollouts: the batch dataclass and its masks, generation, scoring, prompt order, loss reductions."""

from __future__ import annotations

import pytest
import torch

from alignkit.rollout.batch import build_rollout_batch, response_mask_from_ids
from alignkit.rollout.generate import Generations, HFGenerator, SamplingConfig
from alignkit.rollout.rewards import FunctionReward
from alignkit.train.online import (
    LOSS_REDUCTIONS, RewardConfig, build_reward, policy_forward, response_slice, rollout_prompt_indices,
    score_responses,
)

PAD, EOS = 0, 1


def _gens() -> Generations:
    return Generations(
        prompt_ids=[[5, 6, 7], [8], [9, 10], [11, 12]],
        response_ids=[
            [20, 21, EOS],  # finished
            [22, EOS, 23, 24],  # a backend returned tokens after EOS
            [25, 26, 27, 28, 29],  # never ended
            [EOS],  # empty answer, just EOS
        ],
        texts=["a", "b", "c", ""],
        finished=[True, True, False, True],
        prompt_index=[0, 1, 2, 2],
    )


def test_masks_stop_after_eos_and_exclude_padding():
    b = build_rollout_batch(_gens(), PAD, EOS)
    assert b.prompt_width == 3 and b.response_ids.shape == (4, 5)
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],  # 23, 24 after EOS: never counted
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ], dtype=torch.float)
    assert torch.equal(b.response_mask, expected)
    assert b.response_ids[1].tolist() == [22, EOS, PAD, PAD, PAD]  # replaced by padding
    assert b.finished.tolist() == [True, True, False, True]
    assert b.response_lengths.tolist() == [3, 2, 5, 1]
    # prompts left padded, responses right padded, one attention mask over both
    assert b.input_ids[1].tolist() == [PAD, PAD, 8, 22, EOS, PAD, PAD, PAD]
    assert b.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert b.position_ids[1, 2:5].tolist() == [0, 1, 2]  # counted from the first real token
    assert b.prompt_index.tolist() == [0, 1, 2, 2]
    sub = b.select([2, 0])
    assert len(sub) == 2 and torch.equal(sub.response_mask[1], expected[0])


def test_response_mask_from_ids_handles_pad_equal_to_eos():
    ids = torch.tensor([[4, 5, 1, 1, 1], [4, 1, 9, 9, 1]])
    mask = response_mask_from_ids(ids, torch.tensor([3, 5]), eos_id=1)
    assert mask.long().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_padding_and_tokens_after_eos_never_reach_a_loss(tiny_dir):
    """Corrupt every masked position (token ids, old log-probs, values, advantages, returns):
    the PPO loss and its gradient do not change.

    (Garbage, not NaN: the loss functions mask NaN out of the forward value, but torch.where's
    backward multiplies a zero gradient by the NaN's local derivative. The rollout never holds
    NaN: every per-token field is multiplied by the mask when it is built.)"""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.train.ppo import ActorCritic, PPOConfig, ppo_loss, shared_value_head

    torch.manual_seed(0)
    cfg = PPOConfig()
    policy = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    model = ActorCritic(policy, shared_value_head(cfg, policy), shared=True)
    torch.nn.init.normal_(model.critic.weight, std=0.1)
    b = build_rollout_batch(_gens(), PAD, EOS)
    B, T = b.response_ids.shape
    m = b.response_mask.bool()
    b.logps, b.ref_logps = -torch.rand(B, T) * m, -torch.rand(B, T) * m
    b.values, b.returns, b.advantages = torch.randn(B, T) * m, torch.randn(B, T) * m, torch.randn(B, T) * m

    bad = b.select(slice(None))
    noise = torch.randint(30, 200, b.input_ids.shape)
    full_mask = b.attention_mask.bool()
    bad.input_ids = torch.where(full_mask, b.input_ids, noise)  # left padding and after-EOS slots
    bad.response_ids = bad.input_ids[:, b.prompt_width :]
    for name in ("logps", "ref_logps", "values", "returns", "advantages"):
        setattr(bad, name, torch.where(m, getattr(b, name), -3 * torch.rand(B, T)))

    def loss_and_grad(batch):
        model.zero_grad()
        losses, _ = ppo_loss(model, batch, cfg, loss_kl_coef=0.1)
        weights, units = LOSS_REDUCTIONS["token"](batch.response_mask)
        from alignkit.ops import masked_sum

        loss = masked_sum(losses * weights, batch.response_mask) / units
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    clean_loss, clean_grad = loss_and_grad(b)
    bad_loss, bad_grad = loss_and_grad(bad)
    assert torch.allclose(clean_loss, bad_loss, atol=1e-6)
    assert torch.allclose(clean_grad, bad_grad, atol=1e-6)


def test_recomputed_logits_line_up_with_generation(tiny_dir, tiny_tokenizer):
    """Greedy samples are the argmax of the recomputed logits at every kept position: left padding,
    position ids and the response slice are aligned with what generate() saw."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    gen = HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=8, temperature=0.0, generation_batch_size=3))
    prompts = [[{"role": "user", "content": "Hi"}],
               [{"role": "user", "content": "What is the colour of item 12 and item 13 and the fox?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}]]
    gens = gen.generate(prompts, n=2)
    assert len(gens.texts) == 6 and gens.prompt_index == [0, 0, 1, 1, 2, 2]
    b = build_rollout_batch(gens, tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id)
    with torch.no_grad():
        logits = response_slice(model(**b.model_inputs()).logits, b)  # (B, T, V)
        logps = policy_forward(model, b, temperature=0.0).logps
    m = b.response_mask.bool()
    assert torch.equal(logits.argmax(-1)[m], b.response_ids[m])
    # greedy (temperature 0) reads the undivided distribution: each sampled token has the largest log-prob
    torch.testing.assert_close(logps[m], logits.log_softmax(-1).amax(-1)[m])
    assert (logps[~m] == 0).all() and (logps[m] < 0).all()


def test_sampling_with_top_k_zero_is_not_truncated(tiny_dir, tiny_tokenizer):
    """top_k=0 samples the whole distribution (transformers fills top_k=None with 50, which
    would truncate it): with nearly uniform (distinct) logits over the 320-token vocabulary, far
    more than 50 distinct tokens come out."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    model.lm_head.register_forward_hook(lambda module, inputs, out: torch.arange(out.shape[-1]).expand_as(out) * 1e-4)
    gens = HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=4, top_k=0)).generate(
        [[{"role": "user", "content": "Hi"}]], n=64, seed=0)
    assert len({t for r in gens.response_ids for t in r}) > 100


def test_generation_is_seeded_locally_and_leaves_the_global_rng_alone(tiny_dir, tiny_tokenizer):
    """The same seed gives the same samples, another seed other samples, and torch's global random
    stream is neither reseeded nor read (it used to be reseeded by every seeded call)."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.generate import make_generator

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    gen = make_generator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=12, generation_batch_size=4))
    prompts = [[{"role": "user", "content": f"Item {i}?"}] for i in range(6)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = (gen.generate(prompts, n=2, seed=s).response_ids for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a != c
    with pytest.raises(ValueError, match="sampling.backend must be one of hf"):
        make_generator(model, tiny_tokenizer, SamplingConfig(backend="vllm2"))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampling_refuses_non_finite_logits_naming_the_weights(tiny_dir, tiny_tokenizer, temperature):
    """A diverged policy (NaN weights) stops sampling with a NonFiniteError that names the
    non-finite weights, never a traceback from transformers' sampler; finite weights whose
    forward overflows get the other cause."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.numerics import NonFiniteError

    model = load_causal_lm(ModelConfig(path=str(tiny_dir))).train()
    gen = HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=4, temperature=temperature))
    prompt = [[{"role": "user", "content": "Hi"}]]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"logits are NaN or inf .* weights are not finite \(model.layers.0.mlp.down_proj"):
        gen.generate(prompt, seed=0)
    assert model.training  # the mode is restored
    model = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    model.lm_head.register_forward_hook(lambda module, inputs, out: out * float("inf"))
    with pytest.raises(NonFiniteError, match="weights are finite, so the forward pass overflowed"):
        HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=4, temperature=temperature)).generate(prompt)


def test_unfinished_penalty_whitening_and_clipping():
    reward = FunctionReward(lambda p, r: float(len(r)))
    prompts = [[{"role": "user", "content": "x"}]] * 3
    raw, scores = score_responses(reward, prompts, ["a", "bb", "ccc"], torch.tensor([True, False, True]), 0.5)
    assert raw.tolist() == [1.0, 2.0, 3.0] and scores.tolist() == [1.0, 1.5, 3.0]
    whitened = build_reward(RewardConfig(whiten=True, clip=1.0), reward)
    first = whitened(prompts, ["a", "bb", "ccc"])
    assert torch.allclose(first, torch.tensor([-1.0, 0.0, 1.0]))
    assert whitened(prompts, ["a" * 10] * 3).tolist() == [1.0] * 3  # fixed μ, σ; then clipped
    with pytest.raises(ValueError, match="reward_models"):
        build_reward(RewardConfig())


def test_prompt_order_covers_every_prompt_each_epoch_and_is_reproducible():
    n, per = 10, 4
    stream = [i for k in range(5) for i in rollout_prompt_indices(n, per, seed=3, k=k)]  # 20 = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert rollout_prompt_indices(n, per, 3, 2) == stream[8:12]


def test_loss_reductions_do_not_depend_on_the_split():
    torch.manual_seed(0)
    losses = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[0] = 0  # an empty response still counts as a sequence, with zero loss
    for name, reduce in LOSS_REDUCTIONS.items():
        w, units = reduce(mask)
        whole = (losses * w * mask).sum() / units
        parts = [reduce(mask[i : i + 2]) for i in range(0, 6, 2)]
        total_units = sum(u for _, u in parts)
        split = sum((losses[i : i + 2] * w_ * mask[i : i + 2]).sum() for (w_, _), i in zip(parts, range(0, 6, 2))) / total_units
        assert torch.allclose(whole, split), name
    w, units = LOSS_REDUCTIONS["sequence"](mask)
    per_seq = [(losses[i] * mask[i]).sum() / mask[i].sum() for i in range(1, 6)]
    assert torch.allclose((losses * w * mask).sum() / units, torch.stack(per_seq).sum() / 6)
