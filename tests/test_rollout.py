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


# ---- the decode loop: each sample equals model.generate on its prompt alone ------------------------

_PROMPTS = [[{"role": "user", "content": "Hi"}],
            [{"role": "user", "content": "What is the colour of item 12 and item 13 and the fox, and why?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."}],
            [{"role": "user", "content": "Tell me about the river and the old mill."}]]


class _DrawFrom:
    """Reference sampler for ``model.generate``: draw from softmax(scores) with one given stream
    (the same draw rule; what is compared is everything around it: batching, caches, order)."""

    def __init__(self, rng):
        self.rng = rng

    def __call__(self, input_ids, scores):
        from alignkit.rollout.generate import draw_tokens

        token = draw_tokens(scores, [self.rng])[:, None]  # (1, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def _reference(model, tok, gen: HFGenerator, prompt_ids: list[int], seed: int | None) -> list[int]:
    """``model.generate`` on one prompt (no padding, no batch), greedy or drawing from ``seed``'s stream."""
    from transformers import LogitsProcessorList

    procs = LogitsProcessorList(list(gen._processors()) + ([_DrawFrom(torch.Generator().manual_seed(seed))] if seed is not None else []))
    out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=gen.sampling.max_new_tokens, eos_token_id=gen.stop_ids, pad_token_id=tok.pad_token_id,
                         do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=procs)
    new = out[0, len(prompt_ids):].tolist()
    stop = next((k for k, t in enumerate(new) if t in gen.stop_ids), None)
    return new if stop is None else new[: stop + 1]


def _favour_eos(model, tok, bump: float = 4.5):
    """Raise the EOS logit so that samples stop at different lengths (a random tiny model rarely stops)."""
    def hook(module, inputs, out):
        out = out.clone()
        out[..., tok.eos_token_id] += bump
        return out
    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_every_sample_equals_generate_on_its_prompt_alone(tiny_dir, tiny_tokenizer, temperature, top_p):
    """Sorted batches, shared prefills, dropped finished rows and the order restored: sample j (in
    the caller's order) is exactly what ``model.generate`` gives for its prompt alone, greedy or
    drawing from sample j's own stream."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir))).eval()
    _favour_eos(model, tiny_tokenizer)
    gen = HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                                            generation_batch_size=5))
    gens = gen.generate(_PROMPTS, n=3, seed=11)
    assert gens.prompt_index == [i for i in range(4) for _ in range(3)]
    seeds = gen.sample_seeds(12, 11) if temperature > 0 else [None] * 12
    lengths = set()
    for j, (ids, resp, fin) in enumerate(zip(gens.prompt_ids, gens.response_ids, gens.finished)):
        assert resp == _reference(model, tiny_tokenizer, gen, ids, seeds[j]), j
        assert fin == (resp[-1] in gen.stop_ids)
        lengths.add(len(resp))
    if temperature > 0:  # (greedy with the EOS bump stops at once)
        assert len(lengths) > 1  # rows stopped at different steps: the dropping was exercised


def test_samples_do_not_depend_on_the_batching(tiny_dir, tiny_tokenizer):
    """generation_batch_size (1, 4, 64) changes which samples share a batch and their order in it,
    never a sample: each draws from its own stream and comes back at its own place."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    _favour_eos(model, tiny_tokenizer)
    outs = [HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=8, generation_batch_size=b)).generate(
        _PROMPTS, n=2, seed=3) for b in (1, 4, 64)]
    assert outs[0].response_ids == outs[1].response_ids == outs[2].response_ids
    assert outs[0].prompt_index == outs[2].prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]


def _forward_rows(model):
    """Record (rows, width, padding tokens) of every forward call."""
    calls = []

    def hook(module, args, kwargs):
        ids, att = kwargs["input_ids"], kwargs.get("attention_mask")
        pads = int((att[:, : ids.shape[1]] == 0).sum()) if att is not None and ids.shape[1] > 1 else 0
        calls.append((ids.shape[0], ids.shape[1], pads))
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("unpadded", [True, False])
def test_prefill_once_per_prompt_sorted_by_length_and_finished_rows_leave(tiny_dir, tiny_tokenizer, unpadded, monkeypatch):
    """The savings, counted on the model's forward calls: each distinct prompt is prefilled once
    for its n samples (alone, without padding; or, for a cache the loop cannot pad, in one
    left-padded batch); batches are cut from the length-sorted prompts; a finished sample is never
    computed again (decode rows = Σ (response length − 1)). Both prefills give the same samples."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    _favour_eos(model, tiny_tokenizer)
    gen = HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=10, generation_batch_size=4))
    prompts = [_PROMPTS[0], _PROMPTS[1], _PROMPTS[2], _PROMPTS[3]]  # short, long, short, long
    lengths = [len(ids) for ids in gen.generate(prompts).prompt_ids]
    expected = gen.generate(prompts, n=2, seed=5).response_ids
    if not unpadded:
        monkeypatch.setattr(HFGenerator, "_prefill_unpadded", lambda self, *a: (None, None))
    calls = _forward_rows(model)
    gens = gen.generate(prompts, n=2, seed=5)
    assert gens.response_ids == expected
    prefills = [c for c in calls if c[1] > 1]
    decodes = [c for c in calls if c[1] == 1]
    by_length = sorted(lengths, reverse=True)
    if unpadded:  # per batch (2 prompts): one call per prompt without padding where a batch would pad much
        from alignkit.rollout.generate import PAD_TO_SPLIT

        want = []
        for a, b in (by_length[:2], by_length[2:]):
            want += [(1, a, 0), (1, b, 0)] if 1 - (a + b) / (2 * a) > PAD_TO_SPLIT else [(2, a, a - b)]
        assert prefills == want and any(rows == 1 for rows, _, _ in prefills)
    else:  # 4 samples = 2 prompts x 2 per batch, each prompt once, the long ones together
        assert [rows for rows, _, _ in prefills] == [2, 2]
        assert sum(pad for _, _, pad in prefills) == (by_length[0] - by_length[1]) + (by_length[2] - by_length[3])
    assert sum(rows for rows, _, _ in decodes) == sum(len(r) - 1 for r in gens.response_ids)
    assert any(len(r) < 10 for r in gens.response_ids)


def test_prompts_of_close_lengths_are_prefilled_in_one_call(tiny_dir, tiny_tokenizer):
    """Without padding to save, one batched prefill (a forward per prompt would only add its fixed
    cost, which dominates small models): the split is taken only above PAD_TO_SPLIT padding."""
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    gen = HFGenerator(model, tiny_tokenizer, SamplingConfig(max_new_tokens=3))
    prompts = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(4)]
    from alignkit.rollout.generate import PAD_TO_SPLIT

    lengths = [len(ids) for ids in gen.generate(prompts).prompt_ids]
    pad = 4 * max(lengths) - sum(lengths)
    assert pad / (4 * max(lengths)) <= PAD_TO_SPLIT
    calls = _forward_rows(model)
    gen.generate(prompts, n=2, seed=0)
    assert [c for c in calls if c[1] > 1] == [(4, max(lengths), pad)]


def test_draw_tokens_samples_the_distribution_and_never_a_cut_token():
    """Inverse-CDF draws: frequencies match the probabilities (χ²-style bound), tokens of
    probability 0 (cut by top-k/top-p: -inf scores) are never drawn, and each row reads its own stream."""
    from alignkit.rollout.generate import draw_tokens

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    scores = probs.log().expand(4000, 5)
    rng = torch.Generator().manual_seed(0)
    tokens = torch.cat([draw_tokens(scores[i : i + 100], [rng] * 100) for i in range(0, 4000, 100)])
    freq = torch.bincount(tokens, minlength=5).double() / 4000
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs.double(), atol=0.03), freq
    a = draw_tokens(torch.zeros(2, 50), [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = draw_tokens(torch.zeros(1, 50), [torch.Generator().manual_seed(2)])
    assert a[1] == b[0]  # row 1's draw depends on its stream only


def test_a_lora_wrapped_policy_gets_the_kv_cache_under_its_current_name(tiny_dir, tiny_tokenizer):
    """The decode loop asks the transformers model under a peft wrapper (whose forward takes
    **kwargs) which name its KV-cache argument has, so LoRA runs pass the current one and not a
    deprecated alias; and the samples equal the plain model's at LoRA init
    (B = 0: the adapters add nothing yet)."""
    import inspect

    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.models.masks import unwrap
    from alignkit.rollout.generate import make_generator

    plain = load_causal_lm(ModelConfig(path=str(tiny_dir)))
    lora = load_causal_lm(ModelConfig(path=str(tiny_dir), lora=True))
    base = unwrap(lora)
    current = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    seen = []
    base.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    prompts = [[{"role": "user", "content": f"Item {i}?"}] for i in range(3)]
    sampling = SamplingConfig(max_new_tokens=6, generation_batch_size=4)
    got = make_generator(lora, tiny_tokenizer, sampling).generate(prompts, n=2, seed=3).response_ids
    decode_calls = [k for k in seen if current in k]
    assert decode_calls and not any(("past_key_values" in k) for k in seen if current != "past_key_values")
    assert got == make_generator(plain, tiny_tokenizer, sampling).generate(prompts, n=2, seed=3).response_ids
